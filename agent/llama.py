"""A small inference runtime for Llama-architecture causal LMs that never imports transformers.

Why this file exists (omnivox prefers libraries; this is the exception, and why): a profile of
``omnivox chat`` start-up showed ``from transformers import AutoModelForCausalLM`` costing ~1.9 s
and ~230 MB on every start (it imports torch._dynamo, torch.distributed.tensor, sympy,
scipy.optimize, accelerate...). The start-up target (a whole-process question about a 10 s clip
in no more time than openai-whisper's CLI takes, ~2.5 s on the reference machine) cannot be met
while that import is on the path. So inference of a plain (or LoRA-folded) Llama goes through
this runtime; transformers stays the path for training, peft, quantization, beam search and
anything else this file does not cover (:meth:`LlamaForCausalLM.supported` says what that is,
and the loader falls back).

Numerics mirror transformers' ``models/llama/modeling_llama.py`` (v5) operation by operation,
so greedy answers are token-identical: RMSNorm in float32 then cast back; RoPE ``inv_freq`` /
``cos`` / ``sin`` computed in float32 as transformers does; attention through
``scaled_dot_product_attention`` called the way ``integrations/sdpa_attention.py`` calls it
(no mask and ``is_causal`` when nothing is padded, GQA by ``enable_gqa`` without a mask, by
folding the query heads for a single query position, else by ``repeat_kv``); the same boolean
causal-and-padding mask as ``masking_utils.sdpa_mask``; a KV cache that grows by concatenation
like ``DynamicCache``. :meth:`LlamaForCausalLM.generate` mirrors ``GenerationMixin._sample``
(position ids from the attention mask, logits of the last position only, the processors in
transformers' order).

Parameter names are transformers' (``model.layers.N.self_attn.q_proj.weight``...), so a
``model.safetensors`` written by either loads in the other, and
:class:`omnivox.adapters.lora.FoldedLora` finds the same modules.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"

# A logits processor: (new ids so far [B, t], scores [B, V]) -> scores [B, V], as in transformers.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _nested_rope(rope: dict) -> bool:
    return any(isinstance(v, dict) for v in rope.values())


@dataclass(frozen=True)
class LlamaConfig:
    """The geometry of a Llama causal LM, read from an HF ``config.json``.

    Missing optional fields take transformers' ``LlamaConfig`` defaults. ``raw`` keeps the file as
    read (written back by :meth:`LlamaForCausalLM.save_pretrained`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"Llama config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"Llama config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise CheckpointError(f"Llama config: rms_norm_eps {self.rms_norm_eps} and rope_theta {self.rope_theta} must be > 0")

    @staticmethod
    def supported(data: Any) -> str | None:
        """None when this runtime computes what transformers would for ``data`` (a parsed
        ``config.json``); else the reason it does not (the loader then uses transformers)."""
        if not isinstance(data, dict):
            return f"config.json holds a {type(data).__name__}, not an object"
        if data.get("model_type") != "llama":
            return f"model_type is {data.get('model_type')!r}, not 'llama'"
        architectures = data.get("architectures") or ["LlamaForCausalLM"]
        if architectures != ["LlamaForCausalLM"]:
            return f"architectures is {architectures}, not ['LlamaForCausalLM']"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if name not in data:
                return f"{name} is missing"
        if data.get("hidden_act", "silu") != "silu":
            return f"hidden_act is {data.get('hidden_act')!r}, not 'silu'"
        for name in ("attention_bias", "mlp_bias"):
            if data.get(name, False):
                return f"{name} is set"
        if data.get("quantization_config"):
            return "the weights are quantized (quantization_config)"
        if not data.get("is_causal", True):
            return "is_causal is false (bidirectional attention)"
        attn = data.get("_attn_implementation") or data.get("attn_implementation")
        if attn not in (None, "sdpa"):
            return f"attention implementation {attn!r} (the runtime computes transformers' 'sdpa')"
        # transformers v5: rope_scaling (legacy name) wins over rope_parameters
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            return f"rope_parameters is {rope!r}"
        if _nested_rope(rope):
            return "RoPE parameters per layer type"
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return f"RoPE type {rope_type!r} (only 'default' is implemented)"
        return None

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_FILE) -> LlamaConfig:
        """The config of ``data``; ``CheckpointError`` (naming ``source``) when it is not supported."""
        reason = cls.supported(data)
        if reason is not None:
            raise CheckpointError(f"{source}: not supported by the Llama runtime: {reason}")
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        heads = data["num_attention_heads"]
        try:
            return cls(
                vocab_size=data["vocab_size"],
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                num_hidden_layers=data["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=data.get("num_key_value_heads") or heads,
                head_dim=data.get("head_dim") or data["hidden_size"] // heads,
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
                max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=data.get("eos_token_id"),
                pad_token_id=data.get("pad_token_id"),
                raw=dict(data),
            )
        except CheckpointError as err:
            raise CheckpointError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        return cls.from_dict(_read_json(Path(path)), str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from None


# transformers' global generation defaults (GenerationConfig._get_default_generation_params) for the
# settings this runtime does not implement: a generation_config.json that sets any of them to
# another value is decoded by transformers instead.
_UNIMPLEMENTED_DEFAULTS: dict[str, Any] = {
    "min_length": 0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "num_return_sequences": 1,
    "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "guidance_scale": None, "min_p": None, "top_h": None, "max_length": 20,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False, "prefill_chunk_size": None,
    "cache_implementation": None, "compile_config": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
    "token_healing": False, "stop_strings": None, "watermarking_config": None, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "constraints": None, "force_words_ids": None, "renormalize_logits": False,
    "low_memory": None, "penalty_alpha": None, "dola_layers": None,
}  # fmt: skip


@dataclass(frozen=True)
class GenerationDefaults:
    """Decoding defaults of a model folder (``generation_config.json``, else ``config.json``'s ids).

    A ``generate`` argument left as None takes these, then transformers' global defaults, as in
    transformers. ``unimplemented`` names settings the runtime does not implement (``generate``
    then hands decoding to transformers); ``raw`` is the file as read.
    """

    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    unimplemented: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: LlamaConfig) -> GenerationDefaults:
        """transformers' ``GenerationConfig.from_model_config``: ``config.json``'s ids, the global defaults."""
        return cls(eos_token_id=_id_list(config.eos_token_id), pad_token_id=config.pad_token_id)

    @classmethod
    def from_files(cls, folder: Path, config: LlamaConfig) -> GenerationDefaults:
        """The defaults of ``folder/generation_config.json``, or :meth:`from_config` without that file."""
        path = folder / GENERATION_CONFIG_FILE
        if not path.is_file():
            return cls.from_config(config)
        data = _read_json(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        unimplemented = tuple(
            sorted(k for k, default in _UNIMPLEMENTED_DEFAULTS.items() if k in data and data[k] != default)
        )

        def get(name: str, default: Any) -> Any:
            value = data.get(name)
            return default if value is None else value

        return cls(
            eos_token_id=_id_list(data.get("eos_token_id")),
            pad_token_id=data.get("pad_token_id"),
            do_sample=bool(get("do_sample", False)),
            temperature=float(get("temperature", 1.0)),
            top_k=int(get("top_k", 50)),
            top_p=float(get("top_p", 1.0)),
            repetition_penalty=float(get("repetition_penalty", 1.0)),
            num_beams=int(get("num_beams", 1)),
            max_new_tokens=data.get("max_new_tokens"),
            min_new_tokens=int(get("min_new_tokens", 0)),
            unimplemented=unimplemented,
            raw=data,
        )


def _id_list(ids: int | Sequence[int] | None) -> list[int]:
    """A stop id, a list of them or None, as a list."""
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


# ----------------------------------------------------------------------------------- modules
class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # in float32 whatever the input dtype, then cast back before the weight (as transformers)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, float32 on the CPU (transformers' default RoPE)."""
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B or 1, T, head_dim] in ``x``'s dtype for ``position_ids`` [B or 1, T]."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv, S, d] -> [B, n_kv * n_rep, S, d] (each KV head repeated for its query heads)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, n_rep: int, scale: float
) -> torch.Tensor:
    """Attention as transformers' ``sdpa_attention_forward`` computes it on CPU and CUDA.

    Args:
        query: [B, n_heads, q, d]; key / value: [B, n_kv, kv, d].
        mask: [B, 1, q, kv] boolean (True: attend), or None for plain causal attention.
        n_rep: query heads per KV head.

    Returns:
        [B, q, n_heads, d]
    """
    q_length = query.shape[2]
    extra = {}
    if n_rep > 1:
        if mask is None and key.shape[-1] == value.shape[-1] <= 256:
            extra["enable_gqa"] = True
        elif q_length == 1:  # one query position: the heads of a KV group become its query rows
            batch, heads, _, dim = query.shape
            query = query.reshape(batch, heads // n_rep, n_rep, dim)  # [B, n_kv, n_rep, d]
        else:
            key = repeat_kv(key, n_rep)
            value = repeat_kv(value, n_rep)
    is_causal = q_length > 1 and mask is None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=is_causal, **extra
    )
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])  # [B, n_heads, q, d]
    return out.transpose(1, 2).contiguous()  # [B, q, n_heads, d]


class KVCache:
    """Keys and values [B, n_kv, S, d] of every layer, grown by concatenation (transformers' DynamicCache)."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_length(self) -> int:
        first = self.keys[0]
        return 0 if first is None else first.shape[-2]

    def repeat(self, rows: int) -> KVCache:
        """A cache of ``rows`` copies of this one-row cache (several continuations of one prefix)."""
        if self.keys[0] is None or self.keys[0].shape[0] != 1:
            raise ValueError("repeat needs a filled cache of one row")
        out = KVCache(len(self.keys))
        out.keys = [k.expand(rows, -1, -1, -1) for k in self.keys]  # views: update() concatenates anyway
        out.values = [v.expand(rows, -1, -1, -1) for v in self.values]
        return out

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            key = torch.cat([old_k, key], dim=-2)
            value = torch.cat([old_v, value], dim=-2)
        self.keys[layer], self.values[layer] = key, value
        return key, value


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """[B, T, H] -> [B, T, H]; ``cos`` / ``sin`` [B or 1, T, d]; ``mask`` as in :func:`sdpa_attention`."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, n_heads, T, d]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, n_kv, T, d]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, n_kv, T, d]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, d]
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        if cache is not None:
            key, value = cache.update(self.layer_idx, key, value)  # [B, n_kv, S, d]
        out = sdpa_attention(query, key, value, mask, self.num_key_value_groups, self.scaling)  # [B, T, n_heads, d]
        out = out.reshape(*input_shape, -1).contiguous()  # [B, T, n_heads * d]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, mask, cache) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:  # nn.Embedding's own init; on the meta device it would import torch._dynamo
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)


def causal_mask(
    attention_mask: torch.Tensor | None, batch: int, q_length: int, kv_length: int, q_offset: int, device: torch.device
) -> torch.Tensor | None:
    """The mask transformers' ``sdpa_mask`` builds: None when SDPA's own causal flag suffices.

    Args:
        attention_mask: [B, kv_length] (1: a real position, 0: padding), or None (no padding).
        q_offset: positions already in the cache before the queries.

    Returns:
        [B, 1, q_length, kv_length] boolean (True: attend), or None.
    """
    padding = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    no_padding = padding is None or bool(padding.all())
    if (q_length == 1 or kv_length == q_length) and no_padding:
        return None
    q_idx = torch.arange(q_length, device=device) + q_offset
    kv_idx = torch.arange(kv_length, device=device)
    mask = kv_idx[None, None, None, :] <= q_idx[None, None, :, None]  # [1, 1, q, kv]
    if padding is not None:
        mask = mask & padding[:, None, None, :]  # [B, 1, q, kv]
    return mask.expand(batch, -1, q_length, kv_length)


@dataclass
class CausalLMOutput:
    """``logits`` [B, kept, V]; ``cache`` the KV cache when one was used."""

    logits: torch.Tensor
    cache: KVCache | None = None


# ------------------------------------------------------------------------------- processors
# The logits processors transformers' generate builds, with their exact arithmetic.
def apply_repetition_penalty(new_ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor over the generated ids [B, t] (scores [B, V])."""
    vocab_size = scores.shape[-1]
    ids = new_ids.clamp(max=vocab_size)
    scores = F.pad(scores, (0, 1))
    score = torch.gather(scores, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, ids, score)[..., :vocab_size]


def suppress_tokens(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """MinNewTokensLengthLogitsProcessor's step: ``token_ids`` (the stop ids) get -inf."""
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    return torch.where(torch.isin(vocab, token_ids), -math.inf, scores)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """TopKLogitsWarper (min_tokens_to_keep 1)."""
    top_k = min(max(top_k, 1), scores.size(-1))
    indices_to_remove = scores < torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(indices_to_remove, -float("inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper (min_tokens_to_keep 1)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -1:] = 0
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    return scores.masked_fill(indices_to_remove, -float("inf"))


# ------------------------------------------------------------------------------------ model
class LlamaForCausalLM(nn.Module):
    """A Llama causal LM for inference, without transformers (see the module docstring).

    Build one with :meth:`from_pretrained`; ``LlamaForCausalLM(config)`` gives random weights.

    Args:
        config: the geometry.
        generation: decoding defaults (default: transformers' global defaults, ``config``'s ids).
    """

    def __init__(self, config: LlamaConfig, generation: GenerationDefaults | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = generation or GenerationDefaults.from_config(config)
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._transformers: list[nn.Module] = []  # the lazily built transformers twin (not a submodule)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def supported(cls, folder: str | Path) -> str | None:
        """None when :meth:`from_pretrained` can load ``folder``, else why not (then use transformers)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            return f"{folder} has no {CONFIG_FILE}"
        if not (folder / WEIGHTS_FILE).is_file():
            return f"{folder} has no single {WEIGHTS_FILE} (sharded or other weight formats are not read)"
        try:
            data = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as err:
            return f"{folder / CONFIG_FILE}: {err}"
        return LlamaConfig.supported(data)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> LlamaForCausalLM:
        """Load an HF Llama folder (``config.json`` + ``model.safetensors``), frozen, in eval mode.

        Raises ``CheckpointError`` when the folder is not supported (see :meth:`supported`), or the
        weights are missing, unexpected or mis-shaped (naming them).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        reason = cls.supported(folder)
        if reason is not None:
            raise CheckpointError(f"{folder}: not supported by the Llama runtime: {reason}")
        config = LlamaConfig.load(folder / CONFIG_FILE)
        generation = GenerationDefaults.from_files(folder, config)
        with torch.device("meta"):  # no random init of weights that are overwritten next
            model = cls(config, generation)
        path = folder / WEIGHTS_FILE
        try:
            state = load_file(path)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
        # tolerated extras: rotary buffers (old checkpoints), lm_head when it is tied (transformers ties it)
        for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
            del state[key]
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            del own["lm_head.weight"]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: expected {own[k]}, got {tuple(state[k].shape)}" for k in own if k in state and tuple(state[k].shape) != own[k]]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{path}: weights do not fit {folder / CONFIG_FILE}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, wrong shapes {shapes[:8]}"
            )
        state = {k: v.to(dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb.inv_freq = rope_inv_freq(config)  # the meta buffer, computed as transformers does
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        return model

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` (and ``generation_config.json``) readable by transformers too."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        raw = dict(self.config.raw) or {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        raw["dtype"] = str(self.dtype).removeprefix("torch.")
        (folder / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        if self.generation_config.raw:
            (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(self.generation_config.raw, indent=2) + "\n")
        return folder

    # ----------------------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutput:
        """Logits for a (left-padded) batch, as transformers' ``LlamaForCausalLM.forward``.

        Args:
            input_ids: [B, T] token ids, or
            inputs_embeds: [B, T, H] input vectors (exactly one of the two).
            attention_mask: [B, S + T] (1: real position, 0: left padding), S the cached length; None: no padding.
            position_ids: [B or 1, T]; default ``S .. S + T - 1`` for every row, padding included (as transformers).
            cache: the KV cache to read and extend; ``use_cache`` starts a new one when None.
            logits_to_keep: an int n keeps the last n positions (0: all), a 1-D tensor those positions.

        Returns:
            ``.logits`` [B, kept, V] and ``.cache``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)  # [B, T, H]
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, T, {self.config.hidden_size}], got {list(inputs_embeds.shape)}")
        batch, length = inputs_embeds.shape[:2]
        if cache is None and use_cache:
            cache = KVCache(self.config.num_hidden_layers)
        past = cache.seq_length if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
            raise ValueError(
                f"attention_mask must be [B, cached + new] = [{batch}, {past + length}], got {list(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past).unsqueeze(0)  # [1, T]
        mask = causal_mask(attention_mask, batch, length, past + length, past, inputs_embeds.device)
        hidden = inputs_embeds
        cos, sin = self.model.rotary_emb(hidden, position_ids)  # [B or 1, T, d]
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, mask, cache)
        hidden = self.model.norm(hidden)  # [B, T, H]
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, slice(-logits_to_keep, None), :]
        else:
            hidden = hidden[:, logits_to_keep, :]
        return CausalLMOutput(logits=self.lm_head(hidden), cache=cache)

    # -------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        num_beams: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        length_penalty: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
        use_cache: bool = True,
        **other: Any,
    ) -> torch.Tensor:
        """New token ids [B, new] for a left-padded batch of prompt vectors, as transformers' ``generate``.

        Greedy decoding and sampling run here; beam search (``num_beams`` > 1), arguments not listed
        above and folders whose ``generation_config.json`` sets something not implemented here are
        handed to transformers' ``generate`` on the same weights (importing transformers then).

        Args:
            inputs_embeds: [B, T, H] prompt vectors, left-padded.
            attention_mask: [B, T] (0 on the left padding), or None.
            max_new_tokens / min_new_tokens: answer length bounds; the stop ids are ruled out
                until ``min_new_tokens`` tokens are out.
            do_sample, temperature, top_k, top_p: sampling (transformers' warpers, in its order);
                None takes the folder's defaults, then transformers' (top_k 50).
            repetition_penalty: transformers' penalty over the tokens generated so far.
            length_penalty: beam search only.
            eos_token_id: the stop id(s); a row that made one is padded with ``pad_token_id``.
            streamer: an object with ``put(ids)`` / ``end()``; gets ``[B, 0]`` first, then each step's [B] ids.
            logits_processor: callables ``(new_ids [B, t], scores [B, V]) -> scores`` applied after the
                penalty and the minimum length, before the sampling warpers (as transformers orders them).
            use_cache: accepted for compatibility; generation from vectors always uses the cache
                (transformers forces it too).

        Returns:
            [B, n] ids, n <= ``max_new_tokens`` (rows that stopped early are padded).
        """
        defaults = self.generation_config
        beams = defaults.num_beams if num_beams is None else num_beams
        if max_new_tokens is None:
            max_new_tokens = defaults.max_new_tokens
        handoff = []
        if beams != 1:
            handoff.append(f"num_beams={beams}")
        if other:
            handoff.append(f"arguments {sorted(other)}")
        if defaults.unimplemented:
            handoff.append(f"generation_config.json settings {list(defaults.unimplemented)}")
        if max_new_tokens is None:
            handoff.append("no max_new_tokens")
        if inputs_embeds is None:
            handoff.append("no inputs_embeds")
        if handoff:
            log.info("Llama runtime: decoding with transformers for %s", ", ".join(handoff))
            kwargs = dict(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature,
                top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer, use_cache=use_cache,
            )  # fmt: skip
            kwargs = {k: v for k, v in kwargs.items() if v is not None} | other
            if logits_processor:
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList(list(logits_processor))
            return self.transformers_model().generate(**kwargs)

        assert inputs_embeds is not None and max_new_tokens is not None
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [B, T, H], got {list(inputs_embeds.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sample = defaults.do_sample if do_sample is None else do_sample
        temperature = defaults.temperature if temperature is None else float(temperature)
        top_k = defaults.top_k if top_k is None else int(top_k)
        top_p = defaults.top_p if top_p is None else float(top_p)
        penalty = defaults.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
        min_new = defaults.min_new_tokens if min_new_tokens is None else int(min_new_tokens)
        if sample and not temperature > 0:
            raise ValueError(f"sampling needs temperature > 0, got {temperature}")
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        stop = list(defaults.eos_token_id) if eos_token_id is None else _id_list(eos_token_id)
        pad = defaults.pad_token_id if pad_token_id is None else int(pad_token_id)
        if pad is None and stop:
            pad = stop[0]  # as transformers (with a warning there)

        device = self.device
        embeds = inputs_embeds.to(device)
        batch, length = embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)  # as transformers
        mask = attention_mask.to(device)
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must be [B, T] = [{batch}, {length}], got {list(mask.shape)}")
        # position ids count the real positions only (generate's rule; forward's default counts padding)
        positions = mask.long().cumsum(-1) - 1  # [B, T]
        positions = positions.masked_fill(mask == 0, 0)
        if bool((mask == 1).all()):
            mask = None  # no padding: no mask, as transformers
        stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
        processors = list(logits_processor or [])

        new_ids = torch.zeros(batch, 0, dtype=torch.long, device=device)  # [B, t]
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        if streamer is not None:
            streamer.put(new_ids.cpu())
        cache = KVCache(self.config.num_hidden_layers)
        out = self(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
        while True:
            scores = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # [B, V]
            if penalty != 1.0:
                scores = apply_repetition_penalty(new_ids, scores, penalty)
            if min_new > 0 and stop and new_ids.shape[1] < min_new:
                scores = suppress_tokens(scores, stop_ids)
            for processor in processors:
                scores = processor(new_ids, scores)
            if sample:
                if temperature != 1.0:
                    scores = scores / temperature
                if top_k != 0:
                    scores = top_k_filter(scores, top_k)
                if top_p < 1.0:
                    scores = top_p_filter(scores, top_p)
                probs = F.softmax(scores, dim=-1)
                tokens = torch.multinomial(probs, num_samples=1).squeeze(1)  # [B]
            else:
                tokens = torch.argmax(scores, dim=-1)  # [B]
            if stop:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            new_ids = torch.cat([new_ids, tokens[:, None]], dim=-1)
            if stop:
                unfinished = unfinished & ~torch.isin(tokens, stop_ids)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if new_ids.shape[1] >= max_new_tokens or int(unfinished.max()) == 0:
                break
            positions = positions[:, -1:] + 1  # [B, 1]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
            out = self(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
        if streamer is not None:
            streamer.end()
        return new_ids

    def _apply(self, fn, recurse=True):
        self._transformers.clear()  # .to() / .half() make new tensors: the twin would keep the old ones
        return super()._apply(fn, recurse)

    def transformers_model(self) -> nn.Module:
        """transformers' ``LlamaForCausalLM`` on this model's tensors (built once; the weights are shared,
        not copied, so an in-place weight edit such as ``FoldedLora.rescale`` reaches both)."""
        if not self._transformers:
            from transformers import GenerationConfig
            from transformers import LlamaConfig as HFLlamaConfig
            from transformers import LlamaForCausalLM as HFLlamaForCausalLM

            raw = self.config.raw or {
                "vocab_size": self.config.vocab_size, "hidden_size": self.config.hidden_size,
                "intermediate_size": self.config.intermediate_size, "num_hidden_layers": self.config.num_hidden_layers,
                "num_attention_heads": self.config.num_attention_heads, "num_key_value_heads": self.config.num_key_value_heads,
                "head_dim": self.config.head_dim, "rms_norm_eps": self.config.rms_norm_eps,
                "rope_theta": self.config.rope_theta, "max_position_embeddings": self.config.max_position_embeddings,
                "tie_word_embeddings": self.config.tie_word_embeddings,
            }  # fmt: skip
            hf_config = HFLlamaConfig.from_dict(raw)
            with torch.device("meta"):
                twin = HFLlamaForCausalLM(hf_config)
            twin.load_state_dict(self.state_dict(), strict=True, assign=True)
            if self.config.tie_word_embeddings:
                twin.lm_head.weight = twin.model.embed_tokens.weight
            rotary = twin.model.rotary_emb
            rotary.inv_freq = self.model.rotary_emb.inv_freq.clone()
            rotary.original_inv_freq = self.model.rotary_emb.inv_freq.clone()
            if self.generation_config.raw:
                twin.generation_config = GenerationConfig.from_dict(self.generation_config.raw)
            else:
                twin.generation_config = GenerationConfig.from_model_config(hf_config)
            twin.eval()
            twin.requires_grad_(False)
            self._transformers.append(twin)
        return self._transformers[0]
