"""Training of the small BEATs sound encoder (stage ``sound_encoder``): a tiny model on a tiny
datagen-format dataset, run the way users run it (``python -m omnivox.training train RECIPE``,
which is what ``omnivox train RECIPE`` calls)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnivox.encoders.beats import BeatsConfig, BeatsEncoder, load_beats_checkpoint
from omnivox.errors import CheckpointError
from omnivox.training.cli import main
from omnivox.training.config import ConfigError, DataSection, ModelSection, TrainConfig, load_train_config
from omnivox.training.sound_encoder import (
    FINAL_FILE,
    STATE_FILE,
    average_precision,
    clip_logits,
    load_split,
    load_state,
    make_batch,
    train,
)

SR = 16_000
TINY_FIELDS = dict(
    embed_dim=16,
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=16,
    conv_pos_groups=4,
    num_buckets=32,
    max_distance=64,
)
TINY = BeatsConfig(**TINY_FIELDS)


def _event(label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    if label == "tone":
        return 0.5 * np.sin(2 * np.pi * rng.uniform(400, 800) * t)
    return 0.3 * rng.standard_normal(t.size)  # "white noise"


def _write_item(root: Path, index: int, split: str, rng: np.random.Generator) -> dict:
    """One clip in the datagen layout: 0.2 s silence, event 1, gap, optional event 2."""
    labels = [["tone"], ["white noise"], ["tone", "white noise"], ["white noise", "tone"]][index % 4]
    parts, segments, now = [np.zeros(int(0.2 * SR))], [], 0.2
    for label in labels:
        seconds = float(rng.uniform(0.5, 0.8))
        parts += [_event(label, seconds, rng), np.zeros(int(0.2 * SR))]
        segments.append({"label": label, "onset": round(now, 3), "offset": round(now + seconds, 3)})
        now += seconds + 0.2
    audio = np.concatenate(parts).astype(np.float32)
    item_id = f"{index:07d}"
    rel = f"audio/{split}/{item_id}.wav"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(root / rel, audio, SR, subtype="PCM_16")
    item = {
        "id": item_id,
        "audio": rel,
        "duration": audio.size / SR,
        "task": "classification",
        "split": split,
        "metadata": {"segments": segments, "sounds": labels},
    }
    (root / "items" / f"{item_id}.json").write_text(json.dumps(item))
    return item


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    (root / "items").mkdir()
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for index in range(14):
        split = "train" if index < 8 else "validation" if index < 12 else "test"
        rows[split].append(_write_item(root, index, split, rng))
    for split, items in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root


def _recipe(tmp_path: Path, data_dir: Path, out: Path, **top) -> Path:
    """A stage sound_encoder recipe with the tiny architecture; ``top`` sets top-level keys."""
    settings = {"stage": "sound_encoder", "out_dir": str(out), "seed": 0, "save_every": 4, "eval_every": 0,
                "log_every": 1, "device": "cpu", "threads": 2, **top}  # fmt: skip
    beats = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_FIELDS.items())
    path = tmp_path / f"{out.name}.toml"
    path.write_text(
        "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
        + f"""

[data]
dir = "{data_dir}"

[optim]
max_steps = 8
batch_size = 4
lr = 3e-3
weight_decay = 0.01
betas = [0.9, 0.98]
warmup_steps = 2
min_lr_ratio = 0.05

[sound_encoder]
max_seconds = 1.5
eval_max_seconds = 3.0
spec_augment = false

[sound_encoder.beats]
{beats}
"""
    )
    return path


def test_load_split_uses_items_until_manifests_exist(data_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    (partial / "items").mkdir(parents=True)
    for path in (data_dir / "items").glob("*.json"):
        (partial / "items" / path.name).write_text(path.read_text())
    (partial / "audio").symlink_to(data_dir / "audio")
    unfinished = {"id": "0000099", "audio": "audio/train/0000099.wav", "duration": 1.0, "split": "train"}
    (partial / "items" / "0000099.json").write_text(json.dumps(unfinished))  # its audio is not written yet
    clips = load_split(partial, "train")
    assert [c.id for c in clips] == [c.id for c in load_split(data_dir, "train")]
    assert len(load_split(partial, "validation")) == 4


def test_make_batch_targets_follow_onsets(data_dir: Path) -> None:
    clip = load_split(data_dir, "train")[2]  # tone then white noise
    labels = ["tone", "white noise"]
    batch = make_batch([clip], [0.0], 5.0, labels)
    tone, noise = clip.events
    assert batch.clip_targets.tolist() == [[1.0, 1.0]]
    centres = (torch.arange(batch.frame_targets.shape[1]) * 0.16 + 0.0925).tolist()
    for t, centre in enumerate(centres):
        if not batch.frame_mask[0, t]:
            continue
        assert batch.frame_targets[0, t, 0] == float(tone.onset <= centre < tone.offset)
        assert batch.frame_targets[0, t, 1] == float(noise.onset <= centre < noise.offset)
    # A crop that ends before the second event only holds the tone.
    assert make_batch([clip], [0.0], noise.onset - 0.1, labels).clip_targets.tolist() == [[1.0, 0.0]]


def test_average_precision() -> None:
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1.0, 0.0, 1.0])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.5]), np.array([0.0])))


def test_training_lowers_loss_and_writes_official_checkpoint(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, data_dir, out)), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / FINAL_FILE)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if h["kind"] == "train"]
    assert len(losses) == 8
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["tone", "white noise"] and 0.0 <= metrics["mAP"] <= 1.0
    assert (out / "loss.png").is_file()

    raw = torch.load(out / FINAL_FILE, map_location="cpu", weights_only=True)
    assert set(raw) == {"cfg", "model", "label_dict"}
    assert not any(k.startswith("frame_head") for k in raw["model"])
    model, label_dict = load_beats_checkpoint(out / FINAL_FILE)
    assert label_dict == {0: "tone", 1: "white noise"}
    assert model.cfg.finetuned_model and model.cfg.predictor_class == 2
    assert dataclasses.replace(model.cfg, finetuned_model=False, predictor_class=TINY.predictor_class) == TINY

    encoder = BeatsEncoder.from_checkpoint(out / FINAL_FILE)
    wave = torch.from_numpy(sf.read(data_dir / "audio/validation/0000008.wav", dtype="float32")[0])[None]
    output = encoder(wave, torch.tensor([wave.shape[1]]))
    assert output.features.shape == (1, encoder.num_frames(wave.shape[1]), 32)
    # The training-time clip logits are the official predictor before its sigmoid.
    features, mask = model.extract_features(wave)
    torch.testing.assert_close(torch.sigmoid(clip_logits(model, features, mask)), model.classify(wave))


def test_stopped_run_resumes_to_the_uninterrupted_result(data_dir: Path, tmp_path: Path) -> None:
    # Dropout and SpecAugment draw from the torch RNG, so the restored RNG state matters too.
    top = {"save_every": 0}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = ["--set", "optim.max_steps=4", "--set", "sound_encoder.spec_augment=true", "--no-progress"]
    assert main(["train", str(_recipe(tmp_path, data_dir, straight, **top)), *overrides]) == 0
    recipe = str(_recipe(tmp_path, data_dir, resumed, **top))
    assert main(["train", recipe, *overrides, "--set", "stop_at_step=2"]) == 0
    assert not (resumed / FINAL_FILE).exists()
    state = torch.load(resumed / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["state"] and state["torch_rng"].dtype == torch.uint8

    assert main(["train", recipe, *overrides]) == 0  # the same command again: resumes at step 2
    state, reference = load_state(resumed / STATE_FILE), load_state(straight / STATE_FILE)
    assert state["step"] == 4
    assert [h["step"] for h in state["history"] if h["kind"] == "train"] == [1, 2, 3, 4]
    assert [h["loss"] for h in state["history"]] == pytest.approx([h["loss"] for h in reference["history"]])
    for key, value in state["model"].items():
        torch.testing.assert_close(value, reference["model"][key], msg=key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sound_encoder.frame_loss_weight=-1"], "sound_encoder.frame_loss_weight must be >= 0, got -1"),
        (["sound_encoder.max_secs=2"], "unknown key sound_encoder.max_secs"),
        (["sound_encoder.max_seconds=0.1"], "sound_encoder.max_seconds must be >= 0.175 s"),
        (["sound_encoder.beats.encoder_layerz=2"], "unknown key sound_encoder.beats.encoder_layerz"),
        (["sound_encoder.beats.conv_pos_groups=5"], "sound_encoder.beats: .*not divisible by conv_pos_groups 5"),
        (["sound_encoder.beats.predictor_class=3"], "sound_encoder.beats.predictor_class is set from the training labels"),
        (["optim.grad_accum=2"], "optim.grad_accum: stage 'sound_encoder' .* needs 1, got 2"),
        (["optim.scheduler=linear"], "optim.scheduler: stage 'sound_encoder' .* needs 'cosine', got 'linear'"),
        (["device=cuda"], "device: stage 'sound_encoder' .* got 'cuda'"),
        (["model.init_from=x"], "stage 'sound_encoder' has no \\[model\\] section"),
        (["stage=align", "model.init_from=x"], "\\[sound_encoder\\] is read only by stage 'sound_encoder'"),
    ],
)
def test_bad_recipe_fields_are_named(data_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    recipe = _recipe(tmp_path, data_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        load_train_config(recipe, overrides)


def test_cli_reports_user_errors_in_one_line(data_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = str(_recipe(tmp_path, data_dir, tmp_path / "run"))
    assert main(["train", recipe, "--set", "sound_encoder.time_masks=-1"]) == 2
    assert "sound_encoder.time_masks must be >= 0, got -1" in capsys.readouterr().err
    assert main(["train", recipe, "--set", f"data.dir={tmp_path / 'empty'}", "--no-progress"]) == 2
    assert "no train items" in capsys.readouterr().err
    (tmp_path / "run" / STATE_FILE).write_bytes(b"not a checkpoint")
    assert main(["train", recipe, "--no-progress"]) == 2
    assert "last.pt is not a readable sound-encoder training state checkpoint" in capsys.readouterr().err


def test_state_with_missing_parts_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    torch.save({"step": 3, "model": {}}, path)
    with pytest.raises(CheckpointError, match="missing \\['wall_seconds', 'labels'"):
        load_state(path)


def test_train_refuses_another_stage() -> None:
    config = TrainConfig(data=DataSection(dir="data"), model=ModelSection(init_from="some/folder"))
    with pytest.raises(ConfigError, match="stage must be 'sound_encoder'"):
        train(config)
