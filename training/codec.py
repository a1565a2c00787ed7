"""Training the nano codec (:class:`omnivox.decoders.codec.MelCodec`) on omnivox synthetic audio.

Two phases, both in one resumable run (``omnivox train recipes/nano_codec.toml``):

1. **Quantiser** (once, seconds to minutes): per-bin mean/std of log-mel frames from
   ``codec.kmeans_frames`` frames of training audio, then residual k-means: codebook ``k`` is
   fitted to what codebooks ``< k`` leave. Empty clusters are re-seeded with the worst-fitted
   frames, so every code is used.
2. **Decoder** (the rest of the run): random crops of training clips are encoded (quantised
   frames, no gradient) and decoded; the loss compares the resynthesis with the original at
   several STFT resolutions: L1 of log-mel, L1 of log-magnitude and spectral convergence.
   No discriminator: it would double the cost per step on CPU, and the target is
   intelligibility (Whisper WER, STOI), which these losses serve.

Batches are a function of ``(seed, step)`` only, so a resumed run sees exactly the data an
uninterrupted one would. Outputs in ``out_dir``: ``last.pt`` (resumable), ``history.jsonl``,
``loss.png`` and, at ``optim.max_steps``, the codec folder ``codec/`` (``codec.json`` +
``codec.safetensors``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnivox.decoders.codec import MelCodec, MelCodecConfig, save_mel_codec
from omnivox.encoders.base import SAMPLE_RATE
from omnivox.errors import CheckpointError
from omnivox.training.config import CodecSection, ConfigError, TrainConfig
from omnivox.training.data import iter_jsonl
from omnivox.training.sound_encoder import (
    Clip,
    PartResult,
    _save_state,
    begin_part_run,
    load_part_state,
    load_split,
    lr_lambda,
    make_optimizer,
    read_audio,
)

logger = logging.getLogger(__name__)

STATE_FILE = "last.pt"
FINAL_DIR = "codec"
STATE_KEYS = ("step", "codec_cfg", "codec", "optimizer", "scheduler", "history", "wall_seconds")


def codec_config(section: CodecSection) -> MelCodecConfig:
    """The recipe's ``[codec.model]`` over the defaults (16 kHz is fixed: the datagen rate)."""
    try:
        cfg = MelCodecConfig.from_dict(dict(section.model))
    except (CheckpointError, TypeError) as err:
        raise ConfigError(f"codec.model: {err}") from None
    if cfg.sample_rate != SAMPLE_RATE:
        raise ConfigError(f"codec.model.sample_rate must be {SAMPLE_RATE} (the data's rate), got {cfg.sample_rate}")
    return cfg


# --------------------------------------------------------------------------------------------
# Quantiser: statistics and residual k-means
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_frames(codec: MelCodec, clips: list[Clip], count: int, seed: int) -> torch.Tensor:
    """Log-mel frames ``[N <= count, M]`` of whole training clips taken in a seeded random order."""
    order = np.random.default_rng(seed).permutation(len(clips))
    frames, total = [], 0
    for i in order:
        wav = torch.from_numpy(read_audio(clips[i].audio))[None]
        mel = codec.log_mel(wav)[0]  # [T, M]
        frames.append(mel)
        total += len(mel)
        if total >= count:
            break
    return torch.cat(frames)[:count]


@torch.no_grad()
def nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid ``[N]`` and the squared distance to it ``[N]``."""
    idx, dist = [], []
    c2 = centroids.pow(2).sum(-1)
    for part in points.split(chunk):
        d = part.pow(2).sum(-1, keepdim=True) + c2 - 2 * part @ centroids.T  # [n, C]
        m = d.min(-1)
        idx.append(m.indices)
        dist.append(m.values.clamp(min=0))
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means ``[N, M] -> [k, M]``, initialised from random points; an emptied
    cluster takes the point farthest from its centroid (so no code is dead)."""
    if len(points) < k:
        raise ConfigError(f"codec.kmeans_frames: {len(points)} frames cannot fit {k} codes; use more frames or a smaller codebook")
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iters):
        idx, dist = nearest(points, centroids)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, idx, points)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = (~filled).nonzero().flatten()
        if len(empty):
            centroids[empty] = points[dist.topk(len(empty)).indices]
    return centroids


@torch.no_grad()
def fit_quantizer(codec: MelCodec, frames: torch.Tensor, iters: int, seed: int, progress: bool = True) -> dict[str, float]:
    """Set ``codec``'s statistics and codebooks from log-mel ``frames [N, M]``; returns the
    fraction of variance left after each codebook (``residual_k``)."""
    from tqdm import tqdm

    codec.mel_mean.copy_(frames.mean(0))
    codec.mel_std.copy_(frames.std(0).clamp(min=1e-3))
    residual = codec.normalize(frames)
    total = residual.pow(2).sum().item()
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for k in tqdm(range(codec.num_codebooks), desc="codec k-means", disable=not progress):
        book = kmeans(residual, codec.codebook_size, iters, generator)
        codec.codebooks[k].copy_(book)
        idx, _ = nearest(residual, book)
        residual = residual - book[idx]
        report[f"residual_{k + 1}"] = residual.pow(2).sum().item() / total
        logger.info("codebook %d: %.4f of the variance left", k + 1, report[f"residual_{k + 1}"])
    return report


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
class SpectralLoss(nn.Module):
    """Multi-resolution spectral distance between waveforms ``[B, S]``: per resolution, L1 of
    log-mel (weight ``mel_weight``) + L1 of log-magnitude + spectral convergence (``stft_weight``)."""

    def __init__(self, resolutions: tuple[tuple[int, int], ...], n_mels: int, mel_weight: float, stft_weight: float) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.resolutions = resolutions
        self.mel_weight, self.stft_weight = mel_weight, stft_weight
        for n_fft, _ in resolutions:
            fbank = mel_filter_bank(n_fft // 2 + 1, n_mels, 0.0, SAMPLE_RATE / 2, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
            self.register_buffer(f"mel_{n_fft}", torch.tensor(fbank.T, dtype=torch.float32), persistent=False)
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def forward(self, target: torch.Tensor, output: torch.Tensor) -> dict[str, torch.Tensor]:
        mel = stft = sc = 0.0
        for n_fft, hop in self.resolutions:
            window = getattr(self, f"window_{n_fft}")
            spec = torch.stft(torch.cat([target, output]), n_fft, hop, window=window, return_complex=True).abs()
            s, s_hat = spec.chunk(2)  # [B, F, T]
            basis = getattr(self, f"mel_{n_fft}")
            mel = mel + F.l1_loss(torch.log(basis @ s_hat + 1e-5), torch.log(basis @ s + 1e-5))
            stft = stft + F.l1_loss(torch.log(s_hat + 1e-5), torch.log(s + 1e-5))
            sc = sc + torch.linalg.norm(s - s_hat) / torch.linalg.norm(s).clamp(min=1e-5)
        n = len(self.resolutions)
        mel, stft, sc = mel / n, stft / n, sc / n
        return {"loss": self.mel_weight * mel + self.stft_weight * (stft + sc), "mel": mel, "log_mag": stft, "sc": sc}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
NATURAL_ENGINES = ("kokoro", "piper")  # neural voices trained on recordings of people


def natural_clips(data_dir: str | Path, split: str, clips: list[Clip]) -> list[int]:
    """Indices of ``clips`` spoken by a natural-sounding engine (``metadata.voice.engine``)."""
    engines = {}
    for _, item in iter_jsonl(Path(data_dir) / f"{split}.jsonl"):
        voice = (item.get("metadata") or {}).get("voice") or {}
        engines[str(item.get("id"))] = voice.get("engine") if isinstance(voice, dict) else None
    return [i for i, clip in enumerate(clips) if engines.get(clip.id) in NATURAL_ENGINES]


def make_batch(
    clips: list[Clip], step: int, batch_size: int, seed: int, samples: int, gain_db: float,
    natural: list[int] | None = None, natural_share: float = 0.0,
) -> torch.Tensor:
    """Random crops ``[B, samples]`` (zero-padded), a function of ``(seed, step)`` only; each row
    comes from the ``natural`` clips with probability ``natural_share`` (when there are any)."""
    rng = np.random.default_rng([seed, step])
    out = np.zeros((batch_size, samples), dtype=np.float32)
    picks = rng.integers(0, len(clips), batch_size)
    if natural and natural_share > 0:
        use = rng.random(batch_size) < natural_share
        picks = np.where(use, np.asarray(natural)[rng.integers(0, len(natural), batch_size)], picks)
    for row, i in enumerate(picks):
        length = int(clips[i].duration * SAMPLE_RATE)
        start = int(rng.integers(0, max(1, length - samples)))
        audio = read_audio(clips[i].audio, start, start + samples)
        gain = 10 ** (rng.uniform(-gain_db, gain_db) / 20)
        out[row, : len(audio)] = np.clip(audio * gain, -1, 1)
    return torch.from_numpy(out)


def resynthesize(codec: MelCodec, wav: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """``wav [B, S]`` -> quantised -> decoded ``[B, S]`` (the decoder alone is differentiable)."""
    with torch.no_grad():
        codes = codec.quantize(codec.analyse(wav))
        z = codec.dequantize(codes)
    with torch.set_grad_enabled(grad):
        return codec.decode_frames(z)[:, 0, : wav.shape[-1]]


@torch.no_grad()
def validate(codec: MelCodec, loss_fn: SpectralLoss, clips: list[Clip], seconds: float) -> dict[str, float]:
    """Mean spectral losses over the first ``seconds`` of each validation clip long enough to score."""
    codec.eval()
    sums: dict[str, float] = {}
    scored = 0
    for clip in clips:
        wav = torch.from_numpy(read_audio(clip.audio, 0, int(seconds * SAMPLE_RATE)))[None]
        usable = wav.shape[-1] - (codec.config.synth_n_fft - codec.config.synth_hop)
        if usable < 4096:  # too short for the 2048-point loss: not scored
            continue
        parts = loss_fn(wav[:, :usable], resynthesize(codec, wav, grad=False)[:, :usable])
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        scored += 1
    codec.train()
    return {k: v / max(1, scored) for k, v in sums.items()}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def load_state(path: Path) -> dict[str, Any]:
    return load_part_state(path, "codec", STATE_KEYS)


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "val"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key in zip(ax, ("mel", "sc"), strict=True):
        if train:
            steps = np.array([h["step"] for h in train])
            values = np.array([h[key] for h in train])
            width = max(1, len(values) // 50)
            axis.plot(steps, values, alpha=0.25, label="train")
            axis.plot(steps[width - 1 :], np.convolve(values, np.ones(width) / width, mode="valid"), label=f"train (mean of {width})")
        if val:
            axis.plot([h["step"] for h in val], [h[key] for h in val], "o-", label="validation")
        axis.set_xlabel("step")
        axis.set_ylabel({"mel": "log-mel L1", "sc": "spectral convergence"}[key])
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> PartResult:
    """Fit the quantiser, then train the decoder, as ``config`` (stage ``codec``) says."""
    from tqdm import tqdm

    section, out = begin_part_run(config, "codec", "a codec")
    optim = config.optim
    train_clips = load_split(config.data.dir, "train")
    if config.data.max_items:
        train_clips = train_clips[: config.data.max_items]
    natural = natural_clips(config.data.dir, "train", train_clips)
    logger.info("%d of %d training clips in natural voices (%s), drawn with probability %.2f",
                len(natural), len(train_clips), "/".join(NATURAL_ENGINES), section.natural_share)  # fmt: skip
    val_clips = load_split(config.data.dir, "validation")
    val_clips = val_clips[: config.data.eval_items] if config.data.eval_items else val_clips
    state_path = out / STATE_FILE
    state = load_state(state_path) if resume and state_path.is_file() else None

    cfg = MelCodecConfig.from_dict(state["codec_cfg"]) if state else codec_config(section)
    torch.manual_seed(config.seed)
    codec = MelCodec(cfg).train()
    loss_fn = SpectralLoss(tuple(tuple(r) for r in section.resolutions), 80, section.mel_weight, section.stft_weight)
    decoder = [codec.embed, codec.embed_norm, codec.blocks, codec.final_norm, codec.head]
    optimizer = make_optimizer(decoder, optim.lr, optim.weight_decay, optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.warmup_steps, optim.max_steps, optim.min_lr_ratio))
    history: list[dict[str, Any]] = []
    step, wall, quantizer = 0, 0.0, {}
    if state:
        try:
            codec.load_state_dict(state["codec"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{state_path}: does not fit the codec it describes ({err})") from None
        history, step, wall = list(state["history"]), int(state["step"]), float(state["wall_seconds"])
        quantizer = dict(state.get("quantizer", {}))
        logger.info("resumed from %s at step %d", state_path, step)
    else:
        started = time.perf_counter()
        frames = sample_frames(codec, train_clips, section.kmeans_frames, config.seed)
        logger.info("fitting %d codebooks x %d codes on %d frames", cfg.num_codebooks, cfg.codebook_size, len(frames))
        quantizer = fit_quantizer(codec, frames, section.kmeans_iters, config.seed, progress)
        quantizer["frames"] = len(frames)
        quantizer["seconds"] = time.perf_counter() - started
        wall += quantizer["seconds"]
    params = sum(p.numel() for p in codec.parameters())
    logger.info("codec decoder: %.2f M params; %.0f bit/s; %d train / %d val clips", params / 1e6, codec.bitrate,
                len(train_clips), len(val_clips))  # fmt: skip

    def snapshot() -> dict[str, Any]:
        return {
            "step": step, "wall_seconds": wall, "codec_cfg": asdict(cfg), "codec": codec.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
            "quantizer": quantizer, "config": json.loads(json.dumps(config.to_dict(), default=str)),
        }  # fmt: skip

    if not state:
        _save_state(state_path, snapshot())  # the quantiser is the slow-to-redo part of step 0
    samples = int(section.crop_seconds * SAMPLE_RATE)
    usable = samples - (cfg.synth_n_fft - cfg.synth_hop)  # the last pieces' overlap is unfinished
    target = min(optim.max_steps, config.stop_at_step) if config.stop_at_step else optim.max_steps
    bar = tqdm(total=optim.max_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="train codec")
    start_time, last_saved = time.monotonic(), step
    try:
        while step < target:
            started = time.perf_counter()
            wav = make_batch(
                train_clips, step, optim.batch_size, config.seed, samples, section.gain_db, natural, section.natural_share
            )
            parts = loss_fn(wav[:, :usable], resynthesize(codec, wav)[:, :usable])
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if optim.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(codec.parameters(), optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            wall += time.perf_counter() - started
            row = {"kind": "train", "step": step, **{k: v.item() for k, v in parts.items()}, "lr": scheduler.get_last_lr()[0]}
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", mel=f"{row['mel']:.3f}", sc=f"{row['sc']:.3f}")
            if step % config.log_every == 0:
                logger.info("step %d: loss %.4f mel %.4f log-mag %.4f sc %.4f", step, row["loss"], row["mel"], row["log_mag"], row["sc"])
            if config.eval_every and step % config.eval_every == 0 and step < optim.max_steps:
                history.append({"kind": "val", "step": step, **validate(codec, loss_fn, val_clips, section.eval_seconds)})
                logger.info("step %d validation: %s", step, {k: round(v, 4) for k, v in history[-1].items() if k not in ("kind", "step")})
            over_time = config.time_limit_minutes and time.monotonic() - start_time > 60 * config.time_limit_minutes
            if (config.save_every and step % config.save_every == 0) or step == target or over_time:
                _save_state(state_path, snapshot())
                last_saved = step
                (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
            if over_time:
                logger.warning("time limit of %.1f min reached at step %d", config.time_limit_minutes, step)
                break
    except KeyboardInterrupt:
        if step > last_saved:
            _save_state(state_path, snapshot())
        logger.warning("interrupted at step %d; rerun the same command to resume", step)
        return PartResult(step, None, finished=False, interrupted=True)
    finally:
        bar.close()

    finished = step >= optim.max_steps
    metrics: dict[str, Any] = {}
    if finished:
        metrics = validate(codec, loss_fn, val_clips, section.eval_seconds)
        history.append({"kind": "val", "step": step, **metrics})
        save_mel_codec(codec.eval(), out / FINAL_DIR)
        metrics.update(step=step, wall_seconds=wall, params=params, bitrate=codec.bitrate, quantizer=quantizer)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    try:
        plot_losses(history, out / "loss.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no loss.png")
    return PartResult(step, out / FINAL_DIR if finished else None, finished, metrics=metrics)
