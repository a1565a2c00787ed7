"""The omnivox CLI on a tiny model folder."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import soundfile as sf
import tiny

from omnivox.agent import cli
from omnivox.agent.model import OmnivoxModel


def _wav(tmp_path, seconds=2.0, name="clip.wav"):
    path = tmp_path / name
    sf.write(path, tiny.tone_clip(seconds, sample_rate=22050), 22050)
    return path


def test_chat_one_question_prints_the_answer(tiny_model_dir, tmp_path, capsys):
    wav = _wav(tmp_path)
    rc = cli.main(["chat", "--model", str(tiny_model_dir), "--audio", str(wav), "--greedy", "--max-new-tokens", "6", "What", "is", "said?"])
    out = capsys.readouterr().out
    assert rc == 0
    from omnivox.agent.assistant import Assistant
    from omnivox.agent.audio import load_audio
    from omnivox.agent.generation import GenerationSettings

    expected = Assistant.from_pretrained(tiny_model_dir).chat(
        "What is said?", [load_audio(wav).samples], GenerationSettings.greedy(max_new_tokens=6)
    )
    assert out.strip() == expected.text


def test_interactive_chat_encodes_audio_once_and_keeps_turns(tiny_model_dir, tmp_path, monkeypatch, capsys):
    wav = _wav(tmp_path)
    calls = {"encode": 0, "prompts": []}
    real_encode, real_generate = OmnivoxModel.encode_clip, OmnivoxModel.generate

    def counting_encode(self, samples):
        calls["encode"] += 1
        return real_encode(self, samples)

    def recording_generate(self, conversations, audio, settings=None, on_text=None, logits_processors=None):
        calls["prompts"].append([m.role for m in conversations[0]])
        return real_generate(self, conversations, audio, settings, on_text, logits_processors)

    monkeypatch.setattr(OmnivoxModel, "encode_clip", counting_encode)
    monkeypatch.setattr(OmnivoxModel, "generate", recording_generate)
    lines = iter(["What is said?", "", "And then?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc = cli.main(["chat", "--model", str(tiny_model_dir), "--audio", str(wav), "--greedy", "--max-new-tokens", "4"])
    assert rc == 0
    assert calls["encode"] == 1
    assert calls["prompts"] == [["user"], ["user", "assistant", "user"]]
    assert capsys.readouterr().out.count("omnivox> ") == 2


# the quietening that in-process cli.main calls of this session put into os.environ: a fresh shell has none
QUIET_VARIABLES = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


def _run_cli(*args, **env):
    env = {**{k: v for k, v in os.environ.items() if k not in QUIET_VARIABLES}, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "omnivox.agent.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_bad_audio_is_one_line_and_nonzero(tiny_model_dir, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    result = _run_cli("chat", "--model", str(tiny_model_dir), "--audio", str(bad), "hi")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("omnivox: error:") and "notes.wav" in lines[0]
    assert "Traceback" not in result.stderr


def _with_hf_whisper(tiny_model_dir, root):
    """The tiny model folder, its Whisper encoder taken from a whole HF Whisper checkpoint.

    Loading only the encoder leaves the decoder weights unused, which transformers reports in a
    "LOAD REPORT" table on every load.
    """
    import json
    import shutil

    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, max_source_positions=1500,
        max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(root / "hf-whisper")
    folder = shutil.copytree(tiny_model_dir, root / "model")
    data = json.loads((folder / "config.json").read_text())
    data["encoders"][0]["path"] = str(root / "hf-whisper")  # d_model 16, as the tiny openai-whisper .pt
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_chat_keeps_library_output_off_stderr_unless_verbose(tiny_model_dir, tmp_path):
    folder = _with_hf_whisper(tiny_model_dir, tmp_path)
    noise = tmp_path / "noise.mp3"  # libsndfile's mpg123 prints "Note: ..." lines while probing it
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    cache = str(tmp_path / "cache")  # empty: the first load also writes omnivox's cached LLM copy
    ask = ("chat", "--model", str(folder), "--audio", str(_wav(tmp_path)), "--greedy", "--max-new-tokens", "3", "What?")

    quiet = _run_cli(*ask, OMNIVOX_CACHE=cache)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip()
    for noise_text in ("LOAD REPORT", "Loading weights", "Writing model shards", "%|", "[transformers]"):
        assert noise_text not in quiet.stderr, quiet.stderr
    bad = _run_cli("chat", "--model", str(folder), "--audio", str(noise), "hi", OMNIVOX_CACHE=cache)
    assert bad.returncode == 2
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [bad.stderr.strip()]
    assert bad.stderr.startswith("omnivox: error: audio ") and "noise.mp3" in bad.stderr and "Note:" not in bad.stderr

    # --verbose shows them (which also shows that this folder does make transformers report).
    verbose = _run_cli("--verbose", *ask, OMNIVOX_CACHE=cache)
    assert verbose.returncode == 0, verbose.stderr
    assert "LOAD REPORT" in verbose.stderr and "Loading weights" in verbose.stderr
    bad = _run_cli("--verbose", "chat", "--model", str(folder), "--audio", str(noise), "hi", OMNIVOX_CACHE=cache)
    assert bad.returncode == 2 and "Illegal Audio-MPEG-Header" in bad.stderr


def test_missing_audio_and_model_errors(tiny_model_dir, tmp_path):
    result = _run_cli("chat", "--model", str(tiny_model_dir), "--audio", str(tmp_path / "gone.flac"), "hi")
    assert result.returncode == 2 and "gone.flac" in result.stderr and "Traceback" not in result.stderr
    result = _run_cli("chat", "--model", str(tmp_path / "nomodel"), "hi")
    assert result.returncode == 2 and "not an omnivox model folder" in result.stderr


def test_conflicting_flags(tiny_model_dir, capsys):
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--greedy", "--temperature", "0.7", "hi"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_chat_decodes_as_the_model_folder_says_unless_flags_say_otherwise(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    data = json.loads((copy / "config.json").read_text())
    generation = {"num_beams": 1, "max_new_tokens": 5, "ctc_fusion_weight": 0.3}
    (copy / "config.json").write_text(json.dumps({**data, "generation": generation}))
    wav = _wav(tmp_path)
    seen = []
    real = OmnivoxModel.generate

    def recording(self, conversations, audio, settings=None, on_text=None, logits_processors=None):
        seen.append(settings)
        return real(self, conversations, audio, settings, on_text, logits_processors)

    monkeypatch.setattr(OmnivoxModel, "generate", recording)
    assert cli.main(["chat", "--model", str(copy), "--audio", str(wav), "What?"]) == 0
    assert cli.main(["chat", "--model", str(copy), "--audio", str(wav), "--num-beams", "2", "What?"]) == 0
    assert cli.main(["chat", "--model", str(copy), "--audio", str(wav), "--max-new-tokens", "3", "What?"]) == 0
    assert cli.main(["chat", "--model", str(copy), "--audio", str(wav), "--ctc-fusion-weight", "0", "What?"]) == 0
    assert [(s.num_beams, s.max_new_tokens, s.ctc_fusion_weight) for s in seen] == [(1, 5, 0.3), (2, 5, 0.3), (1, 3, 0.3), (1, 5, 0.0)]
    capsys.readouterr()


def test_bench_measures_every_figure_beside_its_baseline(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", str(tiny_model_dir), "--repeats", "1", "--out", str(out)]) == 0
    import json

    results = json.loads(out.read_text())
    figures = {k: v for k, v in results.items() if not k.startswith("_")}
    assert set(figures) == {"encode_s_per_audio_s", "ttft_10s_audio_s", "ttft_30s_audio_s", "decode_tokens_per_s", "peak_memory_bytes", "load_s"}
    for row in figures.values():
        assert row["omnivox"] > 0 and row["baseline"] > 0 and row["baseline_name"]
    assert "load_s" in capsys.readouterr().out


def test_agent_prints_a_json_trace_and_checks_its_flags(tiny_model_dir, tmp_path, capsys):
    import json

    wav = _wav(tmp_path)
    out_dir = tmp_path / "out"
    rc = cli.main(["agent", "--model", str(tiny_model_dir), "--audio", str(wav), "--out-dir", str(out_dir),
                   "--max-steps", "2", "--tools", "measure,trim", "--json", "Cut", "the", "first", "second."])  # fmt: skip
    assert rc == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["clips"] == ["clip-1"] and trace["stopped_by"] in ("answer", "max_steps")
    assert trace["steps"][-1]["kind"] == "answer" and all(s["name"] in (None, "measure", "trim") for s in trace["steps"])
    for path in trace["artifacts"].values():
        assert os.path.dirname(path) == str(out_dir.resolve()) and os.path.isfile(path)
    assert cli.main(["agent", "--model", str(tiny_model_dir), "--max-steps", "0", "goal"]) == 2
    assert cli.main(["agent", "--model", str(tiny_model_dir), "--out-dir", str(out_dir), "--tools", "nope", "goal"]) == 2
    assert "no tool named 'nope'" in capsys.readouterr().err


def _speaking_copy(tiny_model_dir, tmp_path):
    return tiny.add_speech_head(tiny.greedy_copy(tiny_model_dir, tmp_path, max_new_tokens=6, name="speaks"))


def test_generate_tts_writes_the_spoken_text_and_a_spectrogram(tiny_model_dir, tmp_path, capsys):
    from omnivox.decoders.speech import SpeechHead

    folder = _speaking_copy(tiny_model_dir, tmp_path)
    out, plot = tmp_path / "fox.wav", tmp_path / "fox.png"
    rc = cli.main(["generate", "--model", str(folder), "--task", "tts", "--voice", "joe", "--out", str(out), "--plot", str(plot),
                   "The quick brown fox."])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "The quick brown fox." in captured.out and f"wrote {out}" in captured.err and "voice piper:joe" in captured.err
    audio, rate = sf.read(out, dtype="float32")
    expected = SpeechHead.from_folder(folder).say("The quick brown fox.", "joe")
    assert rate == 16_000 and audio.shape == expected.waveform.shape
    np.testing.assert_allclose(audio, expected.waveform, atol=1.5 / 32768)  # 16-bit PCM
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_chat_out_speaks_the_answer(tiny_model_dir, tmp_path, capsys):
    from omnivox.agent.assistant import Assistant
    from omnivox.agent.audio import load_audio

    folder = _speaking_copy(tiny_model_dir, tmp_path)
    wav, out = _wav(tmp_path), tmp_path / "answer.wav"
    assert cli.main(["chat", "--model", str(folder), "--audio", str(wav), "--out", str(out), "What", "is", "said?"]) == 0
    captured = capsys.readouterr()
    assistant = Assistant.from_pretrained(folder)
    answer = assistant.chat("What is said?", [load_audio(wav).samples])
    assert captured.out.strip() == answer.text and f"wrote {out}" in captured.err
    spoken = assistant.speak(answer).audio
    assert spoken is not None and spoken.transcript == answer.text
    np.testing.assert_allclose(sf.read(out, dtype="float32")[0], spoken.waveform, atol=1.5 / 32768)


def test_audio_out_errors_are_one_line(tiny_model_dir, tmp_path):
    folder = _speaking_copy(tiny_model_dir, tmp_path)
    cases = [
        (("generate", "--model", str(tiny_model_dir), "--task", "tts", "--out", str(tmp_path / "a.wav"), "Hi."), "cannot speak: it has no talker/"),
        (("generate", "--model", str(folder), "--task", "tts", "--out", str(tmp_path / "a.mp3"), "Hi."), "ending in .wav"),
        (("generate", "--model", str(folder), "--task", "tts", "--out", str(tmp_path / "no" / "a.wav"), "Hi."), "does not exist"),
        (("generate", "--model", str(folder), "--task", "tts", "--out", str(tmp_path / "a.wav")), "needs the text"),
        (("generate", "--model", str(folder), "--task", "tts", "--voice", "alloy", "--out", str(tmp_path / "a.wav"), "Hi."), "unknown voice 'alloy'"),
        (("chat", "--model", str(folder), "--voice", "alloy", "--out", str(tmp_path / "a.wav"), "Hi."), "unknown voice 'alloy'"),
        (("chat", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a.wav"), "Hi."), "cannot speak"),
    ]  # fmt: skip
    for args, message in cases:
        result = _run_cli(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "a.wav").exists()


def test_generate_a_task_on_audio_writes_the_output_and_plots_input_above_it(tiny_model_dir, tmp_path, capsys):
    from omnivox.agent.audio import load_audio
    from omnivox.decoders.speech import SpeechHead

    folder = tiny.add_speech_head(tiny.greedy_copy(tiny_model_dir, tmp_path, name="cleans"), tasks={"tts": 0, "ns": 1})
    noisy, out, plot = _wav(tmp_path, seconds=1.0, name="noisy.wav"), tmp_path / "clean.wav", tmp_path / "ns.png"
    rc = cli.main(["generate", "--model", str(folder), "--task", "ns", "--audio", str(noisy), "--out", str(out), "--plot", str(plot)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = SpeechHead.from_folder(folder).transform(load_audio(noisy).samples, "ns")
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 16_000 and audio.shape == expected.waveform.shape and f"wrote {out}" in captured.err
    np.testing.assert_allclose(audio, expected.waveform, atol=1.5 / 32768)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    cases = [
        (("--task", "dereverb", "--audio", str(noisy)), "not trained for dereverb"),
        (("--task", "ns"), "takes an input clip (--audio FILE)"),
        (("--task", "ns", "--audio", str(noisy), "some text"), "not text"),
        (("--task", "tse", "--audio", str(noisy)), "needs --prompt-audio"),
    ]
    for extra, message in cases:
        result = _run_cli("generate", "--model", str(folder), "--out", str(tmp_path / "b.wav"), *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "b.wav").exists()


def test_chat_out_about_a_clip_lets_a_model_with_tasks_on_audio_answer_with_one(tiny_model_dir, tmp_path, capsys):
    from omnivox.agent.agent_loop import audio_answer
    from omnivox.agent.assistant import Assistant
    from omnivox.agent.audio import load_audio

    folder = tiny.add_speech_head(tiny.greedy_copy(tiny_model_dir, tmp_path, name="cleans"), tasks={"tts": 0, "ns": 1})
    noisy, out = _wav(tmp_path, seconds=1.0, name="noisy.wav"), tmp_path / "clean.wav"
    rc = cli.main(["chat", "--model", str(folder), "--audio", str(noisy), "--out", str(out), "Remove the background noise."])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assistant = Assistant.from_pretrained(folder)
    assert assistant.speech_tasks == ("tts", "ns")  # read from talker.json; the head itself loads on first use
    result, made = audio_answer(assistant, "Remove the background noise.", [load_audio(noisy).samples])
    assert captured.out.strip() == result.answer and f"wrote {out}" in captured.err
    # the tiny random model's choice, either way: the call's audio, or its text answer spoken
    expected = made.samples if made is not None else assistant.speech.say(result.answer).waveform
    np.testing.assert_allclose(sf.read(out, dtype="float32")[0], expected, atol=1.5 / 32768)
    assert ("call remove_noise" in captured.err) == (made is not None)
