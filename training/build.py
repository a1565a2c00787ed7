"""Assemble the model a recipe trains: fresh from parts, or continued from a model folder.

The frozen encoders are loaded only when needed (to fill the feature cache or to encode on
the fly); otherwise :class:`CachedFeaturesEncoder` stand-ins carry their widths, so CPU
training holds just the adapter and the LLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from omnivox.adapters.qformer import AudioAdapter, QFormerConfig
from omnivox.agent.config import AudioSettings, EncoderRef, LoraSettings, OmnivoxConfig
from omnivox.agent.loading import (
    ENCODER_LOADERS,
    attach_lora,
    load_adapter_state,
    load_llm,
    load_tokenizer,
    resolve_ref,
)
from omnivox.agent.model import OmnivoxModel
from omnivox.encoders.base import SAMPLE_RATE, AudioEncoder, EncoderOutput
from omnivox.errors import CheckpointError
from omnivox.training.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- references
def resolve_reference(ref: str) -> str:
    """A local path for a config reference (``package:``, ``ct2-whisper:``, paths, hub ids).

    Configs and saved model folders keep the reference itself, so a folder stays valid on
    another machine; see :func:`omnivox.agent.model.resolve_ref`.
    """
    try:
        return resolve_ref(ref, None)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None


def encoder_refs(config: TrainConfig) -> tuple[EncoderRef, ...]:
    """The encoders of the model being trained, with references resolved to local paths where possible."""
    if config.model.init_from:
        folder = Path(config.model.init_from)
        return tuple(
            replace(ref, path=ref.path if ":" in ref.path else resolve_ref(ref.path, folder))
            for ref in load_folder_config(folder).encoders
        )
    refs = []
    for spec in config.model.encoders:
        path = spec.path
        if ":" not in path and Path(path).exists():  # a local path: absolute, the rest stays a reference
            path = str(Path(path).resolve())
        refs.append(EncoderRef(spec.kind, path, spec.sha256, dict(spec.options)))
    return tuple(refs)


def load_folder_config(folder: Path) -> OmnivoxConfig:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.init_from: {folder} is not an omnivox model folder (no config.json)")
    return OmnivoxConfig.load(folder / "config.json")


@dataclass(frozen=True)
class FeatureGeometry:
    """What decides the frozen features of a clip and their token counts (keys the feature cache)."""

    encoders: tuple[EncoderRef, ...]
    audio: AudioSettings
    frame_rate: float
    kernel_frames: int
    stride_frames: int
    queries_per_window: int


def feature_geometry(config: TrainConfig) -> FeatureGeometry:
    """The geometry of the model ``config`` trains, without loading any weights."""
    if config.model.init_from:
        folder_config = load_folder_config(Path(config.model.init_from))
        audio, qformer = folder_config.audio, folder_config.qformer
    else:
        audio = AudioSettings(**config.model.audio)
        n = len(config.model.encoders)
        qformer = QFormerConfig(encoder_dims=(1,) * n, llm_hidden_size=1, **config.model.qformer)
    return FeatureGeometry(
        encoders=encoder_refs(config),
        audio=audio,
        frame_rate=qformer.frame_rate,
        kernel_frames=qformer.kernel_frames,
        stride_frames=qformer.stride_frames,
        queries_per_window=qformer.queries_per_window,
    )


# ----------------------------------------------------------------------------- stand-in encoder
class CachedFeaturesEncoder(AudioEncoder):
    """Stands in for a frozen encoder whose features come from the feature cache.

    It has the real encoder's ``output_dim`` and accepts a full window, so the model
    assembles; calling it is an error.
    """

    def __init__(self, kind: str, output_dim: int, max_samples: int) -> None:
        super().__init__()
        self.kind = kind
        self.output_dim = output_dim
        self.frame_rate = 50.0
        self.max_samples = max_samples
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # gives parameters()/device a tensor

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        raise RuntimeError(
            f"the {self.kind} encoder was not loaded (features come from the cache); "
            "run with data.feature_cache = false or rebuild the cache"
        )


# ----------------------------------------------------------------------------- model
def resolve_device(config: TrainConfig, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local GPU if any, else CPU; under torchrun each rank uses ``cuda:local_rank``."""
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {config.device!r}: CUDA is not available on this machine")
        return torch.device(config.device if ":" in config.device else f"cuda:{local_rank}")
    return torch.device("cpu")


def build_model(
    config: TrainConfig,
    device: torch.device,
    *,
    load_encoders: bool,
    encoder_dims: tuple[int, ...] | None = None,
) -> OmnivoxModel:
    """The model to train, on ``device``, with exactly the trainable parameters requiring grad.

    Args:
        config: the recipe.
        device: where the adapter and LLM live.
        load_encoders: load the frozen encoders (else stand-ins of widths ``encoder_dims``).
        encoder_dims: encoder widths, required when ``load_encoders`` is False for a fresh model.

    Trainable: the adapter (both stages) and the LoRA weights (``instruct``). The adapter
    and LoRA stay float32 (autocast computes in ``config.dtype``); frozen LLM weights are
    stored in ``config.dtype`` on GPU and float32 on CPU.
    """
    compute = DTYPES[config.dtype]
    llm_dtype = compute if device.type == "cuda" else torch.float32
    quant = None if config.quantization == "none" else config.quantization
    refs = encoder_refs(config)
    window = None
    if config.model.init_from:
        folder = Path(config.model.init_from)
        base = load_folder_config(folder)
        llm_ref, gguf = resolve_ref(base.llm, folder), base.llm_gguf_file
        tok_dir = folder / "tokenizer"
        tokenizer = load_tokenizer(str(tok_dir), runtime=False) if tok_dir.is_dir() else load_tokenizer(llm_ref, gguf, runtime=False)
        qformer = base.qformer
        encoder_dims = qformer.encoder_dims
        omni = replace(base, llm=base.llm if ":" in base.llm else llm_ref, encoders=refs)
        adapter_state = load_file(folder / "adapter.safetensors") if (folder / "adapter.safetensors").is_file() else None
        if adapter_state is None:
            raise CheckpointError(f"{folder}: adapter.safetensors is missing")
        lora_dir = folder / "lora" if base.lora is not None else None
    else:
        llm_given, gguf = config.model.llm or "", config.model.llm_gguf_file
        llm_ref = resolve_reference(llm_given)
        tokenizer = load_tokenizer(llm_ref, gguf, runtime=False)
        omni = None
        adapter_state = None
        lora_dir = None
    audio = omni.audio if omni is not None else AudioSettings(**config.model.audio)
    window = round(audio.window_seconds * SAMPLE_RATE)

    if load_encoders:
        encoders: list[AudioEncoder] = [
            ENCODER_LOADERS[ref.kind](ref, resolve_reference(ref.path), str(device), torch.float32) for ref in refs
        ]
        encoder_dims = tuple(e.output_dim for e in encoders)
    else:
        if encoder_dims is None:
            raise ValueError("encoder_dims are needed when the encoders are not loaded")
        encoders = [CachedFeaturesEncoder(r.kind, d, window) for r, d in zip(refs, encoder_dims, strict=True)]

    # training needs transformers' model (peft, losses, activation checkpointing)
    llm = load_llm(llm_ref, gguf_file=gguf, dtype=llm_dtype, device=str(device), quantization=quant, runtime=False)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=config.activation_checkpointing)
    hidden = llm.get_input_embeddings().weight.shape[-1]
    if omni is None:
        lora = LoraSettings(**_lora_kwargs(config.model.lora)) if config.stage == "instruct" else None
        qformer = QFormerConfig(encoder_dims=tuple(encoder_dims), llm_hidden_size=hidden, **config.model.qformer)
        omni = OmnivoxConfig(
            llm=llm_given if ":" in llm_given else llm_ref,  # keep package:/hub references portable
            llm_gguf_file=gguf,
            encoders=refs,
            qformer=qformer,
            lora=lora,
            prompt_style=config.model.prompt_style or "salmonn",
            audio=audio,
        )
    elif omni.lora is None and config.stage == "instruct":
        omni = replace(omni, lora=LoraSettings(**_lora_kwargs(config.model.lora)))

    # fresh adapter / LoRA weights depend only on the seed (not on what was loaded before)
    torch.manual_seed(config.seed)
    adapter = AudioAdapter(omni.qformer)
    if adapter_state is not None:
        load_adapter_state(adapter, adapter_state, Path(config.model.init_from or "") / "adapter.safetensors")
    adapter.to(device=device, dtype=torch.float32)
    if omni.lora is not None:
        llm = attach_lora(llm, omni, lora_dir)
    model = OmnivoxModel(omni, encoders, adapter, llm, tokenizer)
    set_trainable(model, config.stage)
    if config.activation_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _lora_kwargs(values: dict) -> dict:
    out = dict(values)
    if "target_modules" in out:
        out["target_modules"] = tuple(out["target_modules"])
    return out


def set_trainable(model: OmnivoxModel, stage: str) -> None:
    """Freeze everything, then unfreeze the adapter (and the LoRA weights in ``instruct``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.adapter.parameters():
        p.requires_grad_(True)
    if stage == "instruct":
        lora = [p for name, p in model.llm.named_parameters() if "lora_" in name]
        if not lora:
            raise ConfigError("stage 'instruct' trains LoRA, but the LLM has no LoRA layers")
        for p in lora:
            p.data = p.data.float()
            p.requires_grad_(True)


def trainable_state(model: OmnivoxModel) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (``adapter.*``, ``llm.*lora_*``), detached on CPU."""
    return {
        name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(model: OmnivoxModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into the trainable parameters; every trainable parameter must be present, nothing else."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[name])


def drop_encoders(model: OmnivoxModel) -> None:
    """Replace the loaded encoders by stand-ins (frees their memory once the cache is built)."""
    window = round(model.config.audio.window_seconds * SAMPLE_RATE)
    model.encoders = nn.ModuleList(
        CachedFeaturesEncoder(ref.kind, enc.output_dim, max(window, enc.max_samples))
        for ref, enc in zip(model.config.encoders, model.encoders, strict=True)
    )
