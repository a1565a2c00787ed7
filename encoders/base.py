"""The one interface every audio encoder implements.

An encoder takes a batch of 16 kHz mono waveforms with their lengths and returns
frame features with their valid lengths::

    waveforms [B, S] float32 in [-1, 1], lengths [B] (samples)  ->  features [B, N, D], lengths [B] (frames)

Encoders are frozen feature extractors: they never see more than one window of
audio (``max_samples``); long audio is split into windows by the caller (the assembled model).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from omnivox.errors import CheckpointError

SAMPLE_RATE = 16_000


@dataclass
class EncoderOutput:
    """Frame features of a batch.

    Attributes:
        features: [B, N, D] frame features (padded frames hold whatever the encoder computed).
        lengths: [B] number of valid frames per item.
    """

    features: torch.Tensor
    lengths: torch.Tensor


class AudioEncoder(nn.Module):
    """Base class of the frozen audio encoders.

    Subclasses set ``output_dim`` (D), ``frame_rate`` (output frames per second) and
    ``max_samples`` (the longest input they accept, in samples at 16 kHz), and implement
    :meth:`forward`.
    """

    sample_rate: int = SAMPLE_RATE
    output_dim: int
    frame_rate: float
    max_samples: int

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:  # pragma: no cover
        """Encode a batch.

        Args:
            waveforms: [B, S] float32 samples at 16 kHz, zero-padded after each item's length.
            lengths: [B] int64 valid samples per item (each <= S and <= ``max_samples``).
        """
        raise NotImplementedError

    def num_frames(self, num_samples: int) -> int:  # pragma: no cover
        """Output frames N for an input of ``num_samples`` samples (before any padding by the caller)."""
        raise NotImplementedError

    def check_input(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> None:
        """Raise ``ValueError`` with the numbers when a batch does not fit this encoder."""
        if waveforms.dim() != 2:
            raise ValueError(f"{type(self).__name__} expects waveforms [B, S], got shape {tuple(waveforms.shape)}")
        if lengths.shape != (waveforms.shape[0],):
            raise ValueError(
                f"{type(self).__name__}: lengths must be [B]={waveforms.shape[0]}, got shape {tuple(lengths.shape)}"
            )
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > waveforms.shape[1]:
            raise ValueError(f"{type(self).__name__}: a length ({longest}) exceeds the padded size ({waveforms.shape[1]})")
        if longest > self.max_samples:
            raise ValueError(
                f"{type(self).__name__} takes at most {self.max_samples} samples "
                f"({self.max_samples / SAMPLE_RATE:.1f} s) per item, got {longest}; split long audio into windows first"
            )


def torch_load_checkpoint(path: str | Path, what: str):
    """``torch.load`` of a checkpoint file, tensors only (no code runs from the file).

    Raises:
        CheckpointError: the file cannot be read that way (``what`` names the format in the message).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(
            f"{path} is not a readable {what} checkpoint (torch.load failed: {type(err).__name__}: {err})"
        ) from err


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a (checkpoint) file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def weights_loaded_after() -> Iterator[None]:
    """Build modules without their random initialisation, for weights that are loaded right after.

    Inside, ``reset_parameters`` of Linear, Embedding, Conv1d and LayerNorm does nothing, so the
    parameters hold uninitialised memory: only use it when a strict ``load_state_dict`` follows
    (every parameter then overwritten; buffers that constructors compute are not affected).
    Random initialisation of openai-whisper tiny.en costs ~0.2 s on 2 cores, about 7 % of a start.
    """
    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.LayerNorm)
    saved = {kind: kind.__dict__.get("reset_parameters") for kind in kinds}  # None: inherited (Conv1d)
    try:
        for kind in kinds:
            kind.reset_parameters = lambda self: None
        yield
    finally:
        for kind, method in saved.items():
            if method is None:
                del kind.reset_parameters
            else:
                kind.reset_parameters = method
