"""Training the speech head (:class:`omnivox.decoders.talker.Talker`) on synthetic speech.

Stage ``talker`` (``omnivox train recipes/nano_talker.toml``). The training pairs are the
clean single-voice speech clips of a datagen folder (one speech segment, no sounds, no
background, no augmentation): the text as spoken (``metadata.spoken``) -> phonemes, the
voice (``metadata.voice.voice``) -> a row of the voice table, the audio -> the codec's codes
and normalised mel frames (the codec is frozen; its quantiser alone is used here).

The first run encodes every pair once into ``out_dir/pairs.pt`` (codes int16, frames float16);
later runs and resumed runs read it back. Batches are a function of ``(seed, step)`` only.
Outputs: ``last.pt`` (resumable), ``history.jsonl``, and at ``optim.max_steps`` the folder
``talker/`` (``talker.json``: config, voice table, codec folder name; ``talker.safetensors``)
and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omnivox.decoders.codec import MelCodec, load_mel_codec
from omnivox.decoders.phonemes import PHONEMES, phonemize
from omnivox.decoders.speech import TASK_ROWS, save_talker
from omnivox.decoders.talker import Talker, TalkerConfig
from omnivox.encoders.base import torch_load_checkpoint
from omnivox.errors import CheckpointError, UserInputError
from omnivox.training.config import ConfigError, TrainConfig
from omnivox.training.data import iter_jsonl
from omnivox.training.sound_encoder import (
    PartResult,
    _save_state,
    begin_part_run,
    load_part_state,
    lr_lambda,
    make_optimizer,
    read_audio,
)
from omnivox.training.speech_tasks import collate_audio, make_item, pick_task

logger = logging.getLogger(__name__)

STATE_FILE = "last.pt"
PAIRS_FILE = "pairs.pt"
FINAL_DIR = "talker"


@dataclass(frozen=True)
class Pair:
    """One training utterance."""

    phonemes: torch.Tensor  # [N] int64
    codes: torch.Tensor  # [K, T] int16
    frames: torch.Tensor  # [T, M] float16, the codec's normalised mel
    voice: str
    path: str = ""  # the clip (tasks on audio mix it anew each step)


def clean_speech_items(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """Items of one speaker saying one sentence with nothing else in the clip."""
    out = []
    for _, item in iter_jsonl(data_dir / f"{split}.jsonl"):
        meta = item.get("metadata") or {}
        segments = meta.get("segments") or []
        voice = meta.get("voice") or {}
        spoken = meta.get("spoken") or meta.get("text")
        if (
            len(segments) == 1 and segments[0].get("label") == "speech" and not meta.get("sounds")
            and not meta.get("background") and not meta.get("augment") and isinstance(spoken, str)
            and isinstance(voice, dict) and voice.get("voice")
        ):  # fmt: skip
            out.append(item)
    return out


@torch.no_grad()
def encode_pairs(codec: MelCodec, data_dir: Path, items: list[dict[str, Any]], progress: bool) -> list[Pair]:
    from tqdm import tqdm

    pairs = []
    for item in tqdm(items, desc="talker pairs", disable=not progress):
        meta = item["metadata"]
        try:
            ids = phonemize(meta.get("spoken") or meta["text"]).ids
        except UserInputError:
            continue
        wav = torch.from_numpy(read_audio(data_dir / item["audio"]))[None]
        z = codec.analyse(wav)  # [1, T, M]
        codes = codec.quantize(z)[0]  # [K, T]
        if codes.shape[-1] < len(ids):
            continue  # faster than one frame per phoneme: cannot be aligned
        pairs.append(Pair(torch.tensor(ids), codes.to(torch.int16), z[0].half(), str(meta["voice"]["voice"]),
                          str(data_dir / item["audio"])))  # fmt: skip
    return pairs


def collate(pairs: list[Pair], voices: dict[str, int]) -> dict[str, torch.Tensor]:
    n = max(len(p.phonemes) for p in pairs)
    t = max(p.codes.shape[-1] for p in pairs)
    k, m = pairs[0].codes.shape[0], pairs[0].frames.shape[-1]
    batch = {
        "phonemes": torch.zeros(len(pairs), n, dtype=torch.long), "phoneme_mask": torch.zeros(len(pairs), n, dtype=torch.bool),
        "codes": torch.zeros(len(pairs), k, t, dtype=torch.long), "frame_mask": torch.zeros(len(pairs), t, dtype=torch.bool),
        "target_frames": torch.zeros(len(pairs), t, m), "voice": torch.tensor([voices.get(p.voice, 0) for p in pairs]),
        "task": torch.zeros(len(pairs), dtype=torch.long),
    }  # fmt: skip
    for i, p in enumerate(pairs):
        batch["phonemes"][i, : len(p.phonemes)] = p.phonemes
        batch["phoneme_mask"][i, : len(p.phonemes)] = True
        batch["codes"][i, :, : p.codes.shape[-1]] = p.codes.long()
        batch["frame_mask"][i, : p.codes.shape[-1]] = True
        batch["target_frames"][i, : p.codes.shape[-1]] = p.frames.float()
    return batch


def by_length(pairs: list[Pair]) -> list[int]:
    """Indices of ``pairs`` from the fewest frames to the most (stable)."""
    return sorted(range(len(pairs)), key=lambda i: pairs[i].codes.shape[-1])


def plan_batch(pairs: list[Pair], order: list[int], step: int, seed: int, max_frames: int) -> list[int]:
    """Indices of similar-length pairs (a random anchor and its neighbours in ``order``, see
    :func:`by_length`) whose padded size fits ``max_frames``; a function of ``(seed, step)`` only."""
    rng = np.random.default_rng([seed, step])
    at = int(rng.integers(0, len(order)))
    chosen = [order[at]]
    longest = pairs[order[at]].codes.shape[-1]
    lo, hi = at - 1, at + 1
    while True:
        nxt = hi if hi < len(order) and (lo < 0 or rng.random() < 0.5) else lo
        if nxt < 0 or nxt >= len(order):
            break
        widest = max(longest, pairs[order[nxt]].codes.shape[-1])
        if widest * (len(chosen) + 1) > max_frames:
            break
        chosen.append(order[nxt])
        longest = widest
        lo, hi = (lo - 1, hi) if nxt == lo else (lo, hi + 1)
    return chosen


def load_state(path: Path) -> dict[str, Any]:
    return load_part_state(path, "talker", ("step", "talker_cfg", "talker", "optimizer", "scheduler", "history", "voices"))


def export_state(state_path: Path, folder: Path, codec_name: str = "codec", default_voice: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """The talker of a run's ``last.pt`` (e.g. one stopped by its time limit) as a ``talker/``
    folder beside a codec folder named ``codec_name``."""
    state = load_state(state_path)
    talker = Talker(TalkerConfig.from_dict(state["talker_cfg"]))
    try:
        talker.load_state_dict(state["talker"])
    except RuntimeError as err:
        raise CheckpointError(f"{state_path}: does not fit the talker it describes ({err})") from None
    return save_talker(talker.eval(), list(state["voices"]), codec_name, folder, default_voice, dtype)


@torch.no_grad()
def validate(
    talker: Talker, pairs: list[Pair], voices: dict[str, int], max_frames: int, codec: MelCodec | None = None,
    audio_tasks: list[str] | tuple[str, ...] = (), seed: int = 0, pool: list[Pair] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Mean losses over ``pairs`` (text to speech), and each task on audio's code loss and accuracy
    (``<task>_codes``, ``<task>_accuracy``) on items mixed from the same pairs with fixed streams
    (``pool``: where ``tse`` finds other voices and enrolment clips, e.g. the training pairs)."""
    talker.eval()
    sums: dict[str, dict[str, float]] = {}  # task ("" for text to speech) -> loss name -> sum over batches
    batches = 0
    for start in range(0, len(pairs), 8):
        chunk = [i for i in range(start, min(start + 8, len(pairs))) if pairs[i].codes.shape[-1] <= max_frames]
        if not chunk:
            continue
        rows = {"": talker(**collate([pairs[i] for i in chunk], voices))}
        for task in audio_tasks:
            rows[task] = talker.forward_source(**audio_batch(task, codec, pairs, chunk, [seed, 10**9, start], pool))
        for task, losses in rows.items():
            names = ("total", "codes", "prior", "duration", "accuracy") if not task else ("codes", "accuracy")
            for name in names:
                sums.setdefault(task, {})[name] = sums.get(task, {}).get(name, 0.0) + getattr(losses, name).item()
        batches += 1
    talker.train()
    return {(f"{task}_{name}" if task else name): value / max(1, batches)
            for task, named in sums.items() for name, value in named.items()}  # fmt: skip


def audio_batch(task: str, codec: MelCodec, pairs: list[Pair], chosen: list[int], seed_words: list[int],
                pool: list[Pair] | None = None) -> dict[str, Any]:  # fmt: skip
    """A batch of ``task`` (``training/speech_tasks.py``) made from the clean clips ``chosen`` of
    ``pairs``; each item from ``default_rng([*seed_words, 2, i])``. ``tse`` draws the interfering
    voice and the enrolment clip from ``pool`` (default ``pairs``)."""
    pool = pairs if pool is None else pool
    items = []
    for n, i in enumerate(chosen):
        rng = np.random.default_rng([*seed_words, 2, n])
        other = enrol = None
        if task == "tse":
            me = pairs[i]
            others = [j for j, p in enumerate(pool) if p.voice != me.voice]
            same = [j for j, p in enumerate(pool) if p.voice == me.voice and p.path != me.path]
            if not others or not same:
                raise UserInputError(f"tse needs another voice and another clip of {me.voice!r} among the pairs")
            other = read_audio(Path(pool[others[int(rng.integers(len(others)))]].path))
            enrol = read_audio(Path(pool[same[int(rng.integers(len(same)))]].path))
        items.append(make_item(task, codec, read_audio(Path(pairs[i].path)), rng, other, enrol))
    return collate_audio(items, TASK_ROWS[task])


def start_from(talker: Talker, folder: Path) -> None:
    """Copy the weights of the talker in ``folder`` (``talker.json`` + ``talker.safetensors``) whose
    names and shapes match; the rest (e.g. the audio encoder a text-to-speech talker lacks) keep
    their fresh values. Logs what was taken."""
    from omnivox.decoders.speech import load_talker

    source, _ = load_talker(folder)
    mine = talker.state_dict()
    taken = {k: v for k, v in source.state_dict().items() if k in mine and mine[k].shape == v.shape}
    if not taken:
        raise ConfigError(f"talker.init_from {folder}: no weight fits this talker")
    mine.update({k: v.to(mine[k].dtype) for k, v in taken.items()})
    talker.load_state_dict(mine)
    logger.info("talker: %d of %d tensors from %s; %d fresh", len(taken), len(mine), folder, len(mine) - len(taken))


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> PartResult:
    """Encode the pairs (once), then train the talker, as ``config`` (stage ``talker``) says."""
    from tqdm import tqdm

    section, out = begin_part_run(config, "talker", "a talker")
    optim, data_dir = config.optim, Path(config.data.dir)
    codec = load_mel_codec(section.codec)
    pairs_path = out / PAIRS_FILE
    if pairs_path.is_file():
        saved = torch_load_checkpoint(pairs_path, "talker pairs")
        train_pairs = [Pair(**p) for p in saved["train"]]
        val_pairs = [Pair(**p) for p in saved["validation"]]
    else:
        train_pairs, val_pairs = [], []
        for folder in [data_dir, *(Path(d) for d in section.extra_data)]:
            if not (folder / "train.jsonl").is_file():
                raise UserInputError(f"talker data folder {folder}: no train.jsonl")
            train_items = clean_speech_items(folder, "train")
            if config.data.max_items:
                train_items = train_items[: config.data.max_items]
            val_items = clean_speech_items(folder, "validation")[: config.data.eval_items or None]
            train_pairs += encode_pairs(codec, folder, train_items, progress)
            val_pairs += encode_pairs(codec, folder, val_items, progress)
        torch.save({"train": [p.__dict__ for p in train_pairs], "validation": [p.__dict__ for p in val_pairs]}, pairs_path)
    if not train_pairs:
        raise UserInputError(f"data.dir {data_dir}: no clean single-voice speech items to train a talker on")
    state_path = out / STATE_FILE
    state = load_state(state_path) if resume and state_path.is_file() else None
    voices = list(state["voices"]) if state else sorted({p.voice for p in train_pairs})
    voice_ids = {v: i for i, v in enumerate(voices)}
    if section.default_voice and section.default_voice not in voice_ids:
        raise ConfigError(f"talker.default_voice {section.default_voice!r} is not among the data's voices {voices}")
    audio_tasks = [t for t in sorted(section.tasks) if t != "tts"]
    if audio_tasks and not all(p.path for p in train_pairs):
        raise UserInputError(f"{pairs_path} was made before tasks on audio (it has no clip paths): delete it to re-encode")
    if "tse" in audio_tasks and (len({p.voice for p in train_pairs}) < 2 or max(Counter(p.voice for p in train_pairs).values()) < 2):
        raise ConfigError("talker.tasks.tse needs at least two voices and two clips of a voice in the data")
    if state:
        cfg = TalkerConfig.from_dict(state["talker_cfg"])
    else:
        try:
            cfg = TalkerConfig.from_dict({
                "num_phonemes": len(PHONEMES), "num_codebooks": codec.num_codebooks, "codebook_size": codec.codebook_size,
                "n_mels": codec.config.n_mels, "num_voices": max(1, len(voices)),
                **({"source_mels": codec.config.n_mels} if audio_tasks else {}), **section.model,
            })  # fmt: skip
            if max(TASK_ROWS[t] for t in section.tasks) >= cfg.num_tasks:
                raise CheckpointError(f"num_tasks {cfg.num_tasks} has no row for every task of {sorted(section.tasks)}")
        except (CheckpointError, TypeError) as err:
            raise ConfigError(f"talker.model: {err}") from None
    torch.manual_seed(config.seed)
    talker = Talker(cfg).train()
    if section.init_from and not state:
        start_from(talker, Path(section.init_from))
    optimizer = make_optimizer([talker], optim.lr, optim.weight_decay, optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.warmup_steps, optim.max_steps, optim.min_lr_ratio))
    history: list[dict[str, Any]] = []
    step, wall = 0, 0.0
    if state:
        try:
            talker.load_state_dict(state["talker"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{state_path}: does not fit the talker it describes ({err})") from None
        history, step, wall = list(state["history"]), int(state["step"]), float(state["wall_seconds"])
    logger.info("talker: %.2f M params; %d train / %d validation utterances (%.2f h); %d voices",
                sum(p.numel() for p in talker.parameters()) / 1e6, len(train_pairs), len(val_pairs),
                sum(p.codes.shape[-1] for p in train_pairs) / codec.frame_rate / 3600, len(voices))  # fmt: skip

    def snapshot() -> dict[str, Any]:
        return {"step": step, "wall_seconds": wall, "talker_cfg": asdict(cfg), "talker": talker.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                "voices": voices, "torch_rng": torch.get_rng_state()}  # fmt: skip

    order = by_length(train_pairs)
    target = min(optim.max_steps, config.stop_at_step) if config.stop_at_step else optim.max_steps
    bar = tqdm(total=optim.max_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="train talker")
    start_time = time.monotonic()
    try:
        while step < target:
            started = time.perf_counter()
            chosen = plan_batch(train_pairs, order, step, config.seed, section.batch_frames)
            task = pick_task(section.tasks, config.seed, step)
            if task == "tts":
                losses = talker(**collate([train_pairs[i] for i in chosen], voice_ids), prior_weight=section.prior_weight,
                                duration_weight=section.duration_weight, code_dropout=section.code_dropout)  # fmt: skip
            else:
                batch = audio_batch(task, codec, train_pairs, chosen, [config.seed, step])
                losses = talker.forward_source(**batch, code_dropout=section.code_dropout)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            if optim.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(talker.parameters(), optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            wall += time.perf_counter() - started
            row = {"kind": "train", "step": step, "utterances": len(chosen), "lr": scheduler.get_last_lr()[0],
                   **({"task": task} if len(section.tasks) > 1 else {}),
                   **{k: getattr(losses, k).item() for k in ("total", "codes", "prior", "duration", "accuracy")}}  # fmt: skip
            history.append(row)
            bar.update(1)
            bar.set_postfix(codes=f"{row['codes']:.3f}", acc=f"{row['accuracy']:.3f}")
            if step % config.log_every == 0:
                logger.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
            if config.eval_every and step % config.eval_every == 0 and step < optim.max_steps:
                history.append({"kind": "val", "step": step, **validate(talker, val_pairs, voice_ids, section.batch_frames,
                                                                        codec, audio_tasks, config.seed, train_pairs)})  # fmt: skip
                logger.info("step %d validation: %s", step, history[-1])
            over_time = config.time_limit_minutes and time.monotonic() - start_time > 60 * config.time_limit_minutes
            if (config.save_every and step % config.save_every == 0) or step == target or over_time:
                _save_state(state_path, snapshot())
                (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
            if over_time:
                break
    except KeyboardInterrupt:
        _save_state(state_path, snapshot())
        return PartResult(step, None, finished=False, interrupted=True)
    finally:
        bar.close()
    finished = step >= optim.max_steps
    metrics: dict[str, Any] = {}
    if finished:
        metrics = validate(talker, val_pairs, voice_ids, section.batch_frames, codec, audio_tasks, config.seed, train_pairs)
        save_talker(talker.eval(), voices, Path(section.codec).name, out / FINAL_DIR, section.default_voice or None,
                    tasks={t: TASK_ROWS[t] for t in section.tasks})  # fmt: skip
        metrics.update(step=step, wall_seconds=wall, voices=len(voices), train_utterances=len(train_pairs))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    return PartResult(step, out / FINAL_DIR if finished else None, finished, metrics=metrics)

