"""Official SALMONN checkpoints (``salmonn_v1.pth``, ``salmonn_7b_v0.pth``) <-> omnivox weights.

The official trainer saves ``{"model": state_dict, "optimizer": ..., "config": ..., "scaler": ...,
"epoch": ...}`` where ``state_dict`` holds only the trained parameters (the frozen Whisper, BEATs
and LLaMA weights are dropped) plus every buffer. So ``ckpt["model"]`` holds:

- the audio adapter: ``ln_speech.*``, ``ln_audio.*``, ``speech_query_tokens``,
  ``speech_Qformer.bert.embeddings.LayerNorm.*``, ``speech_Qformer.bert.encoder.layer.N.*``,
  ``speech_llama_proj.*`` -> ``SalmonnWeights.adapter_state`` (names of ``AudioAdapter``);
- LoRA on the LLM: ``llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.default.weight``
  -> ``SalmonnWeights.lora_state`` in peft's saved-adapter names
  (``base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight``), r=8, alpha=32;
- buffers that omnivox does not need (``IGNORED_KEYS``): BERT's ``position_ids``, LLaMA's rotary
  ``inv_freq``, and ``beats.*`` (state_dict() repeats BEATs' shared relative-position bias under
  every layer's name, and only the first name was dropped as frozen).

Anything else is an error, as is anything missing or of the wrong shape: a silently skipped LoRA
prefix would leave LoRA at zero and give plausible but degraded answers.

``convert_salmonn`` writes an omnivox model folder from such a checkpoint (``omnivox convert
salmonn``). The base LLM and the encoders are referenced, not copied: by hub id, or by absolute
path when they are local. Only the trained parts are written (adapter, LoRA, tokenizer).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from omnivox.adapters.qformer import AudioAdapter, QFormerConfig
from omnivox.agent.config import AudioSettings, EncoderRef, LoraSettings, OmnivoxConfig
from omnivox.encoders.base import sha256_file
from omnivox.errors import CheckpointError

if TYPE_CHECKING:
    import peft

logger = logging.getLogger(__name__)

# ---- the official names, in one place ------------------------------------------------------

QFORMER_PREFIX = "speech_Qformer.bert."
# Official names of the per-encoder LayerNorms, by encoder index (Whisper, then BEATs).
ENCODER_NORM_NAMES: tuple[str, ...] = ("ln_speech", "ln_audio")
# Official module (under ``speech_Qformer.bert.encoder.layer.N.``) -> ours (under ``layers.N.``).
LAYER_MODULES: dict[str, str] = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_norm",
    "crossattention.self.query": "cross_attn.q_proj",
    "crossattention.self.key": "cross_attn.k_proj",
    "crossattention.self.value": "cross_attn.v_proj",
    "crossattention.output.dense": "cross_attn.out_proj",
    "crossattention.output.LayerNorm": "cross_attn_norm",
    "intermediate_query.dense": "ffn.up",
    "output_query.dense": "ffn.down",
    "output_query.LayerNorm": "ffn_norm",
}
# Official top-level module/parameter -> ours.
TOP_MODULES: dict[str, str] = {
    "speech_query_tokens": "queries",
    QFORMER_PREFIX + "embeddings.LayerNorm": "query_norm",
    "speech_llama_proj": "projection",
}
LORA_KEY = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_(A|B)\.default\.weight$"
)
PEFT_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.lora_(A|B)\.weight$")
_OTHER_LORA_TARGET = re.compile(r"^llama_model\.base_model\.model\.model\.layers\.\d+\..*\.lora_")
_LAYER_KEY = re.compile(r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# Keys that are tolerated and reported, never loaded: pattern -> reason.
IGNORED_KEYS: dict[re.Pattern[str], str] = {
    re.compile(r"^speech_Qformer\.bert\.embeddings\.position_ids$"): (
        "BERT position-id buffer; the Q-Former has no position embeddings"
    ),
    re.compile(r"^llama_model\..*\.rotary_emb\.inv_freq$"): "LLaMA rotary buffer; the LLM recomputes it",
    re.compile(r"^beats\."): "frozen BEATs weights (shared-bias aliases); BEATs loads from its own checkpoint",
}
SALMONN_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ("q_proj", "v_proj")}
_MAX_LISTED = 40


# ---- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What a conversion matched and what it ignored.

    Attributes:
        source: file name (or ``"<state dict>"``).
        matched: loaded tensors per group (``input_norms``, ``queries``, ``query_norm``,
            ``qformer_layers``, ``projection``, ``lora``).
        ignored: ``(key, reason)`` for each tolerated ``ckpt["model"]`` entry that was not loaded.
        ignored_entries: top-level checkpoint entries besides ``"model"`` (optimizer, config, ...).
    """

    source: str
    matched: dict[str, int]
    ignored: tuple[tuple[str, str], ...] = ()
    ignored_entries: tuple[str, ...] = ()

    def summary(self) -> str:
        """One paragraph for logs: matched counts, ignored counts by reason."""
        matched = ", ".join(f"{group} {n}" for group, n in self.matched.items())
        by_reason = Counter(reason for _, reason in self.ignored)
        ignored = "; ".join(f"{n} x {reason}" for reason, n in by_reason.items()) or "none"
        entries = ", ".join(self.ignored_entries) or "none"
        return (f"{self.source}: matched {sum(self.matched.values())} tensors ({matched}); "
                f"ignored keys: {ignored}; ignored top-level entries: {entries}")


@dataclass(frozen=True)
class SalmonnWeights:
    """An official SALMONN checkpoint in omnivox's layout.

    Attributes:
        qformer_config: adapter geometry (inferred from the shapes, or as given).
        adapter_state: ``AudioAdapter`` state dict, ready for ``load_state_dict(strict=True)``.
        lora_state: LoRA weights in peft's saved-adapter names, ready to be written as
            ``adapter_model.safetensors`` beside ``lora_config()``'s ``adapter_config.json``.
        lora_rank: LoRA r, from the shapes (8 for the released checkpoints).
        num_llm_layers: LLM layers that carry LoRA (40 for 13B, 32 for 7B).
        report: what matched and what was ignored.
        lora_alpha / lora_dropout / lora_targets: SALMONN's LoRA settings (not stored in the file).
    """

    qformer_config: QFormerConfig
    adapter_state: dict[str, Tensor]
    lora_state: dict[str, Tensor]
    lora_rank: int
    num_llm_layers: int
    report: LoadReport
    lora_alpha: int = SALMONN_LORA["lora_alpha"]
    lora_dropout: float = SALMONN_LORA["lora_dropout"]
    lora_targets: tuple[str, ...] = field(default=SALMONN_LORA["target_modules"])

    def build_adapter(self) -> AudioAdapter:
        """A fresh ``AudioAdapter`` holding these weights (strict load), in eval mode."""
        adapter = AudioAdapter(self.qformer_config)
        adapter.load_state_dict(self.adapter_state, strict=True)
        return adapter.eval()

    def lora_config(self, base_model_name_or_path: str | None = None) -> peft.LoraConfig:
        """The peft ``LoraConfig`` SALMONN trained with (causal LM, r, alpha, dropout, q/v targets)."""
        import peft

        return peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=self.lora_rank, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, target_modules=list(self.lora_targets),
            base_model_name_or_path=base_model_name_or_path,
        )

    def write_peft_adapter(self, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by ``PeftModel.from_pretrained``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lora_config(base_model_name_or_path).save_pretrained(str(directory))
        save_file({k: v.contiguous() for k, v in self.lora_state.items()}, str(directory / "adapter_model.safetensors"))
        return directory


# ---- name mapping ----------------------------------------------------------------------------


def official_adapter_names(config: QFormerConfig) -> dict[str, str]:
    """Official key -> ``AudioAdapter`` key, for every adapter tensor of ``config``.

    Raises ValueError when ``config`` has more encoders than SALMONN has names for (2).
    """
    if len(config.encoder_dims) > len(ENCODER_NORM_NAMES):
        raise ValueError(f"SALMONN names {len(ENCODER_NORM_NAMES)} encoders, config has {len(config.encoder_dims)}")
    names: dict[str, str] = {}
    for i, norm in enumerate(ENCODER_NORM_NAMES[: len(config.encoder_dims)]):
        for p in ("weight", "bias"):
            names[f"{norm}.{p}"] = f"input_norms.{i}.{p}"
    names["speech_query_tokens"] = "queries"
    for official, ours in TOP_MODULES.items():
        if official != "speech_query_tokens":
            for p in ("weight", "bias"):
                names[f"{official}.{p}"] = f"{ours}.{p}"
    for n in range(config.num_layers):
        has_cross = n % config.cross_attention_every == 0
        for official, ours in LAYER_MODULES.items():
            if official.startswith("crossattention") and not has_cross:
                continue
            for p in ("weight", "bias"):
                names[f"{QFORMER_PREFIX}encoder.layer.{n}.{official}.{p}"] = f"layers.{n}.{ours}.{p}"
    return names


def _adapter_shapes(config: QFormerConfig) -> dict[str, tuple[int, ...]]:
    """``AudioAdapter`` key -> shape, without allocating (meta device)."""
    with torch.device("meta"):
        adapter = AudioAdapter(config)
    return {k: tuple(v.shape) for k, v in adapter.state_dict().items()}


def _group(ours: str) -> str:
    return "qformer_layers" if ours.startswith("layers.") else ours.split(".")[0]


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


# ---- conversion ------------------------------------------------------------------------------


def infer_qformer_config(state: Mapping[str, Tensor], *, num_heads: int | None = None,
                         source: str = "<state dict>") -> QFormerConfig:
    """Adapter geometry from the official tensors' shapes.

    Window/stride/frame rate, LayerNorm eps and the activation are not in the shapes and take
    SALMONN's values. ``num_heads`` is not in the shapes either: it defaults to 12 when the hidden
    size is 768 (BERT-base) and must be given otherwise.
    """
    needed = ["ln_speech.weight", "speech_query_tokens", "speech_llama_proj.weight",
              f"{QFORMER_PREFIX}encoder.layer.0.intermediate_query.dense.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{source} is not a SALMONN checkpoint: cannot infer the Q-Former geometry, "
                              f"missing keys {missing}")
    dims = [state["ln_speech.weight"].shape[0]]
    if "ln_audio.weight" in state:
        dims.append(state["ln_audio.weight"].shape[0])
    queries = state["speech_query_tokens"]
    if queries.dim() != 3 or queries.shape[0] != 1:
        raise CheckpointError(f"{source}: speech_query_tokens must be [1, Q, H], got {list(queries.shape)}")
    hidden = queries.shape[2]
    layer_ids = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    num_layers = max(layer_ids) + 1
    cross = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k)) and m.group(2).startswith("crossattention.")}
    every = next((f for f in range(1, num_layers + 1) if cross == {i for i in range(num_layers) if i % f == 0}), None)
    if every is None:
        raise CheckpointError(f"{source}: layers with cross-attention {sorted(cross)} of {num_layers} follow no "
                              "'every f-th layer' pattern")
    if num_heads is None:
        if hidden != 768:
            raise CheckpointError(f"{source}: Q-Former hidden size is {hidden}; the number of attention heads is not "
                                  "stored in the checkpoint, pass num_heads= (or qformer_config=)")
        num_heads = 12
    try:
        return QFormerConfig(
            encoder_dims=tuple(dims), hidden_size=hidden, num_layers=num_layers, num_heads=num_heads,
            intermediate_size=state[f"{QFORMER_PREFIX}encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            queries_per_window=queries.shape[1], cross_attention_every=every,
            llm_hidden_size=state["speech_llama_proj.weight"].shape[0],
        )
    except ValueError as exc:
        raise CheckpointError(f"{source}: inferred Q-Former geometry is invalid: {exc}") from exc


def convert_salmonn_state(state: Mapping[str, Any], qformer_config: QFormerConfig | None = None, *,
                          num_heads: int | None = None, source: str = "<state dict>",
                          ignored_entries: tuple[str, ...] = ()) -> SalmonnWeights:
    """Convert an official ``ckpt["model"]`` state dict; see ``load_salmonn_checkpoint``."""
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: ckpt['model'] entries that are not tensors: {not_tensors[:_MAX_LISTED]}")
    if qformer_config is None:
        config = infer_qformer_config(state, num_heads=num_heads, source=source)
    else:
        if num_heads is not None and num_heads != qformer_config.num_heads:
            raise ValueError(f"num_heads={num_heads} contradicts qformer_config.num_heads={qformer_config.num_heads}")
        config = qformer_config

    names = official_adapter_names(config)
    shapes = _adapter_shapes(config)
    ignored: list[tuple[str, str]] = []
    lora: dict[tuple[int, str, str], Tensor] = {}
    bad_prefix: list[str] = []
    unknown: list[str] = []
    wrong_shape: list[str] = []
    adapter_state: dict[str, Tensor] = {}
    for key, value in state.items():
        reason = next((r for pattern, r in IGNORED_KEYS.items() if pattern.search(key)), None)
        if reason is not None:
            ignored.append((key, reason))
        elif m := LORA_KEY.match(key):
            lora[(int(m.group(1)), m.group(2), m.group(3))] = value
        elif _OTHER_LORA_TARGET.match(key):
            unknown.append(f"{key} {list(value.shape)} (LoRA on a module other than q_proj/v_proj)")
        elif "lora_" in key:
            bad_prefix.append(key)
        elif key in names:
            ours = names[key]
            if tuple(value.shape) != shapes[ours]:
                wrong_shape.append(f"{key}: expected {list(shapes[ours])}, got {list(value.shape)}")
            adapter_state[ours] = value
        else:
            unknown.append(f"{key} {list(value.shape)}")
    missing = [k for k in names if names[k] not in adapter_state]

    # LoRA: every layer 0..N-1 needs q/v A/B; A is [r, llm_hidden], B is [out, r].
    num_llm_layers = max((n for n, _, _ in lora), default=-1) + 1
    ranks = Counter(t.shape[0] for (_, _, ab), t in lora.items() if ab == "A")
    rank = ranks.most_common(1)[0][0] if ranks else 0
    # v_proj's output is narrower than the hidden size under grouped-query attention; take the file's.
    v_out = Counter(t.shape[0] for (_, proj, ab), t in lora.items() if proj == "v_proj" and ab == "B")
    expected_lora = {
        (n, proj, "A"): (rank, config.llm_hidden_size) for n in range(num_llm_layers) for proj in ("q_proj", "v_proj")
    } | {
        (n, proj, "B"): (v_out.most_common(1)[0][0] if proj == "v_proj" and v_out else config.llm_hidden_size, rank)
        for n in range(num_llm_layers) for proj in ("q_proj", "v_proj")
    }

    def official_lora(n: int, proj: str, ab: str) -> str:
        return f"llama_model.base_model.model.model.layers.{n}.self_attn.{proj}.lora_{ab}.default.weight"

    if not lora:
        missing.append(official_lora(0, "q_proj", "A") + " (no LoRA weights at all; the LLM would run without them)")
    for k, shape in expected_lora.items():
        if k not in lora:
            missing.append(official_lora(*k))
        elif tuple(lora[k].shape) != shape:
            wrong_shape.append(f"{official_lora(*k)}: expected {list(shape)}, got {list(lora[k].shape)}")

    if missing or wrong_shape or unknown or bad_prefix:
        sections = []
        if bad_prefix:
            sections.append(_listing(
                "LoRA keys with an unexpected prefix (expected 'llama_model.base_model.model.model.layers.N."
                "self_attn.{q,v}_proj.lora_{A,B}.default.weight'; skipping them would leave LoRA at zero)",
                sorted(bad_prefix)))
        if missing:
            sections.append(_listing("missing keys", missing))
        if wrong_shape:
            sections.append(_listing("wrong shapes", wrong_shape))
        if unknown:
            sections.append(_listing("unknown keys", sorted(unknown)))
        raise CheckpointError(f"{source} does not match the SALMONN layout for {config}:\n" + "\n".join(sections))

    lora_state = {
        f"base_model.model.model.layers.{n}.self_attn.{proj}.lora_{ab}.weight": t
        for (n, proj, ab), t in sorted(lora.items())
    }
    matched = Counter(_group(k) for k in adapter_state)
    matched["lora"] = len(lora_state)
    report = LoadReport(source=source, matched=dict(matched), ignored=tuple(ignored),
                        ignored_entries=tuple(ignored_entries))
    logger.info(report.summary())
    return SalmonnWeights(qformer_config=config, adapter_state=adapter_state, lora_state=lora_state,
                          lora_rank=rank, num_llm_layers=num_llm_layers, report=report)


def load_salmonn_checkpoint(path: str | Path, qformer_config: QFormerConfig | None = None, *,
                            num_heads: int | None = None) -> SalmonnWeights:
    """Load an official SALMONN ``.pth`` into omnivox's adapter + peft LoRA layout.

    Args:
        path: ``salmonn_v1.pth`` / ``salmonn_7b_v0.pth`` or any checkpoint the official trainer saved.
        qformer_config: geometry to check the shapes against; ``None`` infers it from the shapes
            (window/stride and eps then take SALMONN's values).
        num_heads: Q-Former heads when inferring (not stored in the file; default 12 for hidden 768).

    Raises:
        CheckpointError: unreadable file, not a dict, no ``"model"``, or keys missing / of the wrong
            shape / unknown / LoRA under another prefix; the message lists every offending key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SALMONN checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"cannot read {path} as a torch checkpoint (weights_only=True): {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        kind = f"dict with keys {sorted(map(str, ckpt))[:20]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a SALMONN checkpoint: expected a dict with 'model', got a {kind}")
    if not isinstance(ckpt["model"], Mapping):
        raise CheckpointError(f"{path}: ckpt['model'] must be a state dict, got {type(ckpt['model']).__name__}")
    others = tuple(str(k) for k in ckpt if k != "model")
    return convert_salmonn_state(ckpt["model"], qformer_config, num_heads=num_heads, source=path.name,
                                 ignored_entries=others)


def export_salmonn_state(adapter: AudioAdapter, lora_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of the conversion: official ``ckpt["model"]`` names for an adapter and peft LoRA weights.

    Args:
        adapter: the omnivox adapter (at most two encoders: ``ln_speech``, ``ln_audio``).
        lora_state: peft saved-adapter names (``base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight``).

    Returns:
        State dict with the official names (the tolerated buffers are not produced).
    """
    ours_to_official = {ours: official for official, ours in official_adapter_names(adapter.config).items()}
    state = adapter.state_dict()
    if set(state) != set(ours_to_official):
        raise ValueError(f"adapter keys do not match its config: {sorted(set(state) ^ set(ours_to_official))}")
    out = {ours_to_official[k]: v.detach().clone() for k, v in state.items()}
    bad = [k for k in lora_state if not PEFT_LORA_KEY.match(k)]
    if bad:
        raise ValueError(f"LoRA keys not in peft's saved q_proj/v_proj format: {bad[:_MAX_LISTED]}")
    for k, v in lora_state.items():
        out["llama_model." + k.removesuffix(".weight") + ".default.weight"] = v.detach().clone()
    return out


# ---- model folder (``omnivox convert salmonn``) ------------------------------------------------


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
    logger.warning("%s", weights.report.summary())
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
