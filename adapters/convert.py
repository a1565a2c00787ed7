"""Official SALMONN checkpoint -> omnivox model folder (``omnivox convert salmonn``).

The base LLM and the encoders are referenced, not copied: by hub id, or by absolute path
when they are local. Only the trained parts are written (adapter, LoRA, tokenizer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from omnivox.adapters.salmonn import load_salmonn_checkpoint
from omnivox.agent.config import AudioSettings, EncoderRef, LoraSettings, OmnivoxConfig
from omnivox.encoders.base import sha256_file
from omnivox.errors import CheckpointError

log = logging.getLogger(__name__)


def _local_or_ref(ref: str) -> str:
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def _whisper_width(ref: str) -> int | None:
    """d_model of a local HF Whisper folder (None when it cannot be read cheaply)."""
    config = Path(ref) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["d_model"])
    return None


def _beats_width(path: Path) -> int:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise CheckpointError(f"cannot read the BEATs checkpoint {path}: {err}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("cfg"), dict):
        raise CheckpointError(f"{path} is not a BEATs checkpoint (expected a dict with 'cfg' and 'model')")
    return int(ckpt["cfg"].get("encoder_embed_dim", 768))


def _llm_shape(ref: str) -> tuple[int, int] | None:
    """(hidden_size, num_hidden_layers) of a local HF LLM folder, None otherwise."""
    config = Path(ref) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return int(data["hidden_size"]), int(data["num_hidden_layers"])
    return None


def convert_salmonn(
    ckpt: Path, whisper: str, beats: str, llm: str, out: Path, num_heads: int | None = None
) -> Path:
    """Write an omnivox model folder for an official SALMONN checkpoint.

    Args:
        ckpt: ``salmonn_v1.pth`` / ``salmonn_7b_v0.pth`` (loaded with ``weights_only=True``).
        whisper: Whisper large-v2 as HF folder / hub id, openai-whisper ``.pt`` or name.
        beats: the BEATs checkpoint file SALMONN was trained with.
        llm: Vicuna as HF folder or hub id (its tokenizer gets SALMONN's ``[PAD]``).
        out: the folder to write.
        num_heads: Q-Former heads (default: hidden / 64, i.e. 12 for SALMONN).
    """
    weights = load_salmonn_checkpoint(ckpt, num_heads=num_heads)
    log.warning("%s", weights.report.summary())
    qformer = weights.qformer_config
    whisper_ref, llm_ref = _local_or_ref(whisper), _local_or_ref(llm)
    beats_path = Path(beats).expanduser()
    if not beats_path.is_file():
        raise CheckpointError(f"BEATs checkpoint not found: {beats} (SALMONN uses BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt)")
    widths = {"Whisper": (_whisper_width(whisper_ref), qformer.encoder_dims[0]), "BEATs": (_beats_width(beats_path), qformer.encoder_dims[1])}
    for name, (found, expected) in widths.items():
        if found is not None and found != expected:
            raise CheckpointError(f"{name} features are {found} wide, but the checkpoint's LayerNorm expects {expected}")
    shape = _llm_shape(llm_ref)
    if shape is not None:
        hidden, layers = shape
        if hidden != qformer.llm_hidden_size:
            raise CheckpointError(f"the LLM's hidden size is {hidden}, the checkpoint projects to {qformer.llm_hidden_size}")
        if layers != weights.num_llm_layers:
            raise CheckpointError(f"the LLM has {layers} layers, the checkpoint has LoRA for {weights.num_llm_layers}")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_ref)
    except OSError as err:
        raise CheckpointError(f"cannot load the tokenizer of {llm_ref!r}: {str(err).splitlines()[0]}") from None
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # as SALMONN does; padding never reaches the LLM here

    config = OmnivoxConfig(
        llm=llm_ref,
        encoders=(
            EncoderRef("whisper", whisper_ref),
            EncoderRef("beats", str(beats_path.resolve()), sha256=sha256_file(beats_path)),
        ),
        qformer=qformer,
        lora=LoraSettings(
            r=weights.lora_rank, alpha=float(weights.lora_alpha), dropout=weights.lora_dropout,
            target_modules=tuple(weights.lora_targets),
        ),
        prompt_style="salmonn",
        audio=AudioSettings(),
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")
    save_file({k: v.contiguous() for k, v in weights.adapter_state.items()}, out / "adapter.safetensors",
              metadata={"format": "pt", "omnivox": "adapter", "source": ckpt.name})
    weights.write_peft_adapter(out / "lora", base_model_name_or_path=llm_ref)
    tokenizer.save_pretrained(out / "tokenizer")
    return out
