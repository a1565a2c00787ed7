"""Training the speech head (stage ``talker``) on a tiny datagen-format folder with a tiny codec,
run as users run it (``omnivox train RECIPE``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnivox.decoders.codec import MelCodec, MelCodecConfig, save_mel_codec
from omnivox.decoders.speech import TALKER_CONFIG, SpeechHead
from omnivox.training.cli import main
from omnivox.training.config import ConfigError, load_train_config
from omnivox.training.talker import (
    FINAL_DIR,
    PAIRS_FILE,
    STATE_FILE,
    clean_speech_items,
    export_state,
    load_state,
)

SR = 16_000
SENTENCES = ["Hello there.", "The soup is hot.", "Open the door.", "It is seven.", "Call me later.", "Good night."]


def _speechy(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(100, 220)
    voiced = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5))
    return (0.2 * voiced * np.clip(np.sin(2 * np.pi * 3 * t), 0, None)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("validation", 2)):
        rows = []
        for i in range(count):
            rel = f"audio/{split}/{i}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            audio = _speechy(float(rng.uniform(1.0, 1.6)), rng)
            sf.write(root / rel, audio, SR)
            text = SENTENCES[i % len(SENTENCES)]
            meta = {"segments": [{"label": "speech", "onset": 0.0, "offset": 1.0, "text": text}], "sounds": [],
                    "augment": [], "text": text, "spoken": text, "voice": {"engine": "espeak", "voice": f"espeak:v{i % 2}"}}  # fmt: skip
            rows.append({"id": f"{split}-{i}", "audio": rel, "duration": audio.size / SR, "task": "transcription",
                         "split": split, "metadata": meta})  # fmt: skip
        noisy = {**rows[0], "id": f"{split}-noisy", "metadata": {**rows[0]["metadata"], "augment": ["noise"]}}
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, noisy]))
    torch.manual_seed(0)
    codec = MelCodec(MelCodecConfig(n_mels=16, num_codebooks=2, codebook_size=16, dim=16, intermediate_dim=32, num_layers=1))
    with torch.no_grad():
        codec.codebooks.normal_()
    return root, save_mel_codec(codec, root.parent / "codec")


def _recipe(tmp_path: Path, data: Path, codec: Path, out: Path, max_steps: int = 6) -> Path:
    path = tmp_path / f"{out.name}.toml"
    path.write_text(f"""
stage = "talker"
out_dir = "{out}"
seed = 0
save_every = 0
eval_every = 0
log_every = 1
device = "cpu"
threads = 2

[data]
dir = "{data}"

[optim]
max_steps = {max_steps}
batch_size = 2
lr = 3e-3
warmup_steps = 1

[talker]
codec = "{codec}"
batch_frames = 200

[talker.model]
dim = 32
heads = 4
ffn = 64
encoder_layers = 1
decoder_layers = 1
dropout = 0.0
""")
    return path


def test_only_clean_single_voice_speech_is_used(setup) -> None:
    data, _ = setup
    items = clean_speech_items(data, "train")
    assert len(items) == 6 and all(i["id"] != "train-noisy" for i in items)


def test_training_lowers_the_code_loss_and_writes_a_talker(setup, tmp_path: Path, capsys) -> None:
    data, codec = setup
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, data, codec, out, max_steps=60)), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / FINAL_DIR)
    saved = json.loads((out / FINAL_DIR / TALKER_CONFIG).read_text())
    assert saved["voices"] == ["espeak:v0", "espeak:v1"] and saved["codec"] == "codec"
    assert saved["config"]["num_codebooks"] == 2 and saved["config"]["codebook_size"] == 16
    history = [h for h in load_state(out / STATE_FILE)["history"] if h["kind"] == "train"]
    assert np.mean([h["codes"] for h in history[-5:]]) < 0.8 * np.mean([h["codes"] for h in history[:5]])
    assert (out / PAIRS_FILE).is_file() and json.loads((out / "metrics.json").read_text())["train_utterances"] == 6
    assert saved["default_voice"] == "espeak:v0"  # the recipe names none: the first voice
    # beside its codec, the talker is a model folder's speech head
    folder = tmp_path / "model"
    shutil.copytree(out / FINAL_DIR, folder / "talker")
    shutil.copytree(codec, folder / "codec")
    spoken = SpeechHead.from_folder(folder).say("Open the door.", "v1")
    assert spoken.voice == "espeak:v1" and spoken.codes.shape[0] == 2 and spoken.waveform.size == 320 * spoken.codes.shape[1]


def test_the_default_voice_must_be_one_the_data_has(setup, tmp_path: Path, capsys) -> None:
    data, codec = setup
    recipe = str(_recipe(tmp_path, data, codec, tmp_path / "run"))
    assert main(["train", recipe, "--no-progress", "--set", "talker.default_voice=espeak:nobody"]) == 2
    assert "default_voice 'espeak:nobody' is not among the data's voices" in capsys.readouterr().err
    assert not (tmp_path / "run" / STATE_FILE).exists()  # refused before any step


def test_stopped_run_resumes_to_the_uninterrupted_result(setup, tmp_path: Path) -> None:
    data, codec = setup
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(_recipe(tmp_path, data, codec, straight)), "--no-progress"]) == 0
    recipe = str(_recipe(tmp_path, data, codec, resumed))
    assert main(["train", recipe, "--no-progress", "--set", "stop_at_step=3"]) == 0
    # a stopped run's talker can be taken out and spoken with
    folder = tmp_path / "stopped"
    export_state(resumed / STATE_FILE, folder / "talker", default_voice="espeak:v1", dtype=torch.bfloat16)
    shutil.copytree(codec, folder / "codec")
    head = SpeechHead.from_folder(folder)
    assert head.default_voice == "espeak:v1" and head.say("Good night.").codes.shape[0] == 2
    assert main(["train", recipe, "--no-progress"]) == 0
    state, reference = load_state(resumed / STATE_FILE), load_state(straight / STATE_FILE)
    assert [h["total"] for h in state["history"]] == pytest.approx([h["total"] for h in reference["history"]])
    for key, value in state["talker"].items():
        torch.testing.assert_close(value, reference["talker"][key], msg=key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["talker.codec="], "talker.codec: the codec folder is required"),
        (["talker.model.num_codebooks=3"], "talker.model.num_codebooks comes from the codec"),
        (["talker.batch_frames=0"], "talker.batch_frames must be >= 1"),
        (["model.init_from=x"], "stage 'talker' has no \\[model\\] section"),
    ],
)
def test_bad_recipe_fields_are_named(setup, tmp_path: Path, overrides: list[str], message: str) -> None:
    data, codec = setup
    with pytest.raises(ConfigError, match=message):
        load_train_config(_recipe(tmp_path, data, codec, tmp_path / "run"), overrides)


def test_tasks_on_audio_train_beside_tts_resume_exactly_and_the_talker_cleans_clips(setup, tmp_path: Path) -> None:
    data, codec = setup
    extra = ["--set", "talker.tasks={tts = 1.0, ns = 1.0, tse = 1.0, dereverb = 0.5}", "--set", "eval_every=3",
             "--set", "talker.code_dropout=0.4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(_recipe(tmp_path, data, codec, straight)), "--no-progress", *extra]) == 0
    recipe = str(_recipe(tmp_path, data, codec, resumed))
    assert main(["train", recipe, "--no-progress", *extra, "--set", "stop_at_step=4"]) == 0
    assert main(["train", recipe, "--no-progress", *extra]) == 0
    history = load_state(straight / STATE_FILE)["history"]
    assert {h["task"] for h in history if h["kind"] == "train"} <= {"tts", "ns", "tse", "dereverb"}
    assert len({h["task"] for h in history if h["kind"] == "train"}) >= 2
    val = [h for h in history if h["kind"] == "val"][0]
    assert {"codes", "ns_codes", "ns_accuracy", "tse_codes", "dereverb_codes"} <= set(val)
    again = load_state(resumed / STATE_FILE)["history"]
    assert [h.get("total", h.get("codes")) for h in again] == pytest.approx([h.get("total", h.get("codes")) for h in history])
    saved = json.loads((straight / FINAL_DIR / TALKER_CONFIG).read_text())
    assert saved["tasks"] == {"dereverb": 3, "ns": 1, "tse": 4, "tts": 0} and saved["config"]["source_mels"] == 16
    folder = tmp_path / "model"
    shutil.copytree(straight / FINAL_DIR, folder / "talker")
    shutil.copytree(codec, folder / "codec")
    head = SpeechHead.from_folder(folder)
    clip = _speechy(1.0, np.random.default_rng(5))
    assert head.transform(clip, "ns").codes.shape == (2, head.source_frames(clip).shape[1])
    assert head.transform(clip, "tse", clip[:8000]).waveform.size == clip.size


def test_a_tts_talker_starts_a_talker_with_tasks_on_audio(setup, tmp_path: Path) -> None:
    from omnivox.decoders.speech import load_talker
    from omnivox.decoders.talker import Talker
    from omnivox.training.talker import start_from

    data, codec = setup
    out = tmp_path / "tts"
    assert main(["train", str(_recipe(tmp_path, data, codec, out, max_steps=2)), "--no-progress"]) == 0
    tts, _ = load_talker(out / FINAL_DIR)
    bigger = Talker(replace(tts.config, source_mels=16))
    fresh = bigger.source_in.weight.clone()
    start_from(bigger, out / FINAL_DIR)
    torch.testing.assert_close(bigger.phoneme_embed.weight, tts.phoneme_embed.weight)
    torch.testing.assert_close(bigger.heads[3][-1].weight if len(bigger.heads) > 3 else bigger.heads[-1][-1].weight,
                               tts.heads[3][-1].weight if len(tts.heads) > 3 else tts.heads[-1][-1].weight)  # fmt: skip
    assert torch.equal(bigger.source_in.weight, fresh)  # not in the tts talker: left as it was
    recipe = str(_recipe(tmp_path, data, codec, tmp_path / "grown", max_steps=2))
    assert main(["train", recipe, "--no-progress", "--set", "talker.tasks={tts = 1.0, ns = 1.0}",
                 "--set", f"talker.init_from={out / FINAL_DIR}"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["talker.tasks={karaoke = 1.0}"], "unknown task\\(s\\) \\['karaoke'\\]"),
        (["talker.tasks={tts = 0.0}"], "shares must be numbers >= 0, not all 0"),
        (["talker.code_dropout=1.0"], "talker.code_dropout must be in \\[0, 1\\)"),
    ],
)
def test_bad_task_shares_are_named(setup, tmp_path: Path, overrides: list[str], message: str) -> None:
    data, codec = setup
    with pytest.raises(ConfigError, match=message):
        load_train_config(_recipe(tmp_path, data, codec, tmp_path / "run"), overrides)


def test_extra_data_folders_join_the_first(setup, tmp_path: Path, capsys) -> None:
    data, codec = setup
    second = tmp_path / "second"
    shutil.copytree(data, second)
    for split in ("train", "validation"):
        path = second / f"{split}.jsonl"
        path.write_text(path.read_text().replace('"espeak:v', '"espeak:w'))
    out = tmp_path / "run"
    recipe = str(_recipe(tmp_path, data, codec, out, max_steps=2))
    assert main(["train", recipe, "--no-progress", "--set", f"talker.extra_data=['{second}']"]) == 0
    saved = json.loads((out / FINAL_DIR / TALKER_CONFIG).read_text())
    assert saved["voices"] == ["espeak:v0", "espeak:v1", "espeak:w0", "espeak:w1"]
    assert json.loads((out / "metrics.json").read_text())["train_utterances"] == 12
    capsys.readouterr()
    recipe = str(_recipe(tmp_path, data, codec, tmp_path / "run2", max_steps=2))
    assert main(["train", recipe, "--no-progress", "--set", f"talker.extra_data=['{tmp_path / 'nowhere'}']"]) == 2
    assert "nowhere: no train.jsonl" in capsys.readouterr().err
