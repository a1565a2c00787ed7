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
function of ``(seed, step)`` only (fresh numpy generators per step, no global numpy state), so
a resumed run sees exactly the data an uninterrupted one would.

Configured by a recipe of stage ``sound_encoder`` (:class:`~omnivox.training.config.TrainConfig`
with its :class:`~omnivox.training.config.SoundEncoderSection`) and run like every recipe::

    omnivox train recipes/nano_beats.toml --set vars.dataset=/work/data/synth-v1

Outputs in ``out_dir``: ``last.pt`` (resumable state, tensors and plain values only, read back
with ``torch.load(..., weights_only=True)``), ``history.jsonl``, ``loss.png`` and, when the run
reaches ``optim.max_steps``, ``beats_nano.pt`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from omnivox.encoders.base import SAMPLE_RATE, torch_load_checkpoint
from omnivox.encoders.beats import (
    FRAME_LENGTH_MS,
    FRAME_SHIFT_MS,
    BEATs,
    BeatsConfig,
    build_beats,
    save_checkpoint,
)
from omnivox.errors import AudioInputError, CheckpointError, UserInputError
from omnivox.training.config import ConfigError, SoundEncoderSection, TrainConfig

logger = logging.getLogger(__name__)

WINDOW = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400 samples per fbank frame
HOP = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160 samples between fbank frames
MIN_CROP_SECONDS = (WINDOW + 15 * HOP) / SAMPLE_RATE  # one patch row of 16 fbank frames
SPLITS = ("train", "validation", "test")
STATE_FILE = "last.pt"
FINAL_FILE = "beats_nano.pt"


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------
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


def beats_config(overrides: dict[str, Any]) -> BeatsConfig:
    """The architecture of a recipe: ``NANO_BEATS`` with the ``[sound_encoder.beats]`` fields set.

    Raises:
        ConfigError: an unknown field, or a value ``BeatsConfig`` rejects (the message names it).
    """
    known = {f.name for f in dataclasses.fields(BeatsConfig) if f.init}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown key sound_encoder.beats.{unknown[0]}; known keys here: {sorted(known)}")
    try:
        return BeatsConfig(**{**NANO_BEATS.to_dict(), **overrides})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sound_encoder.beats: {err}") from None


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
        UserInputError: the folder has neither a manifest nor items of ``split``, or a line is not JSON.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(data_dir)
    manifest = root / f"{split}.jsonl"
    if manifest.is_file():
        items = []
        for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserInputError(f"{manifest}:{number}: not valid JSON ({err})") from None
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
        raise UserInputError(f"data.dir {root}: no {split} items (neither {manifest.name} nor items/*.json of that split)")
    try:
        clips = [clip_from_item(item, root, include_background) for item in items]
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{source}: an item lacks or mistypes a field ({type(err).__name__}: {err})") from None
    logger.info("%s: %d clips, %.2f h from %s", split, len(clips), sum(c.duration for c in clips) / 3600, source)
    return clips


def label_vocabulary(clips: Sequence[Clip]) -> list[str]:
    """The sorted labels that occur in ``clips`` (class index = position)."""
    return sorted(set().union(*(c.labels for c in clips)))


def read_audio(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Samples ``[start, stop)`` of a 16 kHz file as float32 mono ``[S]``.

    Raises:
        AudioInputError: the file is missing or unreadable, or not at 16 kHz.
    """
    try:
        audio, rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError) as err:
        raise AudioInputError(f"{path}: cannot read audio ({err})") from None
    if rate != SAMPLE_RATE:
        raise AudioInputError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE}")
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
                raise UserInputError(f"clip {clip.id}: label {event.label!r} is not in the label set {list(labels)}")
            on, off = event.onset - start, event.offset - start  # crop time
            overlap = min(end, event.offset) - max(start, event.onset)
            if overlap >= min(min_overlap_seconds, 0.5 * (event.offset - event.onset)) and overlap > 0:
                clip_targets[b, index[event.label]] = 1.0
            active = (centres >= on) & (centres < off)  # [Tp]
            frame_targets[b, active, index[event.label]] = 1.0
    frame_targets *= frame_mask.unsqueeze(-1)
    return Batch(waveforms, padding_mask, clip_targets, frame_targets, frame_mask)


def batch_plan(
    clips: Sequence[Clip], step: int, batch_size: int, seed: int, max_seconds: float
) -> tuple[list[int], list[float]]:
    """Clip indices and crop starts of training step ``step``: a function of (seed, step) only.

    Epochs are seeded permutations of the training set, walked ``batch_size`` clips at a time.
    """
    first = step * batch_size
    indices = []
    for k in range(first, first + batch_size):
        epoch, position = divmod(k, len(clips))
        order = np.random.default_rng([seed, epoch]).permutation(len(clips))
        indices.append(int(order[position]))
    rng = np.random.default_rng([seed, 1_000_003, step])
    starts = [float(rng.uniform(0.0, max(0.0, clips[i].duration - max_seconds))) for i in indices]
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

    def __init__(self, section: SoundEncoderSection) -> None:
        self.section = section

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if not module.training:
            return None
        fbank = inputs[0].clone()  # [B, 1, F, M]
        b, _, frames, bins = fbank.shape
        for i in range(b):
            for _ in range(self.section.time_masks):
                width = int(torch.randint(0, self.section.time_mask_frames + 1, ()))
                t0 = int(torch.randint(0, max(1, frames - width), ()))
                fbank[i, :, t0 : t0 + width, :] = 0.0
            for _ in range(self.section.freq_masks):
                width = int(torch.randint(0, self.section.freq_mask_bins + 1, ()))
                f0 = int(torch.randint(0, max(1, bins - width), ()))
                fbank[i, :, :, f0 : f0 + width] = 0.0
        return (fbank, *inputs[1:])


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps`` (``optim.scheduler = "cosine"``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(
    modules: Sequence[nn.Module], lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW (eps 1e-6) with weight decay on matrices only (not biases, norms, gains, or bias tables)."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-6)


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
    model: BEATs,
    frame_head: FrameHead | None,
    clips: Sequence[Clip],
    labels: Sequence[str],
    section: SoundEncoderSection,
    batch_size: int,
    max_items: int = 0,
) -> dict[str, Any]:
    """Validation metrics on the first ``section.eval_max_seconds`` of each of the first
    ``max_items`` clips (0: all), ``batch_size`` at a time (model left in eval mode).

    Returns:
        ``mAP`` (clip level, classes with positives), ``accuracy`` (mean per-class accuracy at
        0.5), ``exact_match`` (all labels right), ``frame_mAP`` (per time patch, frame head),
        ``loss`` (clip BCE) and ``per_class`` {label: {ap, accuracy, positives}}.
    """
    model.eval()
    if frame_head is not None:
        frame_head.eval()
    chosen = list(clips[:max_items] if max_items else clips)
    chosen.sort(key=lambda c: c.duration)  # similar lengths together: less padding
    patch = model.cfg.input_patch_size
    probs, targets, frame_probs, frame_targets, losses = [], [], [], [], []
    for i in range(0, len(chosen), batch_size):
        group = chosen[i : i + batch_size]
        batch = make_batch(group, [0.0] * len(group), section.eval_max_seconds, labels, patch, section.min_overlap_seconds)
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
# The resumable state: tensors, state dicts and plain Python values only, so that it loads with
# ``torch.load(..., weights_only=True)``. The data order needs no state (see ``batch_plan``).
STATE_KEYS = (
    "step", "wall_seconds", "labels", "model_cfg", "model", "frame_head", "optimizer", "scheduler", "torch_rng", "history",
)  # fmt: skip


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash mid-write leaves the previous state intact)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_part_state(path: Path, what: str, keys: Sequence[str]) -> dict[str, Any]:
    """Read a resumable state of a ``what`` run (``weights_only=True``: no code runs from the file).

    Raises:
        CheckpointError: unreadable, or without ``keys`` (the missing ones are named).
    """
    state = torch_load_checkpoint(path, f"{what} training state")
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a {what} training state (missing {missing})")
    return state


def load_state(path: Path) -> dict[str, Any]:
    """Read a resumable state written by :func:`train`."""
    return load_part_state(path, "sound-encoder", STATE_KEYS)


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
    if val:
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class PartResult:
    """How a run of a stage that trains one part from scratch ended (``sound_encoder``, ``codec``,
    ``talker``; as ``omnivox.training.trainer.TrainResult`` for the LLM stages).

    Attributes:
        step: optimizer steps done.
        checkpoint: what the run made (``out_dir/beats_nano.pt``, ``out_dir/codec``,
            ``out_dir/talker``) when it reached ``optim.max_steps``, else None.
        finished: the run reached ``optim.max_steps``.
        interrupted: stopped by Ctrl-C (the state at the last finished step is saved).
        metrics: the final validation metrics (with ``step``, ``wall_seconds``, ``params``,
            ``labels``) when finished, else empty.
    """

    step: int
    checkpoint: Path | None
    finished: bool
    interrupted: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


def begin_part_run(config: TrainConfig, stage: str, what: str) -> tuple[Any, Path]:
    """The start of a part-training run: ``config`` must be of ``stage`` (training ``what``);
    sets the torch threads and makes ``out_dir``. Returns the stage's section and ``out_dir``."""
    section = getattr(config, stage, None)
    if config.stage != stage or section is None:
        raise ConfigError(f"stage must be {stage!r} to train {what}, got {config.stage!r}")
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return section, out


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> PartResult:
    """Train a BEATs sound encoder as ``config`` (stage ``sound_encoder``) says.

    Writes ``out_dir/last.pt`` every ``save_every`` steps and where the run stops
    (``optim.max_steps``, ``stop_at_step``, ``time_limit_minutes``, Ctrl-C); at ``optim.max_steps``
    also ``beats_nano.pt`` (official format) and ``metrics.json``.

    Args:
        config: a recipe of stage ``sound_encoder`` (train split to train on, validation split to
            validate on, ``data.eval_items`` of them, 0: all).
        resume: continue from ``out_dir/last.pt`` when it exists.
        progress: show a tqdm bar.

    Raises:
        ConfigError: ``config`` is not of stage ``sound_encoder``.
        UserInputError: the dataset is missing or malformed (``AudioInputError`` for audio files).
        CheckpointError: ``last.pt`` is unreadable or does not fit the data.
    """
    from tqdm import tqdm

    section, out = begin_part_run(config, "sound_encoder", "a sound encoder")
    optim = config.optim
    train_clips = load_split(config.data.dir, "train", section.include_background)
    if config.data.max_items:
        train_clips = train_clips[: config.data.max_items]
    val_clips = load_split(config.data.dir, "validation", section.include_background)
    state_path = out / STATE_FILE
    state = load_state(state_path) if resume and state_path.is_file() else None
    if state is None and state_path.is_file():
        logger.warning("%s exists but resume is off: starting from step 0", state_path)

    labels = list(state["labels"]) if state else label_vocabulary(train_clips)
    unseen = sorted(set().union(*(c.labels for c in train_clips)) - set(labels))
    if unseen:
        raise CheckpointError(
            f"{state_path}: trained on labels {labels}, but the training data also has {unseen}; "
            "train afresh with --no-resume (or another out_dir)"
        )
    unknown = sorted(set().union(*(c.labels for c in val_clips)) - set(labels))
    if unknown:
        logger.warning("validation labels not seen in training are ignored: %s", unknown)
        val_clips = [
            dataclasses.replace(c, events=tuple(e for e in c.events if e.label in labels)) for c in val_clips
        ]
    if state:
        try:
            model_cfg = BeatsConfig.from_dict(state["model_cfg"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{state_path}: invalid model_cfg ({err})") from None
    else:
        model_cfg = dataclasses.replace(beats_config(section.beats), finetuned_model=True, predictor_class=len(labels))
    model = build_beats(model_cfg, seed=config.seed).train()
    torch.manual_seed(config.seed)  # the frame head's init, then dropout and SpecAugment draws
    frame_head = FrameHead(model_cfg.encoder_embed_dim, len(labels), model_cfg.tokens_per_patch_row)
    optimizer = make_optimizer([model, frame_head], optim.lr, optim.weight_decay, optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)
    )
    history: list[dict[str, Any]] = []
    step, wall = 0, 0.0
    if state:
        try:
            model.load_state_dict(state["model"])
            frame_head.load_state_dict(state["frame_head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(f"{state_path}: does not fit the model it describes ({err})") from None
        history, step, wall = list(state["history"]), int(state["step"]), float(state["wall_seconds"])
        logger.info("resumed from %s at step %d", state_path, step)
        saved = state.get("config", {})  # states before the recipe format have no "config"
        now = json.loads(json.dumps(config.to_dict(), default=str))
        changed = [k for k in ("sound_encoder", "data", "optim", "seed") if k in saved and saved[k] != now[k]]
        if changed:
            logger.warning("resuming %s with changed settings in %s", state_path, changed)
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "BEATs %d layers x %d, FFN %d, %d heads: %.2f M params; %d classes %s; %d train / %d val clips",
        model_cfg.encoder_layers, model_cfg.encoder_embed_dim, model_cfg.encoder_ffn_embed_dim,
        model_cfg.encoder_attention_heads, params / 1e6, len(labels), labels, len(train_clips), len(val_clips),
    )
    hook = model.patch_embedding.register_forward_pre_hook(SpecAugment(section)) if section.spec_augment else None

    def snapshot(torch_rng: torch.Tensor | None = None) -> dict[str, Any]:
        return {
            "step": step, "wall_seconds": wall, "labels": labels, "model_cfg": model_cfg.to_dict(),
            "config": json.loads(json.dumps(config.to_dict(), default=str)),
            "model": model.state_dict(), "frame_head": frame_head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state() if torch_rng is None else torch_rng, "history": history,
        }  # fmt: skip

    def validate() -> dict[str, Any]:
        head = frame_head if section.frame_loss_weight > 0 else None
        metrics = evaluate(model, head, val_clips, labels, section, optim.batch_size, config.data.eval_items)
        history.append({"kind": "val", "step": step, **{k: v for k, v in metrics.items() if k != "per_class"}})
        logger.info(
            "step %d validation: mAP %.3f accuracy %.3f exact %.3f frame mAP %.3f loss %.4f",
            step, metrics["mAP"], metrics["accuracy"], metrics["exact_match"], metrics.get("frame_mAP", float("nan")),
            metrics["loss"],
        )
        model.train()
        frame_head.train()
        return metrics

    target = min(optim.max_steps, config.stop_at_step) if config.stop_at_step else optim.max_steps
    bar = tqdm(total=optim.max_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="train sound_encoder")
    patch = model_cfg.input_patch_size
    start_time, last_saved = time.monotonic(), step
    rng_done = torch.get_rng_state()  # the RNG after the last finished step: what a resumed run continues from
    try:
        while step < target:
            started = time.perf_counter()
            indices, starts = batch_plan(train_clips, step, optim.batch_size, config.seed, section.max_seconds)
            batch = make_batch(
                [train_clips[i] for i in indices], starts, section.max_seconds, labels, patch, section.min_overlap_seconds
            )
            features, token_mask = model.extract_features(batch.waveforms, batch.padding_mask)  # [B, N, D]
            clip_loss = F.binary_cross_entropy_with_logits(clip_logits(model, features, token_mask), batch.clip_targets)
            loss = clip_loss
            frame_loss = torch.zeros(())
            if section.frame_loss_weight > 0:
                frame = frame_head(features)  # [B, Tp, C]
                frame_loss = F.binary_cross_entropy_with_logits(
                    frame[batch.frame_mask], batch.frame_targets[batch.frame_mask]
                )
                loss = loss + section.frame_loss_weight * frame_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.max_grad_norm > 0:
                nn.utils.clip_grad_norm_([*model.parameters(), *frame_head.parameters()], optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            rng_done = torch.get_rng_state()
            wall += time.perf_counter() - started
            history.append({
                "kind": "train", "step": step, "loss": loss.item(), "clip_loss": clip_loss.item(),
                "frame_loss": frame_loss.item(), "lr": scheduler.get_last_lr()[0],
            })
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", clip=f"{clip_loss.item():.4f}", frame=f"{frame_loss.item():.4f}")
            if step % config.log_every == 0:
                logger.info("step %d: loss %.4f (clip %.4f, frame %.4f), lr %.2e", step, loss.item(),
                            clip_loss.item(), frame_loss.item(), scheduler.get_last_lr()[0])  # fmt: skip
            if config.eval_every and step % config.eval_every == 0 and step < optim.max_steps:
                started = time.perf_counter()
                validate()
                wall += time.perf_counter() - started
            over_time = config.time_limit_minutes and time.monotonic() - start_time > 60 * config.time_limit_minutes
            if (config.save_every and step % config.save_every == 0) or step == target or over_time:
                _save_state(state_path, snapshot())
                last_saved = step
            if over_time:
                logger.warning("time limit of %.1f min reached at step %d", config.time_limit_minutes, step)
                break
    except KeyboardInterrupt:
        if step > last_saved:
            _save_state(state_path, snapshot(rng_done))
        logger.warning("interrupted at step %d; rerun the same command to resume", step)
        return PartResult(step, None, finished=False, interrupted=True)
    finally:
        bar.close()
        if hook is not None:
            hook.remove()

    finished = step >= optim.max_steps
    metrics: dict[str, Any] = {}
    if finished:
        metrics = validate()
        model.eval()
        save_checkpoint(model, out / FINAL_FILE, dict(enumerate(labels)))
        _save_state(state_path, snapshot())
        metrics.update(step=step, wall_seconds=wall, params=params, labels=labels)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    else:
        logger.info("stopped at step %d of %d; rerun the same command to resume", step, optim.max_steps)
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    try:
        plot_losses(history, out / "loss.png")
    except ImportError:  # matplotlib is optional
        logger.warning("matplotlib is not installed: no loss.png")
    return PartResult(step, out / FINAL_FILE if finished else None, finished, metrics=metrics)
