"""Folding a saved peft LoRA into plain Linear weights: same weights as peft's merge, strict checks."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from omnivox.adapters.lora import WEIGHTS_FILE, FoldedLora
from omnivox.errors import CheckpointError


def _llm(tmp_path, seed=0):
    from transformers import AutoModelForCausalLM

    folder = tiny.make_llm(tmp_path / f"llm{seed}", vocab_size=64, seed=0)
    return AutoModelForCausalLM.from_pretrained(folder)


def _saved_lora(tmp_path, **lora_kwargs):
    """A peft LoRA on a tiny LLaMA with non-zero B, saved in peft's format; returns (folder, peft model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(_llm(tmp_path), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = tmp_path / "lora"
    peft_model.save_pretrained(folder)
    return folder, peft_model


@pytest.mark.parametrize("rslora", [False, True])
def test_folded_weights_equal_peft_merged_weights(tmp_path, rslora):
    folder, peft_model = _saved_lora(tmp_path, use_rslora=rslora)
    peft_model.merge_adapter()
    merged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
    plain = _llm(tmp_path)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    folded = FoldedLora.load(folder, plain)
    assert folded is not None and len(folded) == 3 * 2  # 3 targets x 2 layers
    folded.rescale(1.0)
    changed = 0
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6)
        changed += not torch.equal(value, before[name])
    assert changed == 6
    folded.rescale(0.0)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=1e-6)
    again = folded.save(tmp_path / "again")
    original, written = load_file(folder / WEIGHTS_FILE), load_file(again / WEIGHTS_FILE)
    assert sorted(original) == sorted(written) and all(torch.equal(original[k], written[k]) for k in original)
    assert json.loads((again / "adapter_config.json").read_text()) == json.loads((folder / "adapter_config.json").read_text())


def test_a_lora_feature_only_peft_merges_falls_back(tmp_path):
    folder, _ = _saved_lora(tmp_path, use_dora=True)
    assert FoldedLora.load(folder, _llm(tmp_path)) is None


def _rewrite(folder, change):
    state = load_file(folder / WEIGHTS_FILE)
    change(state)
    save_file(state, folder / WEIGHTS_FILE)


def _pair(module):
    return {f"base_model.model.{module}.lora_A.weight": torch.zeros(4, 32), f"base_model.model.{module}.lora_B.weight": torch.zeros(32, 4)}


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD_WEIGHTS = {
    "wrong shape": (lambda s: s.__setitem__(KEY, torch.zeros(4, 31)), r"lora_A \(4, 31\).*expected \(4, 32\)"),
    "A without B": (lambda s: s.pop(KEY.replace("lora_A", "lora_B")), "has lora_A only"),
    "unknown module": (lambda s: s.update(_pair("model.layers.7.self_attn.q_proj")), "no module 'model.layers.7"),
    "not a LoRA key": (lambda s: s.__setitem__("base_model.model.model.norm.weight", torch.zeros(32)), "not a LoRA A/B weight"),
    "not a Linear": (lambda s: s.update(_pair("model.norm")), "not a Linear layer"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_adapter_weights_are_rejected_with_the_numbers(tmp_path, case):
    folder, _ = _saved_lora(tmp_path)
    change, message = BAD_WEIGHTS[case]
    _rewrite(folder, change)
    with pytest.raises(CheckpointError, match=message):
        FoldedLora.load(folder, _llm(tmp_path))


def test_unreadable_adapter_files_are_rejected(tmp_path):
    folder, _ = _saved_lora(tmp_path)
    llm = _llm(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read the LoRA weights"):
        FoldedLora.load(folder, llm)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(CheckpointError, match="r=0"):
        FoldedLora.load(folder, llm)
    (folder / "adapter_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read the LoRA config"):
        FoldedLora.load(folder, llm)
