"""Hugging Face <-> openai-whisper state-dict names, shared by the Whisper tests."""

from __future__ import annotations

import torch

# Hugging Face -> openai-whisper state-dict names, applied in order to each key.
HF_TO_OPENAI_RULES: list[tuple[str, str]] = [
    ("model.", ""),
    (".layers.", ".blocks."),
    ("self_attn_layer_norm", "attn_ln"),
    ("encoder_attn_layer_norm", "cross_attn_ln"),
    ("final_layer_norm", "mlp_ln"),
    (".self_attn.", ".attn."),
    (".encoder_attn.", ".cross_attn."),
    ("q_proj", "query"),
    ("k_proj", "key"),
    ("v_proj", "value"),
    ("out_proj", "out"),
    ("fc1", "mlp.0"),
    ("fc2", "mlp.2"),
    ("encoder.layer_norm", "encoder.ln_post"),
    ("decoder.layer_norm", "decoder.ln"),
    ("encoder.embed_positions.weight", "encoder.positional_embedding"),
    ("decoder.embed_positions.weight", "decoder.positional_embedding"),
    ("decoder.embed_tokens", "decoder.token_embedding"),
]


def hf_to_openai_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``WhisperForConditionalGeneration`` state dict to openai-whisper's names (proj_out is tied)."""
    out = {}
    for key, value in hf_state.items():
        if key.startswith("proj_out."):
            continue
        for old, new in HF_TO_OPENAI_RULES:
            key = key.replace(old, new, 1) if old == "model." else key.replace(old, new)
        out[key] = value.clone()
    return out
