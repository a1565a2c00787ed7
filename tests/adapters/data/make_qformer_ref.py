"""Regenerate ``qformer_ref.safetensors``: official SALMONN outputs for random tiny weights.

Not a test. It runs the *official* code, unchanged, which omnivox does not ship:

    git clone https://github.com/bytedance/SALMONN && git -C SALMONN checkout a58bba79  # branch "salmonn"
    mkdir -p /tmp/salmonn_ref/ref_models/beats && cp SALMONN/models/{Qformer,salmonn}.py /tmp/salmonn_ref/ref_models/
    # stubs for the heavy imports of salmonn.py that _encode_auditory_feature does not use:
    touch /tmp/salmonn_ref/ref_models/__init__.py /tmp/salmonn_ref/ref_models/beats/__init__.py
    echo "LlamaForCausalLM = None" > /tmp/salmonn_ref/ref_models/modeling_llama.py
    echo "WhisperModel = None" > /tmp/salmonn_ref/ref_models/modeling_whisper.py
    printf "BEATsConfig = None\\nBEATs = None\\n" > /tmp/salmonn_ref/ref_models/beats/BEATs.py
    echo "StoppingCriteriaSub = None" > /tmp/salmonn_ref/ref_models/utils.py
    SALMONN_REF=/tmp/salmonn_ref python tests/adapters/data/make_qformer_ref.py

Under transformers 5 the official ``Qformer.py`` needs a few helpers that transformers 4.28
had (``_shim_transformers``); they are restored with 4.28 semantics and touch no Q-Former math.
``SALMONN._encode_auditory_feature`` itself is called unbound on a stand-in ``self``.

Layout of the file: ``{model}.model.{official key}`` (the official state-dict entries, including
the ``position_ids`` buffer), ``{model}.{case}.{speech,audio,expected_f32,expected_f64}``; the
metadata entry ``omnivox_parity`` (JSON) gives each model's geometry and each case's window.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).with_name("qformer_ref.safetensors")

# name -> geometry. "A" is SALMONN's layout shrunk; "B" exercises Q > 1, 3 layers, cross-attention every 2nd.
MODELS = {
    "A": dict(whisper_dim=32, beats_dim=24, hidden=48, heads=4, ffn=96, layers=2, cross_freq=1, queries=1, llm=40),
    "B": dict(whisper_dim=16, beats_dim=8, hidden=16, heads=2, ffn=32, layers=3, cross_freq=2, queries=2, llm=16),
}
# model -> case -> (batch, whisper frames, beats frames, second_per_window, second_stride)
CASES = {
    "A": {
        "full": (1, 1500, 1496, 0.333333, 0.333333),  # 30 s: 88 windows, BEATs 4 frames short
        "short_beats": (2, 120, 90, 0.333333, 0.333333),
        "long_beats": (2, 60, 75, 0.333333, 0.333333),  # Whisper side gets padded
        "overlap": (2, 120, 110, 0.5, 0.25),  # kernel 25, stride round(12.5) = 12
    },
    "B": {"default": (2, 100, 90, 0.333333, 0.333333)},
}


def _shim_transformers() -> None:
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    from transformers import PreTrainedModel

    mu.apply_chunking_to_forward = pu.apply_chunking_to_forward
    mu.prune_linear_layer = pu.prune_linear_layer
    mu.find_pruneable_heads_and_indices = None  # only used for head pruning

    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
        assert head_mask is None
        return [None] * num_hidden_layers

    def invert_attention_mask(self, mask):
        ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        ext = ext.to(dtype=self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    def init_weights(self):
        self.apply(self._init_weights)

    PreTrainedModel.get_head_mask = get_head_mask
    PreTrainedModel.invert_attention_mask = invert_attention_mask
    PreTrainedModel.init_weights = init_weights


def _build_reference(geom: dict, gen: torch.Generator) -> nn.Module:
    from ref_models.Qformer import BertConfig, BertLMHeadModel

    cfg = BertConfig(
        hidden_size=geom["hidden"], num_attention_heads=geom["heads"], intermediate_size=geom["ffn"],
        num_hidden_layers=geom["layers"], vocab_size=16, max_position_embeddings=512,
    )
    # what SALMONN.init_speech_Qformer sets on bert-base-uncased's config
    cfg.encoder_width = geom["whisper_dim"] + geom["beats_dim"]
    cfg.add_cross_attention = True
    cfg.cross_attention_freq = geom["cross_freq"]
    cfg.query_length = geom["queries"]
    qformer = BertLMHeadModel(config=cfg)
    # what SALMONN.__init__ removes
    qformer.bert.embeddings.word_embeddings = None
    qformer.bert.embeddings.position_embeddings = None
    for layer in qformer.bert.encoder.layer:
        layer.output = None
        layer.intermediate = None
    qformer.cls = None

    ref = nn.Module()
    ref.ln_speech = nn.LayerNorm(geom["whisper_dim"])
    ref.ln_audio = nn.LayerNorm(geom["beats_dim"])
    ref.speech_Qformer = qformer
    ref.speech_query_tokens = nn.Parameter(torch.zeros(1, geom["queries"], geom["hidden"]))
    ref.speech_llama_proj = nn.Linear(geom["hidden"], geom["llm"])
    with torch.no_grad():  # random everything, so that a swapped tensor cannot go unnoticed
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or name.startswith("ln_"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return ref.eval()


def main() -> None:
    sys.path.insert(0, os.environ.get("SALMONN_REF", "/tmp/salmonn_ref"))
    torch.set_num_threads(1)
    _shim_transformers()
    from ref_models.salmonn import SALMONN

    gen = torch.Generator().manual_seed(1234)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for model_name, geom in MODELS.items():
        ref = _build_reference(geom, gen)
        for key, value in ref.state_dict().items():
            tensors[f"{model_name}.model.{key}"] = value.contiguous()
        meta[model_name] = {"geometry": geom, "cases": {}}
        for case_name, (batch, t_whisper, t_beats, win, stride) in CASES[model_name].items():
            speech = torch.randn(batch, t_whisper, geom["whisper_dim"], generator=gen) * 2 + 0.5
            audio = torch.randn(batch, t_beats, geom["beats_dim"], generator=gen) * 3 - 1
            expected = {}
            for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
                module = ref.to(dtype)
                self_ = types.SimpleNamespace(
                    maybe_autocast=contextlib.nullcontext, use_speech_Qformer=True, window_level_Qformer=True,
                    second_per_window=win, second_stride=stride, ln_speech=module.ln_speech,
                    ln_audio=module.ln_audio, speech_Qformer=module.speech_Qformer,
                    speech_query_tokens=module.speech_query_tokens, speech_llama_proj=module.speech_llama_proj,
                )
                with torch.no_grad():
                    out, atts = SALMONN._encode_auditory_feature(self_, speech.to(dtype), audio_embeds=audio.to(dtype))
                expected[tag] = out
            ref.to(torch.float32)
            prefix = f"{model_name}.{case_name}"
            tensors[f"{prefix}.speech"] = speech
            tensors[f"{prefix}.audio"] = audio
            tensors[f"{prefix}.expected_f32"] = expected["f32"].contiguous()
            tensors[f"{prefix}.expected_f64"] = expected["f64"].contiguous()
            meta[model_name]["cases"][case_name] = {"window_seconds": win, "stride_seconds": stride}
            print(model_name, case_name, tuple(expected["f32"].shape))
    save_file(tensors, str(OUT), metadata={"omnivox_parity": json.dumps(meta)})
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
