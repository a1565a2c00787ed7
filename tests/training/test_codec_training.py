"""Training the nano codec (stage ``codec``): a tiny MelCodec on a tiny datagen-format dataset,
run as users run it (``omnivox train RECIPE``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnivox.decoders.codec import MelCodec, MelCodecConfig, load_codec
from omnivox.training.cli import main
from omnivox.training.codec import FINAL_DIR, STATE_FILE, fit_quantizer, kmeans, load_state, nearest
from omnivox.training.config import ConfigError, load_train_config

SR = 16_000
TINY = dict(n_mels=16, num_codebooks=2, codebook_size=16, dim=16, intermediate_dim=32, num_layers=2, kernel_size=5)


def _clip(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(100, 250)
    voiced = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t), 0, None)
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("validation", 2), ("test", 1)):
        rows = []
        for i in range(count):
            rel = f"audio/{split}/{i:07d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            audio = _clip(float(rng.uniform(1.0, 2.0)), rng)
            sf.write(root / rel, audio, SR, subtype="PCM_16")
            rows.append({"id": f"{split}-{i}", "audio": rel, "duration": audio.size / SR, "task": "transcription",
                         "split": split, "metadata": {"segments": [], "text": "hello"}})  # fmt: skip
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _recipe(tmp_path: Path, data_dir: Path, out: Path, max_steps: int = 6) -> Path:
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())
    path = tmp_path / f"{out.name}.toml"
    path.write_text(f"""
stage = "codec"
out_dir = "{out}"
seed = 0
save_every = 0
eval_every = 0
log_every = 1
device = "cpu"
threads = 2

[data]
dir = "{data_dir}"

[optim]
max_steps = {max_steps}
batch_size = 2
lr = 3e-3
warmup_steps = 1

[codec]
crop_seconds = 0.5
kmeans_frames = 300
kmeans_iters = 4
resolutions = [[256, 64], [512, 128]]
eval_seconds = 1.0

[codec.model]
{model}
""")
    return path


def test_kmeans_uses_every_code_and_residuals_shrink() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 4, generator=g) * 0.1 + c for c in torch.randn(8, 4, generator=g) * 3])
    centroids = kmeans(points, 8, 10, g)
    idx, dist = nearest(points, centroids)
    assert torch.bincount(idx, minlength=8).min() > 0
    assert dist.mean() < 0.05 * points.var(0).sum()  # most of the spread explained (random init: no promise of the optimum)
    # more codes than distinct points: emptied clusters are re-seeded, none stays dead
    few = torch.randn(20, 4, generator=g)
    _, dist = nearest(few, kmeans(few, 20, 3, g))
    assert dist.max() < 1e-5 * few.pow(2).sum(-1).max()  # zero up to the expanded-square rounding

    codec = MelCodec(MelCodecConfig(**TINY))
    frames = torch.randn(400, 16, generator=g) * torch.linspace(0.5, 3, 16) + 2
    report = fit_quantizer(codec, frames, iters=5, seed=0, progress=False)
    assert report["residual_1"] > report["residual_2"] > 0
    torch.testing.assert_close(codec.mel_mean, frames.mean(0))


def test_training_lowers_the_loss_and_writes_a_codec(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, data_dir, out, max_steps=40)), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / FINAL_DIR)
    codec = load_codec(out / FINAL_DIR)
    assert isinstance(codec, MelCodec) and codec.num_codebooks == 2
    history = load_state(out / STATE_FILE)["history"]
    mel = [h["mel"] for h in history if h["kind"] == "train"]
    assert len(mel) == 40 and all(math.isfinite(m) for m in mel)
    assert np.mean(mel[-5:]) < 0.8 * np.mean(mel[:5])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 40 and metrics["bitrate"] == 50 * 2 * 4 and metrics["mel"] > 0
    assert (out / "loss.png").stat().st_size > 0
    wav = torch.from_numpy(sf.read(data_dir / "audio/validation/0000000.wav", dtype="float32")[0])[None, None]
    assert codec.decode(codec.encode(wav)).shape[-1] == -(-wav.shape[-1] // 320) * 320


def test_stopped_run_resumes_to_the_uninterrupted_result(data_dir: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(_recipe(tmp_path, data_dir, straight)), "--no-progress"]) == 0
    recipe = str(_recipe(tmp_path, data_dir, resumed))
    assert main(["train", recipe, "--no-progress", "--set", "stop_at_step=3"]) == 0
    assert not (resumed / FINAL_DIR).exists() and load_state(resumed / STATE_FILE)["step"] == 3
    assert main(["train", recipe, "--no-progress"]) == 0
    state, reference = load_state(resumed / STATE_FILE), load_state(straight / STATE_FILE)
    assert [h["loss"] for h in state["history"]] == pytest.approx([h["loss"] for h in reference["history"]])
    for key, value in state["codec"].items():
        torch.testing.assert_close(value, reference["codec"][key], msg=key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["codec.model.n_fft=1000"], "codec.model: .*n_fft \\(1000\\) must be a multiple of hop_length"),
        (["codec.model.layers=3"], "codec.model: .*unknown keys \\['layers'\\]"),
        (["codec.model.sample_rate=24000"], "codec.model.sample_rate must be 16000"),
        (["codec.crop_seconds=0.1"], "codec.crop_seconds must be > 0.16 s"),
        (["codec.resolutions=[[256, 512]]"], "codec.resolutions must be \\[n_fft, hop\\] pairs"),
        (["codec.kmeans_iters=0"], "codec.kmeans_iters must be >= 1, got 0"),
        (["optim.grad_accum=2"], "optim.grad_accum: stage 'codec' .* needs 1, got 2"),
        (["model.init_from=x"], "stage 'codec' has no \\[model\\] section"),
        (["stage=sound_encoder"], "\\[codec\\] is read only by stage 'codec', not by stage 'sound_encoder'"),
    ],
)
def test_bad_recipe_fields_are_named(data_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_train_config(_recipe(tmp_path, data_dir, tmp_path / "run"), overrides)
