"""Training items of the talker's tasks on audio, made on the fly from clean speech.

Each item starts from a clean single-voice clip of the talker's data (``training/talker.py``)
and a random stream of its own; the input and the target have the same length, so the target's
codes are frame-aligned with the input's mel frames:

- ``ns``: speech + a background texture (``datagen.sounds``: white / pink / brown noise, rain,
  engine) at 0-10 dB SNR -> the speech;
- ``sr``: the same mixture -> the background alone;
- ``dereverb``: speech through a synthetic room (``datagen.augment.reverb``, RT60 0.2-1 s) -> the speech;
- ``tse``: speech + another voice's speech at -5..5 dB -> the first voice, with another clip of
  that voice as the enrolment clip.

Batches mix no tasks: each step trains one task, drawn by the recipe's shares from
``default_rng([seed, step, 1])`` (the text-to-speech batches keep their own stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omnivox.decoders.codec import MelCodec
from omnivox.decoders.speech import AUDIO_TASKS
from omnivox.errors import UserInputError

SNR_DB = (0.0, 10.0)
SIR_DB = (-5.0, 5.0)


def pick_task(shares: dict[str, float], seed: int, step: int) -> str:
    """The task of step ``step`` (by ``shares``; the only task when there is one)."""
    names = sorted(shares)
    if len(names) == 1:
        return names[0]
    weights = np.array([shares[n] for n in names], dtype=np.float64)
    return names[int(np.random.default_rng([seed, step, 1]).choice(len(names), p=weights / weights.sum()))]


@dataclass
class AudioItem:
    """One item of a task on audio: the input's and the enrolment clip's frames, the target codes."""

    source: torch.Tensor  # [T, M] normalised mel frames of the input
    codes: torch.Tensor  # [K, T]
    prompt: torch.Tensor | None  # [T', M] or None


def _mix(speech: np.ndarray, other: np.ndarray, db: float) -> tuple[np.ndarray, np.ndarray]:
    """(speech + g * other, g * other) with ``g`` setting the power ratio speech/other to ``db``."""
    other = other[: speech.size]
    ps, po = float(np.mean(np.square(speech, dtype=np.float64))), float(np.mean(np.square(other, dtype=np.float64)))
    g = 0.0 if po == 0 else float(np.sqrt(ps / (po * 10 ** (db / 10))))
    scaled = (g * other).astype(np.float32)
    mix = speech + scaled
    peak = float(np.max(np.abs(mix))) if mix.size else 0.0
    if peak > 0.99:  # keep the pair consistent: scale input and target together
        mix, scaled, speech = mix * (0.99 / peak), scaled * (0.99 / peak), speech * (0.99 / peak)
    return mix.astype(np.float32), scaled.astype(np.float32)


@torch.no_grad()
def frames_of(codec: MelCodec, wav: np.ndarray) -> torch.Tensor:
    """16 kHz ``[S]`` -> the codec's normalised mel frames ``[T, M]``."""
    return codec.analyse(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None])[0]


@torch.no_grad()
def make_item(task: str, codec: MelCodec, speech: np.ndarray, rng: np.random.Generator,
              other: np.ndarray | None = None, enrol: np.ndarray | None = None) -> AudioItem:  # fmt: skip
    """One item of ``task`` from the clean clip ``speech`` (``other``: another voice's clip, and
    ``enrol``: another clip of this voice, both needed by ``tse``)."""
    from omnivox.datagen import augment as aug
    from omnivox.datagen.sounds import BACKGROUNDS, background

    speech = np.asarray(speech, dtype=np.float32)
    prompt = None
    if task in ("ns", "sr"):
        label = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        bed = background(label, speech.size / 16_000 + 0.01, rng)
        mix, noise = _mix(speech, bed, float(rng.uniform(*SNR_DB)))
        target = (mix - noise) if task == "ns" else noise
    elif task == "dereverb":
        mix, _ = aug.reverb(speech, rng)
        target = speech
    elif task == "tse":
        if other is None or enrol is None:
            raise UserInputError("tse items need another voice's clip and an enrolment clip of the target voice")
        if other.size < speech.size:
            other = np.pad(other, (0, speech.size - other.size))
        mix, interference = _mix(speech, other, float(rng.uniform(*SIR_DB)))
        target = mix - interference
        prompt = frames_of(codec, enrol)
    else:
        raise UserInputError(f"unknown task on audio {task!r}; known: {list(AUDIO_TASKS)}")
    source = frames_of(codec, mix)
    codes = codec.quantize(frames_of(codec, target)[None])[0]
    return AudioItem(source, codes, prompt)


def collate_audio(items: list[AudioItem], task_row: int) -> dict[str, torch.Tensor | None]:
    """Pad items of one task into :meth:`Talker.forward_source`'s arguments."""
    t = max(i.source.shape[0] for i in items)
    m, k = items[0].source.shape[1], items[0].codes.shape[0]
    batch: dict[str, torch.Tensor | None] = {
        "source": torch.zeros(len(items), t, m), "source_mask": torch.zeros(len(items), t, dtype=torch.bool),
        "codes": torch.zeros(len(items), k, t, dtype=torch.long), "task": torch.full((len(items),), task_row),
        "prompt": None, "prompt_mask": None,
    }  # fmt: skip
    for i, item in enumerate(items):
        n = item.source.shape[0]
        batch["source"][i, :n] = item.source
        batch["source_mask"][i, :n] = True
        batch["codes"][i, :, :n] = item.codes
    if items[0].prompt is not None:
        tp = max(i.prompt.shape[0] for i in items)
        batch["prompt"] = torch.zeros(len(items), tp, m)
        batch["prompt_mask"] = torch.zeros(len(items), tp, dtype=torch.bool)
        for i, item in enumerate(items):
            batch["prompt"][i, : item.prompt.shape[0]] = item.prompt
            batch["prompt_mask"][i, : item.prompt.shape[0]] = True
    return batch
