"""The speech head as a model folder holds it (decoders/speech.py): save/load, voices, streaming,
and every broken file named in its error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny
import torch

from omnivox.decoders.speech import SpeechHead
from omnivox.errors import CheckpointError, UserInputError


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    return tiny.add_speech_head(tmp_path_factory.mktemp("speech"))


def test_a_saved_head_loads_and_speaks_the_same_codes_as_the_talker_it_came_from(speech_dir) -> None:
    from omnivox.decoders.phonemes import phonemize

    head = SpeechHead.from_folder(speech_dir)
    assert SpeechHead.present(speech_dir) and not SpeechHead.present(speech_dir / "codec")
    assert head.voices == list(tiny.TINY_VOICES) and head.default_voice == tiny.TINY_VOICES[0]
    spoken = head.say("Hello there.")
    assert spoken.voice == tiny.TINY_VOICES[0] and spoken.sample_rate == 16_000
    assert spoken.codes.shape[0] == 3 and spoken.waveform.shape == (spoken.codes.shape[1] * 320,)
    assert spoken.waveform.dtype == np.float32 and np.all(np.abs(spoken.waveform) <= 1)
    frames = torch.cat(list(head.talker.generate(torch.tensor([phonemize("Hello there.").ids]), voice=0)), -1)
    assert torch.equal(frames[0], spoken.codes)
    # the codes decode to the waveform the head returned
    np.testing.assert_allclose(spoken.waveform, head.codec.decode(spoken.codes[None])[0, 0].clamp(-1, 1).numpy(), atol=1e-5)


def test_pieces_handed_to_on_audio_make_the_whole_answer_and_the_first_comes_early(speech_dir) -> None:
    head = SpeechHead.from_folder(speech_dir)
    pieces: list[np.ndarray] = []
    spoken = head.say("The quick brown fox jumps over the lazy dog.", on_audio=pieces.append, chunk_frames=3)
    assert len(pieces) > 3 and all(p.ndim == 1 for p in pieces)
    np.testing.assert_allclose(np.clip(np.concatenate(pieces), -1, 1), spoken.waveform, atol=1e-6)
    assert spoken.first_audio_s is not None and spoken.first_audio_s <= spoken.seconds_taken


def test_voices_by_full_or_short_name_and_sampling_is_repeatable_with_a_seed(speech_dir) -> None:
    head = SpeechHead.from_folder(speech_dir)
    assert head.voice_id(None) == 0 and head.voice_id("piper:joe") == 1 and head.voice_id("joe") == 1
    with pytest.raises(UserInputError, match="unknown voice 'alloy'.*piper:joe"):
        head.say("Hi.", "alloy")
    a = head.say("Good morning.", "joe", temperature=1.0, top_k=4, seed=3)
    b = head.say("Good morning.", "joe", temperature=1.0, top_k=4, seed=3)
    assert a.voice == "piper:joe" and torch.equal(a.codes, b.codes)
    with pytest.raises(UserInputError, match="no text"):
        head.say("   ")
    with pytest.raises(UserInputError, match="frames, more than the limit"):
        head.say("This sentence is far too long to be spoken in a tenth of a second.", max_seconds=0.1)


def _broken(src, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(src, folder)
    data = json.loads((folder / "talker" / "talker.json").read_text())
    edit(folder, data)
    if (folder / "talker" / "talker.json").exists():
        (folder / "talker" / "talker.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f, d: d.update(phonemes=d["phonemes"][:-1]), "phoneme table differs"),
        (lambda f, d: d.update(codec="elsewhere"), "names the codec folder 'elsewhere'"),
        (lambda f, d: d.update(default_voice="nobody"), "default_voice 'nobody' is not among voices"),
        (lambda f, d: d.update(voices=[]), "voices must be a non-empty list"),
        (lambda f, d: d["config"].update(dim=48), "does not fit"),
        (lambda f, d: d["config"].update(codebook_size=32), "does not fit|emits 3 x 32 codes"),
        (lambda f, d: (f / "talker" / "talker.safetensors").write_bytes(b"junk"), "cannot read .*talker.safetensors"),
        (lambda f, d: d["config"].update(bogus=1), "unknown keys \\['bogus'\\]"),
        (lambda f, d: d.update(tasks={"tts": 0, "ns": 1}), "do not fit a talker with 2 task rows and source_mels 0"),
        (lambda f, d: d.update(tasks={"tts": 0, "karaoke": 1}), "unknown tasks \\['karaoke'\\]"),
        (lambda f, d: d.update(tasks=[]), "tasks must map task names"),
    ],
)
def test_broken_talker_folders_are_refused_with_the_file_and_the_fault(speech_dir, tmp_path, edit, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        SpeechHead.from_folder(_broken(speech_dir, tmp_path, edit))


def test_tasks_on_audio_make_one_frame_per_input_frame_and_refuse_what_the_talker_was_not_trained_for(tmp_path) -> None:
    folder = tiny.add_speech_head(tmp_path / "audio", tasks={"tts": 0, "ns": 1, "tse": 2})
    head = SpeechHead.from_folder(folder)
    assert head.tasks == {"tts": 0, "ns": 1, "tse": 2}
    noisy = tiny.tone_clip(1.0, 330.0, seed=1, sample_rate=22_050)
    pieces: list[np.ndarray] = []
    out = head.transform(noisy, "ns", sample_rate=22_050, on_audio=pieces.append)
    frames = head.source_frames(noisy, 22_050).shape[1]
    assert out.codes.shape == (3, frames) and out.waveform.size == frames * 320 and out.details["task"] == "ns"
    np.testing.assert_allclose(np.clip(np.concatenate(pieces), -1, 1), out.waveform, atol=1e-6)
    again = head.transform(noisy, "ns", sample_rate=22_050)
    assert torch.equal(again.codes, out.codes)  # greedy: the same codes every time
    enrol = tiny.tone_clip(0.6, 220.0, seed=2)
    assert head.transform(noisy[:16_000], "tse", enrol).codes.shape[0] == 3
    with pytest.raises(UserInputError, match="needs an enrolment clip"):
        head.transform(noisy, "tse")
    with pytest.raises(UserInputError, match="not trained for dereverb"):
        head.transform(noisy, "dereverb")
    with pytest.raises(UserInputError, match="unknown task on audio 'karaoke'"):
        head.transform(noisy, "karaoke")
    with pytest.raises(UserInputError, match="non-empty and finite"):
        head.transform(np.full(100, np.nan, np.float32), "ns")
    tts_only = SpeechHead.from_folder(tiny.add_speech_head(tmp_path / "plain"))
    assert tts_only.tasks == {"tts": 0}
    with pytest.raises(UserInputError, match="not trained for ns"):
        tts_only.transform(noisy, "ns")
