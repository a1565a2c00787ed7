"""Training of the small BEATs sound encoder: a tiny model on a tiny datagen-format dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnivox.encoders.beats import BeatsConfig, BeatsEncoder, load_beats_checkpoint
from omnivox.training.sound_encoder import (
    FINAL_FILE,
    STATE_FILE,
    TrainConfig,
    average_precision,
    clip_logits,
    load_split,
    main,
    make_batch,
    train,
)

SR = 16_000
TINY = BeatsConfig(
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


def _cfg(**overrides) -> TrainConfig:
    base = dict(
        steps=12, seed=0, batch_size=4, lr=3e-3, warmup_steps=2, max_seconds=1.5, eval_max_seconds=3.0,
        spec_augment=False, save_every=4, eval_every=0, threads=2,
    )
    return TrainConfig(**{**base, **overrides})


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


def test_training_lowers_loss_and_writes_official_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = train(data_dir, out, _cfg(steps=12), TINY, progress=False)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if h["kind"] == "train"]
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert metrics["labels"] == ["tone", "white noise"] and 0.0 <= metrics["mAP"] <= 1.0
    assert (out / "loss.png").is_file() and (out / "metrics.json").is_file()

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


def test_resume_continues_at_the_right_step(data_dir: Path, tmp_path: Path) -> None:
    # A constant learning rate makes the schedule independent of the total steps.
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, spec_augment=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(data_dir, straight, _cfg(steps=4, **constant), TINY, progress=False)
    train(data_dir, resumed, _cfg(steps=2, save_every=2, **constant), TINY, progress=False)
    assert torch.load(resumed / STATE_FILE, weights_only=False)["step"] == 2
    assert main(["--data", str(data_dir), "--out", str(resumed), "--steps", "4", "--batch-size", "4", "--lr", "3e-3",
                 "--warmup-steps", "0", "--min-lr-ratio", "1.0", "--max-seconds", "1.5", "--eval-max-seconds", "3.0",
                 "--eval-every", "0", "--no-progress", "--config", str(_recipe(tmp_path))]) == 0
    state = torch.load(resumed / STATE_FILE, weights_only=False)
    assert state["step"] == 4
    assert [h["step"] for h in state["history"] if h["kind"] == "train"] == [1, 2, 3, 4]
    reference = torch.load(straight / STATE_FILE, weights_only=False)["model"]
    for key, value in state["model"].items():
        torch.testing.assert_close(value, reference[key], msg=key)


def _recipe(tmp_path: Path) -> Path:
    """A recipe with the tiny architecture (the flags override its [train] table)."""
    path = tmp_path / "tiny.toml"
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dataclasses.asdict(TINY).items()
                      if k in {"embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                               "encoder_attention_heads", "conv_pos", "conv_pos_groups", "num_buckets",
                               "max_distance"})
    path.write_text(f"[train]\nseed = 0\nspec_augment = true\nsave_every = 4\n\n[model]\n{model}\n")
    return path


def test_cli_reports_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no train items" in capsys.readouterr().err
