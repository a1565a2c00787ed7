"""BEATs audio encoder, compatible with Microsoft's official checkpoints.

Our own implementation of BEATs (Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic
Tokenizers"), written from the official code in ``microsoft/unilm/beats`` and checked against
it (``tests/encoders/test_beats.py``). A checkpoint is the official file
``{"cfg": dict, "model": state_dict, "label_dict": ...}`` and the state dict uses the official
key names, so official checkpoints load as they are and our own checkpoints load in the
official code::

    waveforms [B, S] * 2**15 -> Kaldi fbank per item [B, F, 128] -> (fbank - 15.41663) / (2 * 6.55582)
      -> patch_embedding (Conv2d 16x16, stride 16) [B, E, F // 16, 8] -> tokens [B, N = F // 16 * 8, E]
         (time-major: the 8 frequency patches of one time patch are neighbours)
      -> layer_norm -> post_extract_proj [B, N, D]
      -> encoder: weight-normed conv positional embedding, post-norm (deep-norm) transformer with
         gated relative position bias shared by all layers -> features [B, N, D]
      (-> predictor, fine-tuned checkpoints only: mean over valid tokens, sigmoid -> [B, C])

For 16 kHz audio, 16 fbank frames (160 ms) give 8 tokens: 50 tokens per second, and a 30 s
window gives 8 * (2998 // 16) = 1496 tokens.

Padding follows the official code exactly, so that features match SALMONN's: the fbank is
computed on each padded row (frames are independent, so valid frames are unaffected), and the
sample-level padding mask is folded down to fbank frames and then to tokens by the official
reshape-and-``all`` rule (:func:`fold_padding_mask`).

Public API: :class:`BeatsConfig`, :class:`BEATs`, :func:`build_beats`, :func:`kaldi_fbank`,
:func:`load_beats_checkpoint`, :func:`save_checkpoint` and :class:`BeatsEncoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.encoders.base import SAMPLE_RATE, AudioEncoder, EncoderOutput, sha256_file, torch_load_checkpoint
from omnivox.errors import CheckpointError

logger = logging.getLogger(__name__)

# Preprocessing constants of the official code (statistics of AudioSet fbanks).
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
WAVEFORM_SCALE = 2.0**15  # the official code feeds int16-range samples to the fbank
# The official attention computes softmax((q k^T / alpha - max) * alpha), a guard against fp16
# overflow; it is mathematically plain scaled dot-product attention.
ATTENTION_ALPHA = 32.0
MAX_SECONDS = 30


# --------------------------------------------------------------------------------------------
# Kaldi fbank
# --------------------------------------------------------------------------------------------
# kaldi-native-fbank (like Kaldi itself) refuses 128 mel bins with a 512-point FFT at 16 kHz:
# mel filter 3 holds no FFT bin ("You may have set num_mel_bins too large"). torchaudio, which
# BEATs was trained with, keeps that filter as all zeros, so fbank column 3 is always
# log(float32 eps). We therefore compute the fbank ourselves, exactly as
# ``torchaudio.compliance.kaldi.fbank`` does with BEATs' arguments.


def _povey_window(window_size: int, device: torch.device) -> torch.Tensor:
    """Kaldi's "povey" window [W]: a symmetric Hann window raised to the power 0.85 (float32)."""
    return torch.hann_window(window_size, periodic=False, device=device, dtype=torch.float32).pow(0.85)


def _mel(freq: torch.Tensor) -> torch.Tensor:
    """Kaldi's mel scale, ``1127 ln(1 + f / 700)``."""
    return 1127.0 * (1.0 + freq / 700.0).log()


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(
    num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Kaldi's triangular mel filters as torchaudio builds them (float32, CPU).

    Args:
        num_bins: number of mel filters.
        padded_window_size: FFT size (512 for 25 ms at 16 kHz).
        sample_rate: in Hz.
        low_freq: lowest filter edge in Hz.
        high_freq: highest filter edge in Hz; <= 0 means an offset from Nyquist.

    Returns:
        [num_bins, padded_window_size // 2 + 1] weights; the Nyquist column is zero and a filter
        that holds no FFT bin is all zeros (Kaldi would refuse it, torchaudio keeps it).
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(
            f"mel filters need 0 <= low_freq < high_freq <= nyquist, got {low_freq}, {high_freq}, {nyquist}"
        )
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)  # edges spread one filter beyond each side
    index = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)  # [M, 1]
    left = mel_low + index * mel_delta
    center = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    fft_mel = _mel(
        sample_rate / padded_window_size * torch.arange(padded_window_size // 2, dtype=torch.float32)
    )
    fft_mel = fft_mel.unsqueeze(0)  # [1, K]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [M, K]
    return F.pad(banks, (0, 1))  # [M, K + 1]: no weight on the Nyquist bin


def kaldi_fbank(
    waveforms: torch.Tensor,
    num_mel_bins: int = NUM_MEL_BINS,
    sample_rate: int = SAMPLE_RATE,
    frame_length_ms: float = FRAME_LENGTH_MS,
    frame_shift_ms: float = FRAME_SHIFT_MS,
) -> torch.Tensor:
    """Log mel filterbank, as ``torchaudio.compliance.kaldi.fbank`` with its defaults.

    The defaults that matter: no dither, DC offset removed per frame, pre-emphasis 0.97, povey
    window, FFT size rounded up to a power of two, power spectrum, filters from 20 Hz to Nyquist,
    log floored at float32 eps, ``snip_edges`` (only frames that fit entirely). Every frame is
    computed independently, so a batch gives the same numbers as its rows one by one.

    Args:
        waveforms: [B, S] or [S] samples (any scale; BEATs passes int16-range values). Computed
            in float32 whatever the input dtype.
        num_mel_bins: number of mel filters.
        sample_rate: in Hz.
        frame_length_ms: frame length in milliseconds.
        frame_shift_ms: frame shift in milliseconds.

    Returns:
        [B, F, num_mel_bins] (or [F, num_mel_bins] for a 1-D input) float32 log mel energies,
        ``F = 1 + (S - frame_length) // frame_shift`` in samples.
    """
    squeeze = waveforms.dim() == 1
    if squeeze:
        waveforms = waveforms.unsqueeze(0)
    if waveforms.dim() != 2:
        raise ValueError(f"kaldi_fbank expects waveforms [B, S] or [S], got shape {tuple(waveforms.shape)}")
    window_size = int(sample_rate * frame_length_ms * 0.001)
    window_shift = int(sample_rate * frame_shift_ms * 0.001)
    if waveforms.shape[-1] < window_size:
        raise ValueError(
            f"kaldi_fbank needs at least one frame of {window_size} samples, got {waveforms.shape[-1]}"
        )
    padded_size = 1 << (window_size - 1).bit_length()  # next power of two: 400 -> 512

    frames = waveforms.float().unfold(-1, window_size, window_shift)  # [B, F, W]
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove the DC offset of each frame
    # Pre-emphasis x[j] - 0.97 x[j - 1], with x[-1] := x[0] as in Kaldi.
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - 0.97 * previous
    frames = frames * _povey_window(window_size, frames.device)
    frames = F.pad(frames, (0, padded_size - window_size))  # [B, F, P]
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [B, F, P // 2 + 1]
    banks = kaldi_mel_banks(num_mel_bins, padded_size, float(sample_rate)).to(power.device)  # [M, P // 2 + 1]
    mel = power @ banks.T  # [B, F, M]
    log_mel = mel.clamp(min=torch.finfo(torch.float32).eps).log()
    return log_mel.squeeze(0) if squeeze else log_mel


def fold_padding_mask(padding_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Fold a padding mask onto fewer frames, by the official BEATs rule.

    The tail ``L % num_frames`` is dropped, the rest is split into ``num_frames`` equal runs, and
    a frame is padding when its whole run is. For tokens this does not follow the time-major
    patch layout exactly (token i takes fbank frames 2i, 2i+1), but it gives the same number of
    valid tokens up to one time patch, and it is what the official model (and SALMONN) computes.

    Args:
        padding_mask: [B, L] bool, True = padding.
        num_frames: N, with 0 < N <= L.

    Returns:
        [B, N] bool, True = padding.
    """
    length = padding_mask.shape[1]
    if not 0 < num_frames <= length:
        raise ValueError(f"cannot fold a padding mask of length {length} onto {num_frames} frames")
    usable = length - length % num_frames
    return (
        padding_mask[:, :usable].reshape(padding_mask.shape[0], num_frames, -1).all(dim=-1)
    )  # [B, N, L // N] -> [B, N]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
_BOOL_FIELDS = (
    "conv_bias",
    "layer_norm_first",
    "deep_norm",
    "relative_position_embedding",
    "gru_rel_pos",
    "finetuned_model",
)
_INT_FIELDS = (
    "input_patch_size",
    "embed_dim",
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_attention_heads",
    "conv_pos",
    "conv_pos_groups",
    "num_buckets",
    "max_distance",
    "predictor_class",
)
_PROBABILITY_FIELDS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_layerdrop",
    "dropout_input",
    "predictor_dropout",
)
_FLOAT_FIELDS = (*_PROBABILITY_FIELDS, "layer_wise_gradient_decay_ratio")


@dataclass(frozen=True)
class BeatsConfig:
    """Architecture of a BEATs model: the fields of the official ``cfg`` dict.

    Defaults are the iter3 / iter3+ checkpoints' architecture (12 layers of 768, deep norm,
    gated relative position bias with 320 buckets up to distance 800, no predictor). Training-only
    fields (dropouts, layer drop, gradient decay) take the official class defaults.

    Attributes:
        input_patch_size: side of the square fbank patches (time x mel), 16.
        embed_dim: E, patch embedding size.
        conv_bias: whether the patch embedding conv has a bias.
        encoder_layers: number of transformer layers.
        encoder_embed_dim: D, transformer width (the feature size).
        encoder_ffn_embed_dim: FFN hidden size.
        encoder_attention_heads: attention heads (must divide D).
        activation_fn: FFN activation, a key of ``ACTIVATIONS``.
        layer_wise_gradient_decay_ratio: gradient scale applied before every layer (training only).
        layer_norm_first: pre-norm transformer (False: post-norm, as in BEATs).
        deep_norm: DeepNet residual scaling (post-norm only).
        dropout, attention_dropout, activation_dropout, encoder_layerdrop, dropout_input: training only.
        conv_pos: kernel size of the convolutional positional embedding.
        conv_pos_groups: its groups (must divide D).
        relative_position_embedding: add a learned relative position bias to attention scores.
        num_buckets: relative position buckets (both directions together).
        max_distance: distance beyond which positions share the last bucket.
        gru_rel_pos: gate the relative position bias by the query (``grep_linear``, ``grep_a``).
        finetuned_model: the checkpoint has a ``predictor`` (audio tagging head).
        predictor_dropout: dropout before the predictor (training only).
        predictor_class: C, number of predictor classes (527 for AudioSet).
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    def __post_init__(self) -> None:
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BeatsConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BeatsConfig.{name} must be an int, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"BeatsConfig.{name} must be a float, got {value!r}")
        if not isinstance(self.activation_fn, str) or self.activation_fn not in ACTIVATIONS:
            raise ValueError(
                f"BeatsConfig.activation_fn must be one of {sorted(ACTIVATIONS)}, got {self.activation_fn!r}"
            )
        positive = (
            "input_patch_size",
            "embed_dim",
            "encoder_layers",
            "encoder_embed_dim",
            "encoder_ffn_embed_dim",
        )
        positive += ("encoder_attention_heads", "conv_pos", "conv_pos_groups", "predictor_class")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"BeatsConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.input_patch_size > NUM_MEL_BINS:
            raise ValueError(
                f"BeatsConfig.input_patch_size ({self.input_patch_size}) exceeds the {NUM_MEL_BINS} mel bins"
            )
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"BeatsConfig: encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(
                f"BeatsConfig: encoder_embed_dim {self.encoder_embed_dim} is not divisible by conv_pos_groups {self.conv_pos_groups}"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError(
                "BeatsConfig: deep_norm applies to post-norm layers; it needs layer_norm_first=False"
            )
        for name in _PROBABILITY_FIELDS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"BeatsConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.layer_wise_gradient_decay_ratio <= 0:
            raise ValueError(
                f"BeatsConfig.layer_wise_gradient_decay_ratio must be > 0, got {self.layer_wise_gradient_decay_ratio}"
            )
        if self.relative_position_embedding:
            # Buckets: half per direction, half of those exact, the rest log-spaced up to max_distance.
            if self.num_buckets < 4:
                raise ValueError(
                    f"BeatsConfig.num_buckets must be >= 4 with relative_position_embedding, got {self.num_buckets}"
                )
            if self.max_distance <= self.num_buckets // 4:
                raise ValueError(
                    f"BeatsConfig.max_distance ({self.max_distance}) must exceed num_buckets // 4 ({self.num_buckets // 4})"
                )

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BeatsConfig:
        """Build from an official ``cfg`` dict (as stored in BEATs checkpoints).

        Unknown keys are ignored with a warning. A key the dict lacks takes the official class
        default (``_OFFICIAL_DEFAULTS``), as the official loader does, with a warning. ints are
        accepted for float fields and 0/1 for bool fields; other types raise.

        Raises:
            TypeError: a value has the wrong type (the message names the field).
            ValueError: the values are inconsistent (see ``__post_init__``).
        """
        if not isinstance(cfg, Mapping):
            raise TypeError(f"BEATs cfg must be a dict, got {type(cfg).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(str(k) for k in cfg if k not in names)
        if unknown:
            logger.warning("BEATs cfg: ignoring unknown keys %s", unknown)
        missing = [name for name in names if name not in cfg]
        if missing:
            logger.warning(
                "BEATs cfg lacks %s; using the official defaults %s",
                missing,
                {name: _OFFICIAL_DEFAULTS[name] for name in missing},
            )
        values: dict[str, Any] = {}
        for name in names:
            value = cfg[name] if name in cfg else _OFFICIAL_DEFAULTS[name]
            if (
                name in _BOOL_FIELDS
                and not isinstance(value, bool)
                and isinstance(value, int)
                and value in (0, 1)
            ):
                value = bool(value)
            elif name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The official ``cfg`` dict (plain Python values), as written into checkpoints."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def tokens_per_patch_row(self) -> int:
        """Tokens per time patch: the number of frequency patches, ``128 // input_patch_size``."""
        return NUM_MEL_BINS // self.input_patch_size


# Defaults of the official ``BEATsConfig`` class, field by field: what the official loader assumes
# for a key the checkpoint's cfg lacks (they differ from our iter3 defaults in five fields).
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(BeatsConfig) if f.init},
    "input_patch_size": -1,
    "deep_norm": False,
    "relative_position_embedding": False,
    "max_distance": 1280,
    "gru_rel_pos": False,
}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU computed in float32 (as the official code does for half-precision inputs)."""
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# One table from the cfg's ``activation_fn`` to the FFN activation. "glu" gates inside ``fc1``
# (see :class:`GluLinear`) and applies nothing afterwards.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": _gelu,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "tanh": torch.tanh,
    "linear": _identity,
    "glu": _identity,
}


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by ``scale`` backward (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class GluLinear(nn.Module):
    """``fc1`` of the "glu" activation: ``a * swish(b)`` where ``[a, b] = linear(x)``.

    Args:
        input_dim: D.
        output_dim: FFN hidden size H.
    """

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.linear = nn.Linear(input_dim, 2 * output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, H]."""
        value, gate = self.linear(x).split(self.output_dim, dim=-1)
        return value * F.silu(gate)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight normalisation over the kernel axis, stored as ``weight_g``/``weight_v``.

    ``weight = weight_v * weight_g / ||weight_v||``, the norm taken over output and input channels
    for each kernel position (``torch.nn.utils.weight_norm(conv, dim=2)``, whose state-dict keys
    the official checkpoints use).

    Args:
        channels: D, input and output channels.
        kernel_size: K.
        groups: convolution groups.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> torch.Tensor:
        """[D, D / groups, K] effective weight, in float32."""
        weight_v = self.weight_v.float()
        norm = weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()  # [1, 1, K]
        return weight_v * (self.weight_g.float() / norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> [B, D, T + 1 - K % 2] (padding K // 2 on both sides), in the dtype of ``x``.

        Computed in float32: torch 2.13's CPU bfloat16 grouped conv1d returns wrong values for
        BEATs' shapes (groups 16, kernel 128), and this layer is cheap next to the transformer.
        """
        out = F.conv1d(
            x.float(), self.weight(), self.bias.float(), padding=self.kernel_size // 2, groups=self.groups
        )
        return out.to(x.dtype)


class TrimLast(nn.Module):
    """Drop the extra last frame an even-kernel 'same' convolution produces ([B, D, T + 1] -> [B, D, T])."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class BeatsSelfAttention(nn.Module):
    """Multi-head self-attention with an optional (gated) relative position bias.

    ``relative_attention_bias`` is created only when ``has_relative_attention_bias``; the encoder
    gives layer 0's module to every other layer. The gate (``gru_rel_pos``) scales the bias per
    query and head: ``g = a * (b * grep_a - 1) + 2`` with ``a, b = sigmoid(grep_linear(q))``.

    Args:
        cfg: the model config.
        has_relative_attention_bias: create the bucket embedding (layer 0 only).
    """

    def __init__(self, cfg: BeatsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(cfg.attention_dropout)
        self.relative_attention_bias: nn.Embedding | None = (
            nn.Embedding(cfg.num_buckets, self.num_heads) if has_relative_attention_bias else None
        )
        self.gru_rel_pos = cfg.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def _buckets(self, relative_position: torch.Tensor) -> torch.Tensor:
        """Bidirectional T5-style buckets of key - query offsets ([T, T] int64 -> [T, T] int64)."""
        half = self.num_buckets // 2
        buckets = (relative_position > 0).long() * half  # keys after the query use the upper half
        distance = relative_position.abs()
        max_exact = half // 2
        # Same float32 op order as the official code, so bucket boundaries agree.
        far = (
            max_exact
            + (
                torch.log(distance.clamp(min=1).float() / max_exact)
                / math.log(self.max_distance / max_exact)
                * (half - max_exact)
            ).long()
        )
        far = far.clamp(max=half - 1)
        return buckets + torch.where(distance < max_exact, distance, far)

    def compute_bias(self, length: int) -> torch.Tensor:
        """Relative position bias [H, T, T] for a sequence of ``length`` tokens."""
        assert self.relative_attention_bias is not None, (
            "compute_bias needs the relative_attention_bias layer"
        )
        position = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = self._buckets(position[None, :] - position[:, None])  # [T, T], key - query
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # [T, T, H] -> [H, T, T]

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, position_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend.

        Args:
            x: [B, T, D].
            key_padding_mask: [B, T] bool, True = padding (never attended to), or None.
            position_bias: [H, T, T] ungated bias from an earlier layer, or None (computed here
                when this layer owns ``relative_attention_bias``).

        Returns:
            ([B, T, D] output, [H, T, T] ungated position bias or None) - the bias is passed on to
            the next layer, as in the official code.
        """
        batch, length, dim = x.shape
        if self.relative_attention_bias is not None and position_bias is None:
            position_bias = self.compute_bias(length)

        q = self.q_proj(x) * self.scaling
        q = q * (1.0 / ATTENTION_ALPHA)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

        scores = q @ k.transpose(-1, -2)  # [B, H, T, T]
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * ATTENTION_ALPHA
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)  # [1, H, T, T]
            if self.gru_rel_pos:
                query = q * ATTENTION_ALPHA / self.scaling  # back to the unscaled projection
                gates = torch.sigmoid(
                    self.grep_linear(query).view(batch, self.num_heads, length, 2, 4).sum(-1)
                )  # [B, H, T, 2]
                gate_a, gate_b = gates.chunk(2, dim=-1)  # [B, H, T, 1] each
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # [B, H, T, 1]
                bias = gate * bias  # [B, H, T, T]
            scores = scores + bias
        probs = self.dropout(F.softmax(scores, dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(batch, length, dim)  # [B, H, T, hd] -> [B, T, D]
        return self.out_proj(out), position_bias


class BeatsLayer(nn.Module):
    """One transformer layer: attention + FFN, post-norm (optionally deep-norm) or pre-norm.

    Args:
        cfg: the model config.
        has_relative_attention_bias: this layer owns the relative position embedding (layer 0).
    """

    def __init__(self, cfg: BeatsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = BeatsSelfAttention(cfg, has_relative_attention_bias)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1: nn.Module = (
            GluLinear(dim, cfg.encoder_ffn_embed_dim)
            if cfg.activation_fn == "glu"
            else nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        )
        self.activation = ACTIVATIONS[cfg.activation_fn]
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        # DeepNet: residuals scaled by (2N)^(1/4) in post-norm layers.
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.fc2(self.dropout2(self.activation(self.fc1(x)))))

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, position_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, T, D] -> ([B, T, D], position bias [H, T, T] or None); see :class:`BeatsSelfAttention`."""
        if self.layer_norm_first:
            attn, position_bias = self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
            x = x + self.dropout1(attn)
            x = x + self._ffn(self.final_layer_norm(x))
        else:
            attn, position_bias = self.self_attn(x, padding_mask, position_bias)
            x = self.self_attn_layer_norm(x * self.residual_scale + self.dropout1(attn))
            x = self.final_layer_norm(x * self.residual_scale + self._ffn(x))
        return x, position_bias


class BeatsTransformer(nn.Module):
    """The BEATs transformer (``encoder.*`` in checkpoints): conv positional embedding + layers.

    Args:
        cfg: the model config.
    """

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop
        self.gradient_decay = cfg.layer_wise_gradient_decay_ratio
        # Keys encoder.pos_conv.0.{weight_g, weight_v, bias}; 1 and 2 hold no weights.
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), TrimLast(cfg.conv_pos), nn.GELU()
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            [
                BeatsLayer(cfg, has_relative_attention_bias=cfg.relative_position_embedding and i == 0)
                for i in range(cfg.encoder_layers)
            ]
        )
        if cfg.relative_position_embedding:
            # One bucket embedding for all layers: the same module under every layer's name, so the
            # state dict carries it once per layer, as the official one does.
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode tokens.

        Args:
            x: [B, T, D] projected patch embeddings.
            padding_mask: [B, T] bool, True = padding, or None.

        Returns:
            [B, T, D] features (padded tokens hold whatever was computed for them).
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # [B, D, T] conv -> [B, T, D]
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        position_bias = None
        for layer in self.layers:
            if self.gradient_decay != 1.0:
                x = _GradMultiply.apply(x, self.gradient_decay)
            if self.training and self.layerdrop > 0 and float(torch.rand(())) <= self.layerdrop:
                continue
            x, position_bias = layer(x, padding_mask, position_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class BEATs(nn.Module):
    """BEATs with the official module layout and state-dict keys.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(
            1,
            cfg.embed_dim,
            kernel_size=cfg.input_patch_size,
            stride=cfg.input_patch_size,
            bias=cfg.conv_bias,
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
            if cfg.embed_dim != cfg.encoder_embed_dim
            else None
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = BeatsTransformer(cfg)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor: nn.Linear | None = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None

    @property
    def min_samples(self) -> int:
        """Shortest input that gives at least one token: fbank frames for one time patch."""
        window = int(SAMPLE_RATE * FRAME_LENGTH_MS * 0.001)
        shift = int(SAMPLE_RATE * FRAME_SHIFT_MS * 0.001)
        return window + (self.cfg.input_patch_size - 1) * shift

    def num_tokens(self, num_samples: int) -> int:
        """Tokens for a (padded) input of ``num_samples`` samples: ``(F // p) * (128 // p)`` (30 s -> 1496)."""
        window = int(SAMPLE_RATE * FRAME_LENGTH_MS * 0.001)
        shift = int(SAMPLE_RATE * FRAME_SHIFT_MS * 0.001)
        if num_samples < window:
            return 0
        num_frames = 1 + (num_samples - window) // shift
        return (num_frames // self.cfg.input_patch_size) * self.cfg.tokens_per_patch_row

    def preprocess(self, source: torch.Tensor) -> torch.Tensor:
        """Normalised fbank of each row: [B, S] in [-1, 1] -> [B, F, 128] float32."""
        fbank = kaldi_fbank(source.float() * WAVEFORM_SCALE)  # [B, F, 128]
        return (fbank - FBANK_MEAN) / (2 * FBANK_STD)

    def extract_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder features of a batch of waveforms (never the predictor's output).

        Args:
            source: [B, S] float samples at 16 kHz in [-1, 1], zero-padded after each item.
            padding_mask: [B, S] bool, True = padding sample, or None (no padding).

        Returns:
            (features [B, N, D], padding_mask [B, N] bool or None), ``N = num_tokens(S)``.
        """
        if source.dim() != 2:
            raise ValueError(f"BEATs expects source [B, S], got shape {tuple(source.shape)}")
        if source.shape[1] < self.min_samples:
            raise ValueError(
                f"BEATs needs at least {self.min_samples} samples ({self.min_samples / SAMPLE_RATE:.3f} s) "
                f"for one patch of {self.cfg.input_patch_size} fbank frames, got {source.shape[1]}"
            )
        if padding_mask is not None and (
            padding_mask.shape != source.shape or padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"padding_mask must be bool with the shape of source {tuple(source.shape)}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        fbank = self.preprocess(source)  # [B, F, 128]
        if padding_mask is not None:
            padding_mask = fold_padding_mask(padding_mask, fbank.shape[1])  # [B, F]

        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(fbank.unsqueeze(1).to(dtype))  # [B, E, F // p, 128 // p]
        features = patches.flatten(2).transpose(1, 2)  # [B, N, E], time-major
        features = self.layer_norm(features)
        if padding_mask is not None:
            padding_mask = fold_padding_mask(padding_mask, features.shape[1])  # [B, N]
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)  # [B, N, D]
        features = self.encoder(self.dropout_input(features), padding_mask)
        return features, padding_mask

    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same as :meth:`extract_features`."""
        return self.extract_features(source, padding_mask)

    def classify(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities of a fine-tuned model (what the official ``extract_features`` returns for it).

        Args:
            source: [B, S] as in :meth:`extract_features`.
            padding_mask: [B, S] bool, True = padding, or None.

        Returns:
            [B, C] sigmoid of the token logits averaged over valid tokens.
        """
        if self.predictor is None:
            raise ValueError("this BEATs model has no predictor (cfg.finetuned_model is False)")
        features, token_mask = self.extract_features(source, padding_mask)
        logits = self.predictor(self.predictor_dropout(features))  # [B, N, C]
        if token_mask is not None and bool(token_mask.any()):
            logits = logits.masked_fill(token_mask.unsqueeze(-1), 0.0)
            logits = logits.sum(dim=1) / (~token_mask).sum(dim=1, keepdim=True)  # [B, C]
        else:
            logits = logits.mean(dim=1)
        return torch.sigmoid(logits)


@torch.no_grad()
def _init_weights(model: BEATs) -> None:
    """The official initialisation scheme (not its random stream): BERT-style N(0, 0.02) for the
    transformer's linear and embedding layers, DeepNet-scaled Xavier for deep norm, and the
    conv positional embedding drawn with std sqrt(4 / (K * D)) before weight normalisation."""
    cfg = model.cfg
    encoder = model.encoder
    conv = encoder.pos_conv[0]
    conv.weight_v.normal_(0.0, math.sqrt(4.0 / (cfg.conv_pos * cfg.encoder_embed_dim)))
    conv.weight_g.copy_(conv.weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt())
    conv.bias.zero_()
    for module in encoder.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
    if cfg.deep_norm:
        beta = math.pow(8 * cfg.encoder_layers, -0.25)
        for layer in encoder.layers:
            attn = layer.self_attn
            nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
            nn.init.xavier_normal_(attn.v_proj.weight, gain=beta)
            nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
            nn.init.xavier_normal_(attn.out_proj.weight, gain=beta)
            fc1 = layer.fc1.linear if isinstance(layer.fc1, GluLinear) else layer.fc1
            nn.init.xavier_normal_(fc1.weight, gain=beta)
            nn.init.xavier_normal_(layer.fc2.weight, gain=beta)


def build_beats(config: BeatsConfig | None = None, *, seed: int | None = None) -> BEATs:
    """A randomly initialised BEATs of any size (the official init scheme), in eval mode.

    Args:
        config: the architecture (default: iter3, 90 M parameters).
        seed: seed for the initial weights (the global RNG is left untouched), or None.

    Example::

        model = build_beats(BeatsConfig(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                        encoder_attention_heads=4, embed_dim=16), seed=0)
    """
    config = config or BeatsConfig()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = BEATs(config)
        _init_weights(model)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Checkpoints (the official file format)
# --------------------------------------------------------------------------------------------
def _list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_state_dict(model: BEATs, state: Mapping[str, Any], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected, non-tensor or mis-shaped key."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems: list[str] = []
    missing = [f"{k} {list(s)}" for k, s in expected.items() if k not in state]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    unexpected = [
        f"{k} {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
        for k, v in state.items()
        if k not in expected
    ]
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    wrong = []
    for key, shape in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key}: a {type(value).__name__}, expected a tensor {list(shape)}")
        elif tuple(value.shape) != shape:
            wrong.append(f"{key}: checkpoint {list(value.shape)} vs model {list(shape)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_list(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match its cfg: " + "; ".join(problems))


def load_beats_checkpoint(
    path: str | Path, expected_sha256: str | None = None
) -> tuple[BEATs, dict[Any, Any] | None]:
    """Load an official-format BEATs checkpoint ``{"cfg", "model"[, "label_dict"]}``.

    Args:
        path: the ``.pt`` file (e.g. ``BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt``).
        expected_sha256: hex digest the file must have, or None to skip the check.

    Returns:
        (model in eval mode on CPU, the ``label_dict`` or None).

    Raises:
        CheckpointError: the file is missing, has another sha256, is not a BEATs checkpoint, its
            cfg is invalid, or its weights do not match the cfg (keys and shapes are listed).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"BEATs checkpoint not found: {path} is not a file")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256.strip().lower():
            raise CheckpointError(f"{path}: sha256 mismatch: expected {expected_sha256}, got {actual}")
    checkpoint = torch_load_checkpoint(path, "BEATs")
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: expected a dict with 'cfg' and 'model', got a {type(checkpoint).__name__}"
        )
    lacking = [key for key in ("cfg", "model") if key not in checkpoint]
    if lacking:
        raise CheckpointError(
            f"{path}: a BEATs checkpoint needs 'cfg' and 'model', it lacks {lacking} (has {sorted(map(str, checkpoint))})"
        )
    cfg, state = checkpoint["cfg"], checkpoint["model"]
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: 'cfg' and 'model' must be dicts, got {type(cfg).__name__} and {type(state).__name__}"
        )
    try:
        config = BeatsConfig.from_dict(cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid BEATs cfg: {err}") from err
    model = BEATs(config)
    _check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    label_dict = checkpoint.get("label_dict")
    logger.info(
        "BEATs from %s: %d layers x %d, %s, %.1f M params",
        path,
        config.encoder_layers,
        config.encoder_embed_dim,
        f"predictor of {config.predictor_class} classes" if config.finetuned_model else "no predictor",
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model.eval(), label_dict


def save_checkpoint(model: BEATs, path: str | Path, label_dict: dict[Any, Any] | None = None) -> None:
    """Write ``model`` in the official format, loadable by the official code and :func:`load_beats_checkpoint`.

    Args:
        model: the model (its weights are written as CPU tensors).
        path: destination ``.pt`` file (parent folders are created).
        label_dict: class index -> label mapping of a fine-tuned model, stored as ``label_dict``.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint: dict[str, Any] = {
        "cfg": model.cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if label_dict is not None:
        checkpoint["label_dict"] = label_dict
    torch.save(checkpoint, path)
    logger.info("saved BEATs checkpoint to %s", path)


# --------------------------------------------------------------------------------------------
# The omnivox encoder
# --------------------------------------------------------------------------------------------
class BeatsEncoder(AudioEncoder):
    """Frozen BEATs encoder: [B, S] waveforms + lengths -> [B, N, D] features at 50 tokens/s.

    Features are the transformer's outputs (SALMONN's ``audio_embeds``); a fine-tuned
    checkpoint's predictor is loaded but never used here. The module stays in eval mode even
    when a parent calls ``.train()``, and its weights never require grad.

    Args:
        model: the BEATs model (e.g. from :func:`load_beats_checkpoint` or :func:`build_beats`).
        label_dict: class labels of a fine-tuned checkpoint, kept for reference.
    """

    def __init__(self, model: BEATs, label_dict: dict[Any, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.label_dict = label_dict
        cfg = model.cfg
        self.output_dim = cfg.encoder_embed_dim
        frames_per_second = 1000.0 / FRAME_SHIFT_MS
        self.frame_rate = (
            frames_per_second / cfg.input_patch_size * cfg.tokens_per_patch_row
        )  # 50.0 for p = 16
        self.max_samples = MAX_SECONDS * SAMPLE_RATE
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, expected_sha256: str | None = None) -> BeatsEncoder:
        """Load an official-format checkpoint (see :func:`load_beats_checkpoint`, which raises
        ``CheckpointError`` with the details when the file is wrong)."""
        model, label_dict = load_beats_checkpoint(path, expected_sha256)
        return cls(model, label_dict)

    def train(self, mode: bool = True) -> BeatsEncoder:
        """Keep the frozen encoder in eval mode (no dropout, no layer drop) whatever ``mode`` is."""
        super().train(False)
        return self

    def num_frames(self, num_samples: int) -> int:
        """Output frames for a padded input of ``num_samples`` samples (16000 -> 48, 480000 -> 1496)."""
        return self.model.num_tokens(num_samples)

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encode a batch.

        Args:
            waveforms: [B, S] float samples at 16 kHz, zero-padded after each item's length.
            lengths: [B] int64 valid samples per item (1 <= length <= S, <= ``max_samples``).

        Returns:
            features [B, N, D] with ``N = num_frames(S)``, lengths [B] valid tokens per item.
        """
        self.check_input(waveforms, lengths)
        if lengths.numel() and int(lengths.min()) < 1:
            raise ValueError(
                f"BeatsEncoder: every item needs at least one sample, got lengths {lengths.tolist()}"
            )
        positions = torch.arange(waveforms.shape[1], device=waveforms.device)
        padding_mask = positions.unsqueeze(0) >= lengths.to(waveforms.device).unsqueeze(1)  # [B, S]
        features, token_mask = self.model.extract_features(waveforms, padding_mask)
        assert token_mask is not None
        return EncoderOutput(features=features, lengths=(~token_mask).sum(dim=1))
