"""Neural audio codecs: waveform <-> discrete codes, one interface for every codec.

A codec turns a waveform ``[B, 1, S]`` at its ``sample_rate`` into integer codes
``[B, K, T]`` (K codebooks of ``codebook_size`` entries, ``frame_rate`` frames per second)
and back. The model's speech head emits such codes; the codec decodes them.

Two implementations:

- :class:`EncodecCodec`: a user's EnCodec checkpoint through transformers' ``EncodecModel``
  (e.g. a ``facebook/encodec_24khz`` folder), at any of its bandwidths.
- :class:`MelCodec`: the codec trained here for the bundled nano model. Its codes are a
  residual vector quantisation (RVQ) of normalised log-mel frames; its decoder is a causal
  ConvNeXt stack that predicts, for each frame, the magnitudes and phases of its synthesis
  pieces (phases relative to a phase vocoder's advance), turned into audio by an inverse STFT
  with overlap-add (Vocos-style). Why this design: one CPU try at an EnCodec-style codec
  (a 320x transposed-convolution stack) never left its starting plateau on 2 cores, while a
  decoder that works at the frame rate and leaves the last step to the inverse FFT trains at
  once (shared/DESIGN.md section 12). The quantiser is fitted by residual k-means (no
  codebook collapse to manage); the decoder is trained on quantised frames, so it learns to
  hide the quantisation error.

Streaming (:meth:`Codec.stream`): codes arrive a few frames at a time and audio leaves as
soon as it is final. :class:`MelCodec` is causal (frame ``t`` is decoded from frames ``<= t``;
the overlap-add holds back only the last window's overlap), so its stream gives exactly
the whole-sequence decode. Other codecs stream by re-decoding a window of past frames
(:class:`ContextStream`), which is close to, but for non-causal codecs not equal to, the
whole decode.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnivox.errors import AudioInputError, CheckpointError, UserInputError

logger = logging.getLogger(__name__)

MEL_CODEC_CONFIG = "codec.json"
MEL_CODEC_WEIGHTS = "codec.safetensors"
MEL_CODEC_KIND = "omnivox-mel-codec"


class CodesError(UserInputError):
    """Codes handed to a codec do not fit it (shape, range); the message has the numbers."""


class Codec(nn.Module, ABC):
    """Waveform ``[B, 1, S]`` <-> codes ``[B, K, T]`` (int64, each in ``[0, codebook_size)``)."""

    sample_rate: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    causal: bool = False

    @property
    def bitrate(self) -> float:
        """Bits per second of the codes."""
        return self.frame_rate * self.num_codebooks * math.log2(self.codebook_size)

    @property
    def samples_per_frame(self) -> int:
        return round(self.sample_rate / self.frame_rate)

    @abstractmethod
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, 1, S]`` float at ``sample_rate`` -> ``codes [B, K, T]`` int64."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, K, T]`` -> ``wav [B, 1, T * samples_per_frame]``."""

    def stream(self) -> CodecStream:
        """A decoder that takes codes a few frames at a time (see :class:`CodecStream`)."""
        return ContextStream(self, context_frames=50)

    # ------------------------------------------------------------------ input checks
    def check_wav(self, wav: torch.Tensor) -> torch.Tensor:
        if not isinstance(wav, torch.Tensor) or wav.dim() != 3 or wav.shape[1] != 1:
            shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise AudioInputError(f"a codec encodes mono audio shaped [B, 1, samples], got {shape}")
        if wav.shape[-1] == 0:
            raise AudioInputError("a codec cannot encode an empty clip (0 samples)")
        if not torch.isfinite(wav).all():
            raise AudioInputError("the audio holds NaN or infinite samples")
        return wav.float()

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise CodesError(f"codes must be shaped [B, K, T], got {shape}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise CodesError(f"codes must be integers, got {codes.dtype}")
        if codes.shape[1] != self.num_codebooks:
            raise CodesError(f"this codec has {self.num_codebooks} codebooks, the codes have {codes.shape[1]} (shape {tuple(codes.shape)})")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise CodesError(
                f"codes must lie in [0, {self.codebook_size}), got values from {int(codes.min())} to {int(codes.max())}"
            )
        return codes.long()


class CodecStream(ABC):
    """Incremental decoding: ``push(codes [B, K, t])`` returns the audio that became final
    (``[B, 1, n]``, ``n`` may be 0), ``flush()`` the rest. The pushed pieces, concatenated,
    equal ``decode`` of the whole code sequence for causal codecs."""

    @abstractmethod
    def push(self, codes: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def flush(self) -> torch.Tensor: ...


class ContextStream(CodecStream):
    """Streams any codec by decoding each new piece together with up to ``context_frames`` past
    frames and keeping only the new piece's samples. Exact for codecs whose receptive field
    fits in the context and looks no frame ahead; an approximation otherwise (EnCodec's LSTM
    and non-causal 48 kHz convolutions see the whole sequence)."""

    def __init__(self, codec: Codec, context_frames: int) -> None:
        self.codec = codec
        self.context_frames = context_frames
        self.past: torch.Tensor | None = None

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.codec.check_codes(codes)
        frames = codes if self.past is None else torch.cat([self.past, codes], dim=-1)
        wav = self.codec.decode(frames)
        new = codes.shape[-1] * self.codec.samples_per_frame
        self.past = frames[..., -self.context_frames :] if self.context_frames else None
        return wav[..., wav.shape[-1] - new :]

    def flush(self) -> torch.Tensor:
        batch = 1 if self.past is None else self.past.shape[0]
        return torch.zeros(batch, 1, 0)


# ============================================================================================
# EnCodec (transformers)
# ============================================================================================
class EncodecCodec(Codec):
    """A transformers ``EncodecModel`` behind the :class:`Codec` interface.

    Args:
        model: the loaded ``EncodecModel`` (eval mode).
        bandwidth: kbps; chooses how many codebooks are used (one of
            ``model.config.target_bandwidths``; default: the largest).
    """

    def __init__(self, model, bandwidth: float | None = None) -> None:
        super().__init__()
        cfg = model.config
        if cfg.audio_channels != 1:
            raise CheckpointError(f"only mono EnCodec models are supported, this one has {cfg.audio_channels} channels")
        if cfg.chunk_length_s is not None:
            raise CheckpointError(
                f"this EnCodec model encodes in {cfg.chunk_length_s} s chunks with per-chunk scales "
                "(the 48 kHz model); only unchunked models (e.g. facebook/encodec_24khz) fit the codes-only interface"
            )
        bandwidths = [float(b) for b in cfg.target_bandwidths]
        bandwidth = max(bandwidths) if bandwidth is None else float(bandwidth)
        if bandwidth not in bandwidths:
            raise UserInputError(f"bandwidth {bandwidth} kbps is not one of this EnCodec model's {bandwidths}")
        self.model = model.eval()
        self.bandwidth = bandwidth
        self.sample_rate = int(cfg.sampling_rate)
        self.frame_rate = float(cfg.frame_rate)
        self.codebook_size = int(cfg.codebook_size)
        bits_per_codebook = math.log2(self.codebook_size) * self.frame_rate
        self.num_codebooks = max(1, int(1000 * bandwidth // bits_per_codebook))
        self.causal = bool(cfg.use_causal_conv)

    @classmethod
    def from_pretrained(cls, source: str | Path, bandwidth: float | None = None, **kwargs) -> EncodecCodec:
        """Load from a local folder or a hub id (``facebook/encodec_24khz``)."""
        from transformers import EncodecModel

        try:
            model = EncodecModel.from_pretrained(str(source), **kwargs)
        except OSError as err:
            raise CheckpointError(f"cannot load an EnCodec model from {source}: {err}") from None
        return cls(model, bandwidth=bandwidth)

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.model.config.upsampling_ratios))

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = self.check_wav(wav).to(self.model.dtype)
        out = self.model.encode(wav, bandwidth=self.bandwidth)
        codes = out.audio_codes  # [chunks = 1, B, K, T]
        if codes.shape[0] != 1:
            raise CheckpointError(f"expected one chunk of codes, got {codes.shape[0]}")
        return codes[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes)
        wav = self.model.decode(codes[None], [None])[0]  # [B, 1, S]
        return wav.float()


# ============================================================================================
# The nano codec: RVQ of log-mel frames + a causal iSTFT decoder
# ============================================================================================
@dataclass(frozen=True)
class MelCodecConfig:
    """Shape of a :class:`MelCodec`.

    ``hop_length`` samples per frame (320 at 16 kHz: 50 frames/s); each frame is analysed
    with an ``n_fft``-sample Hann window ending at the frame's last sample (the encoder looks
    at no future audio). The decoder resynthesises each frame as ``upsample`` shorter pieces
    (hop ``hop_length / upsample``, Hann window of ``synthesis_n_fft`` samples, default
    ``n_fft / upsample``), the last ending where the frame's analysis window ends: shorter
    hops keep the phase of voiced speech coherent from piece to piece. Window lengths must be
    multiples of their hops so the windows overlap-add to a constant.
    """

    sample_rate: int = 16_000
    hop_length: int = 320
    n_fft: int = 1280
    n_mels: int = 100
    f_min: float = 0.0
    f_max: float | None = None
    num_codebooks: int = 8
    codebook_size: int = 1024
    dim: int = 256
    intermediate_dim: int = 768
    num_layers: int = 8
    kernel_size: int = 7
    upsample: int = 1
    synthesis_n_fft: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("f_min", "f_max") or (f.name == "synthesis_n_fft" and value is None):
                continue
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"codec config: {f.name} must be a positive integer, got {value!r}")
        if self.n_fft % self.hop_length:
            raise CheckpointError(f"codec config: n_fft ({self.n_fft}) must be a multiple of hop_length ({self.hop_length})")
        if self.hop_length % self.upsample:
            raise CheckpointError(f"codec config: hop_length ({self.hop_length}) must be a multiple of upsample ({self.upsample})")
        if self.synth_n_fft % self.synth_hop:
            raise CheckpointError(
                f"codec config: synthesis_n_fft ({self.synth_n_fft}) must be a multiple of the synthesis hop ({self.synth_hop})"
            )
        top = self.f_max if self.f_max is not None else self.sample_rate / 2
        if not 0 <= self.f_min < top <= self.sample_rate / 2:
            raise CheckpointError(f"codec config: need 0 <= f_min < f_max <= {self.sample_rate / 2}, got {self.f_min}, {self.f_max}")

    @property
    def synth_hop(self) -> int:
        return self.hop_length // self.upsample

    @property
    def synth_n_fft(self) -> int:
        return self.synthesis_n_fft if self.synthesis_n_fft is not None else self.n_fft // self.upsample

    @classmethod
    def from_dict(cls, data: dict) -> MelCodecConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise CheckpointError(f"codec config: unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


class CausalConvNeXtBlock(nn.Module):
    """ConvNeXt block over frames whose depthwise convolution sees only past frames."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, D, T]`` -> ``[B, D, T]``."""
        y = self.dwconv(F.pad(x, (self.pad, 0)))
        y = self.norm(y.transpose(1, 2))  # [B, T, D]
        y = self.pwconv2(F.gelu(self.pwconv1(y))) * self.gamma
        return x + y.transpose(1, 2)


class MelCodec(Codec):
    """The nano codec (see the module docstring). Build with a config; weights from
    :func:`load_mel_codec` or training (``training/codec.py``)."""

    causal = True

    def __init__(self, config: MelCodecConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.sample_rate = c.sample_rate
        self.frame_rate = c.sample_rate / c.hop_length
        self.num_codebooks = c.num_codebooks
        self.codebook_size = c.codebook_size
        from transformers.audio_utils import mel_filter_bank

        fbank = mel_filter_bank(
            num_frequency_bins=c.n_fft // 2 + 1, num_mel_filters=c.n_mels, min_frequency=c.f_min,
            max_frequency=c.f_max if c.f_max is not None else c.sample_rate / 2, sampling_rate=c.sample_rate,
            norm="slaney", mel_scale="slaney",
        )  # fmt: skip
        self.register_buffer("mel_basis", torch.tensor(fbank.T, dtype=torch.float32), persistent=False)  # [M, F]
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.register_buffer("synth_window", torch.hann_window(c.synth_n_fft), persistent=False)
        # squared Hann windows overlapping n / hop times add up to a constant: the synthesis gain
        overlap = c.synth_n_fft // c.synth_hop
        self.ola_gain = float((self.synth_window**2).reshape(overlap, c.synth_hop).sum(0).mean())
        # fitted statistics and codebooks (saved)
        self.register_buffer("mel_mean", torch.zeros(c.n_mels))
        self.register_buffer("mel_std", torch.ones(c.n_mels))
        self.register_buffer("codebooks", torch.randn(c.num_codebooks, c.codebook_size, c.n_mels) * 0.1)
        # decoder
        self.embed = nn.Conv1d(c.n_mels, c.dim, c.kernel_size)
        self.embed_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            CausalConvNeXtBlock(c.dim, c.intermediate_dim, c.kernel_size, layer_scale=1.0 / c.num_layers)
            for _ in range(c.num_layers)
        )
        self.final_norm = nn.LayerNorm(c.dim, eps=1e-6)
        # per frame, `upsample` pieces: log-magnitude and phase of synth_n_fft // 2 + 1 bins each
        self.head = nn.Linear(c.dim, c.upsample * (c.synth_n_fft + 2))
        with torch.no_grad():  # phases start at the reference: a coherent phase vocoder, not noise
            rows = self.head.weight.view(c.upsample, c.synth_n_fft + 2, c.dim)
            rows[:, c.synth_n_fft // 2 + 1 :].zero_()
            self.head.bias.view(c.upsample, c.synth_n_fft + 2)[:, c.synth_n_fft // 2 + 1 :].zero_()

    @property
    def receptive_field(self) -> int:
        """Frames the decoder looks back (the current one included)."""
        return (self.config.kernel_size - 1) * (self.config.num_layers + 1) + 1

    # ------------------------------------------------------------------ analysis
    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, S]`` -> log-magnitude mel frames ``[B, T, n_mels]``, ``T = ceil(S / hop)``.

        Frame ``t`` is the window ending at sample ``(t + 1) * hop`` (zeros before the start,
        and after the end up to the next whole frame)."""
        c = self.config
        frames = -(-wav.shape[-1] // c.hop_length)
        x = F.pad(wav, (c.n_fft - c.hop_length, frames * c.hop_length - wav.shape[-1]))
        spec = torch.stft(x, c.n_fft, c.hop_length, window=self.window, center=False, return_complex=True)
        mel = self.mel_basis @ spec.abs()  # [B, M, T]
        return torch.log(mel + 1e-5).transpose(1, 2)

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.mel_mean) / self.mel_std

    def analyse(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, S]`` -> the normalised log-mel frames ``[B, T, M]`` the quantiser codes."""
        return self.normalize(self.log_mel(wav))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Residual nearest-neighbour codes of normalised frames ``z [B, T, M]`` -> ``[B, K, T]``."""
        residual = z.reshape(-1, z.shape[-1])
        codes = []
        for book in self.codebooks:  # [C, M]
            # squared distance without the |r|^2 term (constant per row)
            idx = (book.pow(2).sum(-1) - 2 * residual @ book.T).argmin(-1)
            codes.append(idx)
            residual = residual - book[idx]
        return torch.stack(codes, 0).reshape(len(codes), z.shape[0], z.shape[1]).permute(1, 0, 2)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, K, T]`` -> normalised frames ``[B, T, M]`` (sum of the K codewords)."""
        z = torch.zeros(codes.shape[0], codes.shape[2], self.config.n_mels, device=codes.device)
        for k in range(codes.shape[1]):
            z = z + self.codebooks[k][codes[:, k]]
        return z

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = self.check_wav(wav)
        return self.quantize(self.analyse(wav[:, 0]))

    # ------------------------------------------------------------------ synthesis
    def piece_outputs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (quantised) frames ``z [B, T, M]`` -> log-magnitudes and phases (relative to
        the phase-vocoder reference, see :meth:`spectra`) of the synthesis pieces, each
        ``[B, T * upsample, synth_n_fft // 2 + 1]``."""
        k = self.config.kernel_size - 1
        x = self.embed(F.pad(z.transpose(1, 2), (k, 0)))  # [B, D, T]
        x = self.embed_norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        h = self.head(self.final_norm(x.transpose(1, 2)))  # [B, T, up * (n + 2)]
        h = h.reshape(h.shape[0], -1, self.config.synth_n_fft + 2)  # [B, T * up, n + 2]
        log_mag, phase = h.chunk(2, dim=-1)
        return log_mag, phase

    def spectra(
        self, log_mag: torch.Tensor, phase: torch.Tensor, first_piece: int = 0
    ) -> tuple[torch.Tensor, int]:
        """Complex spectra of the pieces ``[B, P, F]`` and the index of the next piece.

        The phase of bin ``k`` in piece ``p`` is the predicted ``phase`` plus a reference that
        advances by the bin's centre frequency times the hop, as a phase vocoder's would. A
        decoder predicting phases alone gives a steady input the same phase in every piece, a
        signal periodic in the hop (energy only at multiples of 50 Hz); with the reference, a
        constant prediction is a steady tone at the bin's frequency (12.5 Hz apart). The
        reference is computed in float64 from the global piece index and wrapped, so a stream
        that counts pieces gives the same numbers. (Accumulating predicted phase increments
        instead, which also fits tones between bins, trained ~20 % slower on CPU here.)"""
        c = self.config
        bins = torch.arange(c.synth_n_fft // 2 + 1, dtype=torch.float64, device=phase.device)
        pieces = torch.arange(first_piece, first_piece + phase.shape[1], dtype=torch.float64, device=phase.device)
        advance = torch.remainder(pieces[:, None] * bins * (2 * math.pi * c.synth_hop / c.synth_n_fft), 2 * math.pi)
        mag = torch.exp(log_mag).clamp(max=1e2)
        return torch.polar(mag, phase + advance.to(phase.dtype)), first_piece + phase.shape[1]

    def frames_to_audio(self, spectra: torch.Tensor) -> torch.Tensor:
        """Windowed inverse FFT of each piece ``[B, P, F]`` -> overlapping pieces ``[B, P, synth_n_fft]``."""
        return torch.fft.irfft(spectra, n=self.config.synth_n_fft) * self.synth_window / self.ola_gain

    def overlap_add(self, pieces: torch.Tensor) -> torch.Tensor:
        """``[B, P, n]`` -> ``[B, (P - 1) * synth_hop + n]`` (piece ``p`` starts at ``p * synth_hop``)."""
        hop = self.config.synth_hop
        b, p, n = pieces.shape
        out_len = (p - 1) * hop + n
        return F.fold(pieces.transpose(1, 2), output_size=(1, out_len), kernel_size=(1, n), stride=(1, hop))[:, 0, 0]

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised frames ``[B, T, M]`` -> ``wav [B, 1, T * hop]`` (differentiable; used in training)."""
        c = self.config
        if z.shape[1] == 0:
            return z.new_zeros(z.shape[0], 1, 0)
        spectra, _ = self.spectra(*self.piece_outputs(z))
        audio = self.overlap_add(self.frames_to_audio(spectra))
        # piece p spans samples [(p + 1) * synth_hop - synth_n_fft, (p + 1) * synth_hop): drop the lead-in before 0
        lead = c.synth_n_fft - c.synth_hop
        return audio[:, None, lead : lead + z.shape[1] * c.hop_length]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = self.check_codes(codes).to(self.codebooks.device)
        return self.decode_frames(self.dequantize(codes))

    def stream(self) -> MelCodecStream:
        return MelCodecStream(self)


class MelCodecStream(CodecStream):
    """Exact streaming decode of a :class:`MelCodec`: the decoder is causal, so each new frame's
    spectra are computed from it and ``receptive_field - 1`` kept frames; overlap-add keeps the
    unfinished tail (``synth_n_fft - synth_hop`` samples), everything before it leaves at once."""

    def __init__(self, codec: MelCodec) -> None:
        self.codec = codec
        self.context: torch.Tensor | None = None  # [B, <= receptive_field - 1, M] normalised frames
        self.tail: torch.Tensor | None = None  # [B, synth_n_fft - synth_hop] unfinished sums
        self.pieces = 0  # synthesis pieces made so far (the phase reference's clock)
        self.skip = codec.config.synth_n_fft - codec.config.synth_hop  # lead-in samples before sample 0

    def _drop_lead(self, out: torch.Tensor) -> torch.Tensor:
        drop = min(self.skip, out.shape[-1])
        self.skip -= drop
        return out[:, drop:]

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        codec, c = self.codec, self.codec.config
        codes = codec.check_codes(codes)
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 1, 0)
        z = codec.dequantize(codes)  # [B, t, M]
        frames = z if self.context is None else torch.cat([self.context, z], dim=1)
        log_mag, phase = (x[:, -z.shape[1] * c.upsample :] for x in codec.piece_outputs(frames))
        spectra, self.pieces = codec.spectra(log_mag, phase, self.pieces)
        audio = codec.overlap_add(codec.frames_to_audio(spectra))  # [B, (t * up - 1) * synth_hop + synth_n_fft]
        lead = c.synth_n_fft - c.synth_hop
        if self.tail is not None:
            audio[:, :lead] += self.tail
        self.context = frames[:, -(codec.receptive_field - 1) :]
        ready = z.shape[1] * c.hop_length  # samples no later piece can touch
        out, self.tail = audio[:, :ready], audio[:, ready:]
        return self._drop_lead(out)[:, None]

    def flush(self) -> torch.Tensor:
        if self.tail is None:
            return torch.zeros(1, 1, 0)
        out, self.tail = self._drop_lead(self.tail), None
        return out[:, None]


# ============================================================================================
# Saving and loading
# ============================================================================================
def save_mel_codec(codec: MelCodec, folder: str | Path) -> Path:
    """Write ``codec.json`` + ``codec.safetensors`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}
    save_file(state, str(folder / MEL_CODEC_WEIGHTS))
    (folder / MEL_CODEC_CONFIG).write_text(json.dumps({"kind": MEL_CODEC_KIND, **asdict(codec.config)}, indent=2) + "\n")
    return folder


def load_mel_codec(folder: str | Path) -> MelCodec:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        data = json.loads((folder / MEL_CODEC_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {folder / MEL_CODEC_CONFIG}: {err}") from None
    if not isinstance(data, dict) or data.get("kind") != MEL_CODEC_KIND:
        raise CheckpointError(f"{folder / MEL_CODEC_CONFIG}: kind must be {MEL_CODEC_KIND!r}")
    codec = MelCodec(MelCodecConfig.from_dict(data))
    try:
        state = load_file(str(folder / MEL_CODEC_WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {folder / MEL_CODEC_WEIGHTS}: {err}") from None
    expected = codec.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder / MEL_CODEC_WEIGHTS}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{folder / MEL_CODEC_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
    codec.load_state_dict(state)
    return codec.eval()


def load_codec(source: str | Path, bandwidth: float | None = None) -> Codec:
    """A codec from a folder: the nano codec (``codec.json``), or an EnCodec checkpoint (an HF
    folder or hub id whose ``config.json`` has ``model_type: encodec``)."""
    path = Path(source)
    if (path / MEL_CODEC_CONFIG).is_file():
        if bandwidth is not None:
            raise UserInputError("the nano codec has one bandwidth; leave bandwidth out")
        return load_mel_codec(path)
    if path.is_dir():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} holds neither {MEL_CODEC_CONFIG} nor a readable config.json: {err}") from None
        if model_type != "encodec":
            raise CheckpointError(f"{path}: config.json model_type is {model_type!r}; codecs supported: encodec, {MEL_CODEC_KIND}")
    return EncodecCodec.from_pretrained(source, bandwidth=bandwidth)
