"""Frozen Whisper encoder, fed exactly like SALMONN feeds it.

SALMONN pads every clip to 30 s, computes the 80-bin log-mel with transformers'
``WhisperFeatureExtractor`` and keeps the encoder's ``last_hidden_state`` (after the final
LayerNorm)::

    waveforms [B, S] -> pad/trim to 30 s [B, 480000] -> log-mel [B, n_mels, 3000]
                     -> conv stem (stride 2) + transformer + ln_post -> features [B, 1500, D]

The same weights come in two layouts, both supported:

* openai-whisper: an official name (``"tiny.en"``, ``"large-v2"``, ...) or a local ``.pt``
  file ``{"dims": {...}, "model_state_dict": {...}}`` -> ``whisper.model.AudioEncoder``;
* Hugging Face: a folder with ``config.json`` + weights, or a hub id such as
  ``"openai/whisper-large-v2"`` -> transformers' ``WhisperEncoder``.

Only the encoder is built and kept. The log-mel is computed by one implementation
(:class:`WhisperLogMel`) whatever the checkpoint layout, with the same filters, window and
normalisation as ``WhisperFeatureExtractor`` (and openai-whisper's ``log_mel_spectrogram``).
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnivox.encoders.base import (
    SAMPLE_RATE,
    AudioEncoder,
    EncoderOutput,
    torch_load_checkpoint,
    weights_loaded_after,
)
from omnivox.errors import CheckpointError

logger = logging.getLogger(__name__)

N_FFT = 400
HOP_LENGTH = 160
# conv1 has stride 1 and conv2 stride 2: one output frame per two mel frames (320 samples).
SAMPLES_PER_FRAME = 2 * HOP_LENGTH

CheckpointKind = Literal["openai", "hf"]


def read_openai_checkpoint(path: Path) -> dict:
    """The dict of a local openai-whisper file, checked to hold ``dims`` and ``model_state_dict``.

    Raises:
        CheckpointError: the file is not a (safely loadable) openai-whisper checkpoint.
    """
    checkpoint = torch_load_checkpoint(path, "openai-whisper")
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected an openai-whisper file with 'dims' and 'model_state_dict', got {keys}")
    return checkpoint


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    mel = 3.0 * hz / 200.0  # linear below 1 kHz
    high = hz >= 1000.0
    mel[high] = 15.0 + np.log(hz[high] / 1000.0) * (27.0 / np.log(6.4))  # logarithmic above
    return mel


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    high = mel >= 15.0
    hz[high] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel[high] - 15.0))
    return hz


def slaney_mel_filters(n_freq: int, n_mels: int, sample_rate: int, max_hz: float = 8000.0) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters from 0 Hz to ``max_hz``: [n_freq, n_mels] float64.

    The same numbers as transformers' ``audio_utils.mel_filter_bank(..., norm="slaney",
    mel_scale="slaney")`` (what ``WhisperFeatureExtractor`` uses; equal in a test), written out
    here because importing transformers for it costs ~0.5 s of every start of a model whose
    LLM does not need transformers; librosa, the usual source, is not a dependency.
    """
    edges = _slaney_mel_to_hz(np.linspace(0.0, _hz_to_slaney_mel(np.array([max_hz]))[0], n_mels + 2))  # [n_mels + 2]
    bins = np.linspace(0, sample_rate // 2, n_freq)  # [n_freq]
    widths = np.diff(edges)  # [n_mels + 1]
    slopes = edges[None, :] - bins[:, None]  # [n_freq, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(np.zeros(1), np.minimum(rising, falling))  # [n_freq, n_mels]
    return filters * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]  # equal energy per filter


class WhisperLogMel(nn.Module):
    """Whisper's log-mel spectrogram, per item, batched.

    Matches transformers' ``WhisperFeatureExtractor`` (what SALMONN uses) and openai-whisper's
    ``log_mel_spectrogram``: periodic Hann window of 400, hop 160, centred STFT with reflect
    padding, last frame dropped, power spectrum, Slaney mel filters (0-8 kHz), ``log10`` clamped
    at 1e-10, floored at (item max - 8), then ``(x + 4) / 4``. The floor uses each item's own
    maximum, so a batch gives the same result as its items one by one.

    Args:
        n_mels: number of mel bins (80, or 128 for large-v3).
    """

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        filters = slaney_mel_filters(1 + N_FFT // 2, n_mels, SAMPLE_RATE)  # [n_freq, n_mels]
        self.n_mels = n_mels
        self.register_buffer("filters", torch.from_numpy(filters).float().T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Compute the log-mel of each item.

        Args:
            waveforms: [B, S] float samples at 16 kHz (already padded to the window length).

        Returns:
            [B, n_mels, S // 160] float32 log-mel.
        """
        if waveforms.dim() != 2:
            raise ValueError(f"WhisperLogMel expects waveforms [B, S], got shape {tuple(waveforms.shape)}")
        # Always float32 (.float() in case the module was cast with .to(dtype)).
        stft = torch.stft(
            waveforms.float(), N_FFT, HOP_LENGTH, window=self.window.float(), center=True, return_complex=True
        )  # [B, n_freq, S // 160 + 1]
        power = stft[..., :-1].abs().pow(2)  # [B, n_freq, F]
        mel = self.filters.float() @ power  # [B, n_mels, F]
        log_spec = mel.clamp(min=1e-10).log10()
        item_max = log_spec.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
        log_spec = torch.maximum(log_spec, item_max - 8.0)
        return (log_spec + 4.0) / 4.0


class WhisperEncoder(AudioEncoder):
    """Frozen Whisper encoder: [B, S] waveforms -> [B, n_audio_ctx, d_model] features at 50 Hz.

    Build it with :meth:`from_pretrained`. ``backbone`` is either openai-whisper's
    ``AudioEncoder`` (``kind="openai"``) or transformers' ``WhisperEncoder`` (``kind="hf"``);
    both end with the final LayerNorm, so the features are the same for the same weights.

    Args:
        backbone: the encoder module, its input [B, n_mels, 2 * n_ctx] log-mel.
        kind: which implementation ``backbone`` is ("openai" or "hf").
        n_mels: mel bins the checkpoint expects.
        n_ctx: output frames per window (1500 for real models).
        d_model: feature size.
    """

    def __init__(
        self, backbone: nn.Module, kind: CheckpointKind, n_mels: int, n_ctx: int, d_model: int
    ) -> None:
        super().__init__()
        if kind not in ("openai", "hf"):
            raise ValueError(f"kind must be 'openai' or 'hf', got {kind!r}")
        self.backbone = backbone
        self.kind: CheckpointKind = kind
        self.n_mels = n_mels
        self.n_ctx = n_ctx
        self.output_dim = d_model
        self.frame_rate = SAMPLE_RATE / SAMPLES_PER_FRAME  # 50.0
        self.max_samples = n_ctx * SAMPLES_PER_FRAME  # 480000 (30 s) for real models
        self.mel = WhisperLogMel(n_mels)
        self.pad_to_window = True
        self.requires_grad_(False)
        self.eval()

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        download_root: str | Path | None = None,
        pad_to_window: bool = True,
    ) -> WhisperEncoder:
        """Load the encoder of a Whisper checkpoint (the decoder is never kept).

        Args:
            name_or_path: one of

                * an openai-whisper official name (``whisper.available_models()``, e.g. ``"large-v2"``),
                  downloaded to ``download_root`` (default ``~/.cache/whisper``);
                * a local openai-whisper file ``{"dims", "model_state_dict"}`` (e.g. ``large-v2.pt``);
                * a Hugging Face Whisper folder (``config.json`` + weights);
                * a Hugging Face hub id (``"openai/whisper-large-v2"``), from the HF cache or the hub.
            device: where the weights live.
            dtype: weight dtype (the log-mel is always computed in float32, then cast).
            download_root: download folder for official openai-whisper names.
            pad_to_window: pad every input to the full 30 s window, as Whisper was trained and as
                SALMONN does (default). ``False`` encodes only the audio (plus padding to the
                longest item of a batch) with the first T positional embeddings: a 5 s clip
                costs ~1/6 of the compute. Models must be trained with the setting they use.

        Raises:
            CheckpointError: the file/folder is missing or malformed, or the weights cannot be downloaded.
        """
        import whisper

        name = str(name_or_path)
        path = Path(name).expanduser()
        if path.is_file():
            encoder = cls._from_openai_file(path)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(
                    f"{path} is a folder without config.json: expected a Hugging Face Whisper folder "
                    "(config.json + model.safetensors) or an openai-whisper .pt file"
                )
            encoder = cls._from_hf(str(path))
        elif name in whisper.available_models():
            encoder = cls._from_openai_name(name, download_root)
        elif (  # "owner/name": a hub id, unless it looks like a (missing) local file
            name.count("/") == 1
            and not name.startswith((".", "~", "/"))
            and path.suffix not in (".pt", ".pth", ".bin", ".safetensors")
        ):
            encoder = cls._from_hf(name)
        else:
            raise CheckpointError(
                f"Whisper checkpoint {name!r} not found: pass an existing openai-whisper .pt file, a Hugging Face "
                f"Whisper folder, a hub id like 'openai/whisper-large-v2', or one of {whisper.available_models()}"
            )
        encoder.to(device=device, dtype=dtype)  # see _apply: some parts stay float32
        encoder.pad_to_window = bool(pad_to_window)
        logger.info(
            "Whisper encoder from %s (%s): n_mels %d, %d frames, d_model %d, %.1f M params",
            name,
            encoder.kind,
            encoder.n_mels,
            encoder.n_ctx,
            encoder.output_dim,
            sum(p.numel() for p in encoder.parameters()) / 1e6,
        )
        return encoder

    @classmethod
    def _from_openai_state(
        cls, dims: dict, state_dict: dict[str, torch.Tensor], source: str
    ) -> WhisperEncoder:
        """Build openai-whisper's ``AudioEncoder`` from ``dims`` and the ``encoder.*`` tensors of a state dict."""
        from whisper.model import AudioEncoder as OpenAIAudioEncoder

        needed = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
        missing_dims = [k for k in needed if k not in dims]
        if missing_dims:
            raise CheckpointError(f"{source}: 'dims' lacks {missing_dims} (has {sorted(dims)})")
        with weights_loaded_after():  # every parameter comes from the state dict, strictly
            backbone = OpenAIAudioEncoder(*(int(dims[k]) for k in needed))
        enc_state = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
        try:
            backbone.load_state_dict(enc_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{source}: encoder weights do not match its dims {dims}: {err}") from err
        n_dropped = len(state_dict) - len(enc_state)
        logger.debug(
            "%s: loaded %d encoder tensors, dropped %d decoder tensors", source, len(enc_state), n_dropped
        )
        return cls(
            backbone.eval(),
            "openai",
            int(dims["n_mels"]),
            int(dims["n_audio_ctx"]),
            int(dims["n_audio_state"]),
        )

    @classmethod
    def _from_openai_file(cls, path: Path) -> WhisperEncoder:
        """Load a local openai-whisper checkpoint ``{"dims", "model_state_dict"}``."""
        checkpoint = read_openai_checkpoint(path)
        return cls._from_openai_state(checkpoint["dims"], checkpoint["model_state_dict"], str(path))

    @classmethod
    def _from_openai_name(cls, name: str, download_root: str | Path | None) -> WhisperEncoder:
        """Load an official openai-whisper model by name (downloads it unless cached)."""
        import whisper

        try:
            model = whisper.load_model(
                name, device="cpu", download_root=None if download_root is None else str(download_root)
            )
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"could not download the openai-whisper weights {name!r} ({type(err).__name__}: {err}); "
                f"on an offline machine, copy the file (e.g. {name}.pt) here and pass its path instead of the name"
            ) from err
        dims = model.dims
        backbone = model.encoder.eval()
        del model  # drop the decoder
        return cls(backbone, "openai", dims.n_mels, dims.n_audio_ctx, dims.n_audio_state)

    @classmethod
    def _from_hf(cls, name_or_path: str) -> WhisperEncoder:
        """Load the encoder of a Hugging Face Whisper folder or hub id.

        ``WhisperForAudioClassification`` holds only the encoder (plus a small head we drop), so the
        decoder weights in the checkpoint are skipped instead of being materialised.
        """
        from transformers import WhisperForAudioClassification

        try:
            model, info = WhisperForAudioClassification.from_pretrained(
                name_or_path, output_loading_info=True
            )
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"could not load the Hugging Face Whisper checkpoint {name_or_path!r} ({type(err).__name__}: {err}); "
                "offline, pass a local folder with config.json and the weights"
            ) from err
        missing_encoder = sorted(k for k in info["missing_keys"] if k.startswith("encoder."))
        if missing_encoder:
            raise CheckpointError(
                f"{name_or_path}: {len(missing_encoder)} encoder weights missing from the checkpoint, "
                f"e.g. {missing_encoder[:5]}"
            )
        mismatched = list(info.get("mismatched_keys", []))
        if mismatched:
            raise CheckpointError(f"{name_or_path}: weights with mismatched shapes: {mismatched[:5]}")
        config = model.config
        backbone = model.encoder.eval()
        del model  # drop the classification head
        return cls(backbone, "hf", config.num_mel_bins, config.max_source_positions, config.d_model)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> WhisperEncoder:
        """After any ``.to()``/``.half()``, put back the parts that must stay float32.

        The log-mel is always computed in float32, and openai-whisper's LayerNorm runs on
        ``x.float()``, so its parameters must be float32 whatever the rest of the weights are.
        """
        super()._apply(fn, recurse)
        self.mel.float()
        if self.kind == "openai":
            for module in self.backbone.modules():
                if isinstance(module, nn.LayerNorm):
                    module.float()
        return self

    # ----------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> WhisperEncoder:
        """The encoder is frozen: it stays in eval mode whatever the parent module does."""
        return super().train(False)

    def num_frames(self, num_samples: int) -> int:
        """Output frames for an input of ``num_samples``: ``n_ctx`` when padding to the window, else
        ``ceil(samples / 320)``."""
        if self.pad_to_window:
            return self.n_ctx
        return int(self.frame_lengths(torch.tensor([num_samples]))[0])

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames per item: ``ceil(samples / 320)``, at most ``n_ctx``.

        Args:
            lengths: [B] samples per item.

        Returns:
            [B] int64 frames.
        """
        frames = torch.div(lengths.long() + SAMPLES_PER_FRAME - 1, SAMPLES_PER_FRAME, rounding_mode="floor")
        return frames.clamp(max=self.n_ctx)

    def log_mel(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pad/trim each item to the window and compute its log-mel, as SALMONN does.

        Args:
            waveforms: [B, S] samples at 16 kHz.
            lengths: [B] valid samples per item (samples after each length are zeroed).

        Returns:
            [B, n_mels, 2 * n_ctx] float32 log-mel.
        """
        self.check_input(waveforms, lengths)
        batch, size = waveforms.shape
        window = self.max_samples
        if not self.pad_to_window:  # only as many frames as the longest item needs
            window = int(self.frame_lengths(lengths).max()) * SAMPLES_PER_FRAME
        padded = waveforms.new_zeros(batch, window, dtype=torch.float32)
        keep = min(size, window)
        padded[:, :keep] = waveforms[:, :keep].float()
        # Zero whatever lies beyond each item's length, so batched == one by one.
        positions = torch.arange(window, device=waveforms.device)  # [W]
        padded = padded * (positions[None, :] < lengths.to(waveforms.device)[:, None])  # [B, W]
        mel = self.mel(padded)  # [B, n_mels, 2 * T]
        expected = (batch, self.n_mels, 2 * window // SAMPLES_PER_FRAME)
        assert mel.shape == expected, f"log-mel shape {tuple(mel.shape)} != {expected}"
        return mel

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encode a batch of at most ``max_samples`` samples per item.

        Args:
            waveforms: [B, S] float samples at 16 kHz, zero-padded after each item's length.
            lengths: [B] int64 valid samples per item.

        Returns:
            features [B, n_ctx, d_model] (in the weights' dtype; frames past an item's length
            encode the zero padding, as in SALMONN) and lengths [B] = ceil(samples / 320).
        """
        mel = self.log_mel(waveforms, lengths)
        param = self.backbone.conv1.weight  # both implementations start with conv1
        with torch.no_grad():
            mel = mel.to(device=param.device, dtype=param.dtype)
            if not self.pad_to_window:
                features = self._encode_unpadded(mel)  # [B, T, D]
            elif self.kind == "openai":
                features = self.backbone(mel)  # [B, n_ctx, D]
            else:
                features = self.backbone(input_features=mel).last_hidden_state  # [B, n_ctx, D]
        frames = self.n_ctx if self.pad_to_window else mel.shape[-1] // 2
        expected = (waveforms.shape[0], frames, self.output_dim)
        if tuple(features.shape) != expected:
            raise CheckpointError(
                f"Whisper backbone returned features of shape {tuple(features.shape)}, expected {expected}: "
                "the checkpoint's dims do not match its weights"
            )
        return EncoderOutput(features=features, lengths=self.frame_lengths(lengths).to(features.device))

    def _encode_unpadded(self, mel: torch.Tensor) -> torch.Tensor:
        """The encoder on fewer than ``2 * n_ctx`` mel frames, with the first T positional embeddings.

        Neither openai-whisper nor transformers accepts a shorter input (both check for exactly
        3000 frames), so the same layers are run here in the same order.

        Args:
            mel: [B, n_mels, 2T] log-mel.

        Returns:
            [B, T, D] features after the final LayerNorm.
        """
        b = self.backbone
        x = F.gelu(b.conv1(mel))  # [B, D, 2T]
        x = F.gelu(b.conv2(x)).permute(0, 2, 1)  # [B, T, D]
        frames = x.shape[1]
        if self.kind == "openai":
            x = x + b.positional_embedding[:frames].to(x.dtype)
            for block in b.blocks:
                x = block(x)
            return b.ln_post(x)
        x = x + b.embed_positions.weight[:frames].to(x.dtype)
        for layer in b.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        return b.layer_norm(x)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, n_mels={self.n_mels}, n_ctx={self.n_ctx}, d_model={self.output_dim}, "
            f"max_samples={self.max_samples}, pad_to_window={self.pad_to_window}"
        )
