"""Supervised training of a small BEATs-architecture sound encoder on omnivox synthetic data.

No public BEATs weights can be had offline, so the bundled "nano" model uses a small encoder of
the BEATs architecture (:mod:`omnivox.encoders.beats`) trained here from scratch, in the spirit of
the official fine-tuned ("cpt") checkpoints::

    clip [B, S] (random crop <= max_seconds) -> BEATs.extract_features -> features [B, N = Tp * 8, D]
      -> predictor (official head) per token, mean over valid tokens -> clip logits [B, C]
         BCE against every label present in the crop (segment labels, "speech", background)
      -> mean over the 8 frequency tokens of each time patch [B, Tp, D] -> frame head (training only)
         -> frame logits [B, Tp, C], BCE against per-patch event activity from onsets/offsets

The frame loss keeps time information in the features, which the Q-Former reads window by
window. The frame head is not part of the official checkpoint format and is dropped from the
final ``beats_nano.pt`` (``{"cfg", "model", "label_dict"}``, via :func:`save_checkpoint`), so
the same loader serves real BEATs checkpoints.

Data: a datagen folder; each split is ``<split>.jsonl`` when it exists, else the ``items/*.json``
of that split whose audio file exists (the generator writes manifests last). Batches are a
function of ``(seed, step)`` only, so a resumed run sees exactly the data an uninterrupted one
would.

Entry point::

    python -m omnivox.training.sound_encoder --config recipes/nano_beats.toml \
        --data /work/data/synth-v1 --out runs/beats_nano --steps 600 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from omnivox.encoders.base import SAMPLE_RATE
from omnivox.encoders.beats import (
    FRAME_LENGTH_MS,
    FRAME_SHIFT_MS,
    BEATs,
    BeatsConfig,
    build_beats,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

WINDOW = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400 samples per fbank frame
HOP = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160 samples between fbank frames
SPLITS = ("train", "validation", "test")
STATE_FILE = "last.pt"
FINAL_FILE = "beats_nano.pt"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the ``[train]`` table of a recipe; the ``[model]`` table is a BeatsConfig).

    Attributes:
        steps: optimiser steps in all.
        seed: seeds the initial weights, the data order, the crops, dropout and SpecAugment.
        batch_size: clips per step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not on biases and norms).
        warmup_steps: linear warmup, then cosine decay to ``lr * min_lr_ratio``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: max gradient norm (0 disables clipping).
        max_seconds: random crop length of training clips (longer clips are cropped).
        eval_max_seconds: validation clips are cut to their first ``eval_max_seconds``.
        min_overlap_seconds: an event counts as present in a crop when it overlaps it this long.
        frame_loss_weight: weight of the frame-level activity loss (0 disables it).
        include_background: count the background texture (``metadata.background``) as present.
        spec_augment: mask random fbank time spans and mel bands during training.
        time_masks, time_mask_frames: number of time masks and their max width in fbank frames.
        freq_masks, freq_mask_bins: number of mel masks and their max width in mel bins.
        save_every: write the resumable state every this many steps.
        eval_every: validate every this many steps (and at the end); 0 = only at the end.
        max_eval_items: validate on at most this many clips (0 = all).
        threads: torch CPU threads.
    """

    steps: int = 600
    seed: int = 0
    batch_size: int = 12
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    max_seconds: float = 4.0
    eval_max_seconds: float = 10.0
    min_overlap_seconds: float = 0.05
    frame_loss_weight: float = 1.0
    include_background: bool = True
    spec_augment: bool = True
    time_masks: int = 2
    time_mask_frames: int = 30
    freq_masks: int = 2
    freq_mask_bins: int = 16
    save_every: int = 50
    eval_every: int = 200
    max_eval_items: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "max_eval_items", "time_masks", "freq_masks"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        min_seconds = (WINDOW + 15 * HOP) / SAMPLE_RATE
        for name in ("max_seconds", "eval_max_seconds"):
            if getattr(self, name) < min_seconds:
                raise ValueError(f"TrainConfig.{name} must be >= {min_seconds} s (one patch), got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if self.frame_loss_weight < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig: frame_loss_weight, grad_clip and weight_decay must be >= 0")


# Architecture of the nano encoder (see assets/nano/BEATS.md for the measurements behind it).
NANO_BEATS = BeatsConfig(
    embed_dim=128,
    encoder_layers=4,
    encoder_embed_dim=192,
    encoder_ffn_embed_dim=384,
    encoder_attention_heads=4,
    conv_pos=128,
    conv_pos_groups=16,
)


def load_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a recipe TOML: returns (``[train]`` table, ``[model]`` table), both possibly empty."""
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    unknown = sorted(set(recipe) - {"train", "model", "data", "out"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown} (expected [train], [model], data, out)")
    train, model = dict(recipe.get("train", {})), dict(recipe.get("model", {}))
    for key in ("data", "out"):
        if key in recipe:
            train[key] = recipe[key]
    return train, model


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One labelled sound event, in seconds from the start of the clip."""

    label: str
    onset: float
    offset: float


@dataclass(frozen=True)
class Clip:
    """One audio file with its events."""

    id: str
    audio: Path
    duration: float
    events: tuple[Event, ...]

    @property
    def labels(self) -> set[str]:
        return {e.label for e in self.events}


def clip_from_item(item: dict[str, Any], root: Path, include_background: bool = True) -> Clip:
    """A :class:`Clip` from a datagen manifest line (``metadata.segments``, optional ``background``)."""
    meta = item.get("metadata") or {}
    duration = float(item["duration"])
    events = [Event(str(s["label"]), float(s["onset"]), float(s["offset"])) for s in meta.get("segments") or []]
    background = meta.get("background")
    if include_background and isinstance(background, dict) and "label" in background:
        events.append(Event(str(background["label"]), 0.0, duration))  # a texture under the whole clip
    return Clip(str(item["id"]), root / item["audio"], duration, tuple(events))


def load_split(data_dir: str | Path, split: str, include_background: bool = True) -> list[Clip]:
    """Clips of one split: from ``<split>.jsonl``, else from finished ``items/*.json`` of that split.

    Raises:
        FileNotFoundError: the folder has neither a manifest nor items of ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(data_dir)
    manifest = root / f"{split}.jsonl"
    if manifest.is_file():
        items = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(manifest)
    else:
        items = []
        for path in sorted((root / "items").glob("*.json")):
            try:
                item = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:  # being written right now
                continue
            if item.get("split") == split and (root / item["audio"]).is_file():
                items.append(item)
        source = f"{root / 'items'} (no {manifest.name} yet)"
    if not items:
        raise FileNotFoundError(f"no {split} items in {root}: neither {manifest.name} nor items/*.json of that split")
    clips = [clip_from_item(item, root, include_background) for item in items]
    logger.info("%s: %d clips, %.2f h from %s", split, len(clips), sum(c.duration for c in clips) / 3600, source)
    return clips


def label_vocabulary(clips: Sequence[Clip]) -> list[str]:
    """The sorted labels that occur in ``clips`` (class index = position)."""
    return sorted(set().union(*(c.labels for c in clips)))


def read_audio(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Samples ``[start, stop)`` of a 16 kHz file as float32 mono ``[S]``."""
    audio, rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE}")
    return audio.mean(axis=1)


def num_time_patches(num_samples: int, patch: int = 16) -> int:
    """Time patches (token rows of 128 // patch tokens) for ``num_samples`` samples."""
    return 0 if num_samples < WINDOW else (1 + (num_samples - WINDOW) // HOP) // patch


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        waveforms: [B, S] float32, zero-padded.
        padding_mask: [B, S] bool, True = padding.
        clip_targets: [B, C] float32 in {0, 1}.
        frame_targets: [B, Tp, C] float32 in {0, 1}, Tp = time patches of S.
        frame_mask: [B, Tp] bool, True = a valid time patch of that item.
    """

    waveforms: torch.Tensor
    padding_mask: torch.Tensor
    clip_targets: torch.Tensor
    frame_targets: torch.Tensor
    frame_mask: torch.Tensor


def make_batch(
    clips: Sequence[Clip],
    starts: Sequence[float],
    max_seconds: float,
    labels: Sequence[str],
    patch: int = 16,
    min_overlap_seconds: float = 0.05,
) -> Batch:
    """Read the crops ``[start, start + max_seconds)`` of ``clips`` and build their targets.

    A time patch t covers fbank frames ``16 t .. 16 t + 15``; it is active for an event when its
    centre time falls inside the event. A label is present in a crop when one of its events
    overlaps the crop by ``min_overlap_seconds`` (or the whole event lies inside it).
    """
    index = {label: i for i, label in enumerate(labels)}
    waves = []
    for clip, start in zip(clips, starts, strict=True):
        first = int(round(start * SAMPLE_RATE))
        wave = read_audio(clip.audio, first, first + int(round(max_seconds * SAMPLE_RATE)))
        if wave.size < WINDOW + (patch - 1) * HOP:  # too short for one patch: pad with silence
            wave = np.pad(wave, (0, WINDOW + (patch - 1) * HOP - wave.size))
        waves.append(wave)
    length = max(w.size for w in waves)
    tp = num_time_patches(length, patch)
    batch = len(clips)
    waveforms = torch.zeros(batch, length)
    padding_mask = torch.ones(batch, length, dtype=torch.bool)
    clip_targets = torch.zeros(batch, len(labels))
    frame_targets = torch.zeros(batch, tp, len(labels))
    frame_mask = torch.zeros(batch, tp, dtype=torch.bool)
    centres = (torch.arange(tp) * patch * HOP + (patch * HOP + WINDOW) / 2) / SAMPLE_RATE  # [Tp] s
    for b, (clip, start, wave) in enumerate(zip(clips, starts, waves, strict=True)):
        waveforms[b, : wave.size] = torch.from_numpy(wave)
        padding_mask[b, : wave.size] = False
        frame_mask[b, : num_time_patches(wave.size, patch)] = True
        end = start + wave.size / SAMPLE_RATE
        for event in clip.events:
            if event.label not in index:
                raise ValueError(f"clip {clip.id}: label {event.label!r} is not in the label set {list(labels)}")
            on, off = event.onset - start, event.offset - start  # crop time
            overlap = min(end, event.offset) - max(start, event.onset)
            if overlap >= min(min_overlap_seconds, 0.5 * (event.offset - event.onset)) and overlap > 0:
                clip_targets[b, index[event.label]] = 1.0
            active = (centres >= on) & (centres < off)  # [Tp]
            frame_targets[b, active, index[event.label]] = 1.0
    frame_targets *= frame_mask.unsqueeze(-1)
    return Batch(waveforms, padding_mask, clip_targets, frame_targets, frame_mask)


def batch_plan(
    num_clips: int, clips: Sequence[Clip], step: int, cfg: TrainConfig
) -> tuple[list[int], list[float]]:
    """Clip indices and crop starts of training step ``step``: a function of (seed, step) only.

    Epochs are seeded permutations of the training set, walked ``batch_size`` clips at a time.
    """
    first = step * cfg.batch_size
    indices = []
    for k in range(first, first + cfg.batch_size):
        epoch, position = divmod(k, num_clips)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(num_clips)
        indices.append(int(order[position]))
    rng = np.random.default_rng([cfg.seed, 1_000_003, step])
    starts = [float(rng.uniform(0.0, max(0.0, clips[i].duration - cfg.max_seconds))) for i in indices]
    return indices, starts


# --------------------------------------------------------------------------------------------
# Model pieces used in training
# --------------------------------------------------------------------------------------------
class FrameHead(nn.Module):
    """Training-only per-time-patch classifier: [B, N = Tp * R, D] -> [B, Tp, C] logits.

    Args:
        dim: D, the encoder width.
        num_classes: C.
        tokens_per_row: R, tokens per time patch (128 // patch, 8 for BEATs).
    """

    def __init__(self, dim: int, num_classes: int, tokens_per_row: int) -> None:
        super().__init__()
        self.tokens_per_row = tokens_per_row
        self.proj = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        rows = features.view(b, n // self.tokens_per_row, self.tokens_per_row, d).mean(dim=2)  # [B, Tp, D]
        return self.proj(rows)  # [B, Tp, C]


def clip_logits(model: BEATs, features: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The official predictor before its sigmoid: per-token logits averaged over valid tokens.

    Args:
        features: [B, N, D] from ``model.extract_features``.
        token_mask: [B, N] bool, True = padding, or None.

    Returns:
        [B, C] logits; ``sigmoid`` of them is what ``model.classify`` returns.
    """
    assert model.predictor is not None
    logits = model.predictor(model.predictor_dropout(features))  # [B, N, C]
    if token_mask is None:
        return logits.mean(dim=1)
    logits = logits.masked_fill(token_mask.unsqueeze(-1), 0.0)
    return logits.sum(dim=1) / (~token_mask).sum(dim=1, keepdim=True).clamp(min=1)  # [B, C]


class SpecAugment:
    """Forward pre-hook on ``patch_embedding``: zero random time spans and mel bands of the
    normalised fbank [B, 1, F, 128] (0 is close to the fbank mean after BEATs' normalisation)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if not module.training:
            return None
        fbank = inputs[0].clone()  # [B, 1, F, M]
        b, _, frames, bins = fbank.shape
        for i in range(b):
            for _ in range(self.cfg.time_masks):
                width = int(torch.randint(0, self.cfg.time_mask_frames + 1, ()))
                t0 = int(torch.randint(0, max(1, frames - width), ()))
                fbank[i, :, t0 : t0 + width, :] = 0.0
            for _ in range(self.cfg.freq_masks):
                width = int(torch.randint(0, self.cfg.freq_mask_bins + 1, ()))
                f0 = int(torch.randint(0, max(1, bins - width), ()))
                fbank[i, :, :, f0 : f0 + width] = 0.0
        return (fbank, *inputs[1:])


def lr_lambda(cfg: TrainConfig) -> Any:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(modules: Sequence[nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms, gains, or bias tables)."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class (mean precision at each positive, ranked by score); NaN without positives."""
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = targets[order]
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision * hits).sum() / positives)


@torch.no_grad()
def evaluate(
    model: BEATs, frame_head: FrameHead | None, clips: Sequence[Clip], labels: Sequence[str], cfg: TrainConfig
) -> dict[str, Any]:
    """Validation metrics on the first ``eval_max_seconds`` of each clip (model left in eval mode).

    Returns:
        ``mAP`` (clip level, classes with positives), ``accuracy`` (mean per-class accuracy at
        0.5), ``exact_match`` (all labels right), ``frame_mAP`` (per time patch, frame head),
        ``loss`` (clip BCE) and ``per_class`` {label: {ap, accuracy, positives}}.
    """
    model.eval()
    if frame_head is not None:
        frame_head.eval()
    chosen = list(clips[: cfg.max_eval_items] if cfg.max_eval_items else clips)
    chosen.sort(key=lambda c: c.duration)  # similar lengths together: less padding
    patch = model.cfg.input_patch_size
    probs, targets, frame_probs, frame_targets, losses = [], [], [], [], []
    for i in range(0, len(chosen), cfg.batch_size):
        group = chosen[i : i + cfg.batch_size]
        batch = make_batch(group, [0.0] * len(group), cfg.eval_max_seconds, labels, patch, cfg.min_overlap_seconds)
        features, token_mask = model.extract_features(batch.waveforms, batch.padding_mask)
        logits = clip_logits(model, features, token_mask)
        losses.append(F.binary_cross_entropy_with_logits(logits, batch.clip_targets, reduction="sum").item())
        probs.append(torch.sigmoid(logits).numpy())
        targets.append(batch.clip_targets.numpy())
        if frame_head is not None:
            frame = torch.sigmoid(frame_head(features))  # [B, Tp, C]
            frame_probs.append(frame[batch.frame_mask].numpy())
            frame_targets.append(batch.frame_targets[batch.frame_mask].numpy())
    p, t = np.concatenate(probs), np.concatenate(targets)
    per_class: dict[str, dict[str, float]] = {}
    for c, label in enumerate(labels):
        per_class[label] = {
            "ap": average_precision(p[:, c], t[:, c]),
            "accuracy": float(((p[:, c] >= 0.5) == (t[:, c] > 0.5)).mean()),
            "positives": int(t[:, c].sum()),
        }
    aps = [v["ap"] for v in per_class.values() if not math.isnan(v["ap"])]
    result: dict[str, Any] = {
        "items": len(chosen),
        "loss": sum(losses) / p.size,
        "mAP": float(np.mean(aps)) if aps else float("nan"),
        "accuracy": float(np.mean([v["accuracy"] for v in per_class.values()])),
        "exact_match": float(((p >= 0.5) == (t > 0.5)).all(axis=1).mean()),
        "per_class": per_class,
    }
    if frame_probs:
        fp, ft = np.concatenate(frame_probs), np.concatenate(frame_targets)
        frame_aps = [average_precision(fp[:, c], ft[:, c]) for c in range(len(labels))]
        frame_aps = [a for a in frame_aps if not math.isnan(a)]
        result["frame_mAP"] = float(np.mean(frame_aps)) if frame_aps else float("nan")
    return result


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash mid-write leaves the previous state intact)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def plot_losses(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss curve PNG: training loss (smoothed) and validation clip loss / mAP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "val"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = np.array([h["step"] for h in train])
        loss = np.array([h["loss"] for h in train])
        width = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        ax[0].plot(steps, loss, alpha=0.3, label="train loss")
        ax[0].plot(steps[width - 1 :], smooth, label=f"train loss (mean of {width})")
        ax[0].plot(steps, [h["clip_loss"] for h in train], alpha=0.3, label="train clip BCE")
    if val:
        ax[0].plot([h["step"] for h in val], [h["loss"] for h in val], "o-", label="val clip BCE")
        ax[1].plot([h["step"] for h in val], [h["mAP"] for h in val], "o-", label="val mAP")
        ax[1].plot([h["step"] for h in val], [h["accuracy"] for h in val], "s-", label="val accuracy")
        if "frame_mAP" in val[0]:
            ax[1].plot([h["step"] for h in val], [h["frame_mAP"] for h in val], "^-", label="val frame mAP")
    ax[0].set_xlabel("step")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].set_xlabel("step")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    model_cfg: BeatsConfig = NANO_BEATS,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a BEATs sound encoder; write ``last.pt`` (resumable), ``beats_nano.pt``, metrics and plots.

    Args:
        data_dir: datagen folder (train split for training, validation split for validation).
        out_dir: run folder.
        cfg: training settings.
        model_cfg: architecture; ``finetuned_model`` and ``predictor_class`` are set from the labels.
        resume: continue from ``out_dir/last.pt`` when it exists.
        progress: show a tqdm bar.

    Returns:
        The final validation metrics (with ``step``, ``wall_seconds``, ``params``).
    """
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_clips = load_split(data_dir, "train", cfg.include_background)
    val_clips = load_split(data_dir, "validation", cfg.include_background)
    state_path = out / STATE_FILE
    state = torch.load(state_path, map_location="cpu", weights_only=False) if resume and state_path.is_file() else None

    labels = state["labels"] if state else label_vocabulary(train_clips)
    unknown = sorted(set().union(*(c.labels for c in val_clips)) - set(labels))
    if unknown:
        logger.warning("validation labels not seen in training are ignored: %s", unknown)
        val_clips = [
            dataclasses.replace(c, events=tuple(e for e in c.events if e.label in labels)) for c in val_clips
        ]
    if state:
        model_cfg = BeatsConfig.from_dict(state["model_cfg"])
    else:
        model_cfg = dataclasses.replace(model_cfg, finetuned_model=True, predictor_class=len(labels))
    model = build_beats(model_cfg, seed=cfg.seed).train()
    torch.manual_seed(cfg.seed)  # the frame head's init, then dropout and SpecAugment draws
    frame_head = FrameHead(model_cfg.encoder_embed_dim, len(labels), model_cfg.tokens_per_patch_row)
    optimizer = make_optimizer([model, frame_head], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    history: list[dict[str, Any]] = []
    step, wall = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        frame_head.load_state_dict(state["frame_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history, step, wall = state["history"], state["step"], state["wall_seconds"]
        logger.info("resumed from %s at step %d", state_path, step)
        changed = {k: (v, getattr(cfg, k)) for k, v in state["train_cfg"].items() if getattr(cfg, k, v) != v}
        if changed:
            logger.warning("resuming with changed settings {name: (saved, now)}: %s", changed)
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "BEATs %d layers x %d, FFN %d, %d heads: %.2f M params; %d classes %s; %d train / %d val clips",
        model_cfg.encoder_layers, model_cfg.encoder_embed_dim, model_cfg.encoder_ffn_embed_dim,
        model_cfg.encoder_attention_heads, params / 1e6, len(labels), labels, len(train_clips), len(val_clips),
    )
    hook = model.patch_embedding.register_forward_pre_hook(SpecAugment(cfg)) if cfg.spec_augment else None

    def snapshot() -> dict[str, Any]:
        return {
            "step": step, "wall_seconds": wall, "labels": labels, "model_cfg": model_cfg.to_dict(),
            "train_cfg": dataclasses.asdict(cfg), "model": model.state_dict(), "frame_head": frame_head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "history": history,
        }

    def validate() -> dict[str, Any]:
        metrics = evaluate(model, frame_head if cfg.frame_loss_weight > 0 else None, val_clips, labels, cfg)
        history.append({"kind": "val", "step": step, **{k: v for k, v in metrics.items() if k != "per_class"}})
        logger.info(
            "step %d validation: mAP %.3f accuracy %.3f exact %.3f frame mAP %.3f loss %.4f",
            step, metrics["mAP"], metrics["accuracy"], metrics["exact_match"], metrics.get("frame_mAP", float("nan")),
            metrics["loss"],
        )
        model.train()
        frame_head.train()
        return metrics

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True, desc="beats")
    patch = model_cfg.input_patch_size
    while step < cfg.steps:
        started = time.perf_counter()
        indices, starts = batch_plan(len(train_clips), train_clips, step, cfg)
        batch = make_batch(
            [train_clips[i] for i in indices], starts, cfg.max_seconds, labels, patch, cfg.min_overlap_seconds
        )
        features, token_mask = model.extract_features(batch.waveforms, batch.padding_mask)  # [B, N, D]
        clip_loss = F.binary_cross_entropy_with_logits(clip_logits(model, features, token_mask), batch.clip_targets)
        loss = clip_loss
        frame_loss = torch.zeros(())
        if cfg.frame_loss_weight > 0:
            frame = frame_head(features)  # [B, Tp, C]
            frame_loss = F.binary_cross_entropy_with_logits(
                frame[batch.frame_mask], batch.frame_targets[batch.frame_mask]
            )
            loss = loss + cfg.frame_loss_weight * frame_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_([*model.parameters(), *frame_head.parameters()], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        wall += time.perf_counter() - started
        history.append({
            "kind": "train", "step": step, "loss": loss.item(), "clip_loss": clip_loss.item(),
            "frame_loss": frame_loss.item(), "lr": scheduler.get_last_lr()[0],
        })
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", clip=f"{clip_loss.item():.4f}", frame=f"{frame_loss.item():.4f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            started = time.perf_counter()
            validate()
            wall += time.perf_counter() - started
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(state_path, snapshot())
    bar.close()
    if hook is not None:
        hook.remove()

    metrics = validate()
    model.eval()
    label_dict = dict(enumerate(labels))
    save_checkpoint(model, out / FINAL_FILE, label_dict)
    _save_state(state_path, snapshot())
    metrics.update(step=step, wall_seconds=wall, params=params, labels=labels)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    try:
        plot_losses(history, out / "loss.png")
    except ImportError:  # matplotlib is optional
        logger.warning("matplotlib is not installed: no loss.png")
    return metrics


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m omnivox.training.sound_encoder",
        description="Train the small BEATs-architecture sound encoder on datagen data (official checkpoint out).",
    )
    p.add_argument("--config", type=Path, help="recipe TOML with [train] and [model] tables")
    p.add_argument("--data", type=Path, help="datagen folder (train / validation splits)")
    p.add_argument("--out", type=Path, help="run folder (last.pt, beats_nano.pt, metrics.json, loss.png)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if field.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}[str(field.type)]
            p.add_argument(flag, type=kind, default=None)
    p.add_argument("--no-resume", action="store_true", help="start afresh even when last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: settings come from ``--config`` (if any), then the flags override them."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_table, model_table = load_recipe(args.config) if args.config else ({}, {})
        data = args.data or train_table.pop("data", None)
        out = args.out or train_table.pop("out", None)
        train_table.pop("data", None)
        train_table.pop("out", None)
        if data is None or out is None:
            raise ValueError("--data and --out are required (or data / out in the recipe)")
        for f in dataclasses.fields(TrainConfig):
            value = getattr(args, f.name)
            if value is not None:
                train_table[f.name] = value
        unknown = sorted(set(train_table) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"unknown [train] keys {unknown}")
        cfg = TrainConfig(**train_table)
        model_cfg = BeatsConfig.from_dict({**NANO_BEATS.to_dict(), **model_table})
        metrics = train(data, out, cfg, model_cfg, resume=not args.no_resume, progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_class"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
