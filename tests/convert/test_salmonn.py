"""SALMONN checkpoint converter: round trip, tolerated extras, loud failures, peft LoRA loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch

from omnivox.adapters.qformer import AudioAdapter, QFormerConfig
from omnivox.convert.salmonn import (
    IGNORED_KEYS,
    convert_salmonn_state,
    export_salmonn_state,
    load_salmonn_checkpoint,
    official_adapter_names,
)
from omnivox.errors import CheckpointError

TINY = dict(whisper_dim=16, beats_dim=8, hidden=32, heads=4, llm_hidden=32, llm_layers=2, llm_heads=4)
LORA = "llama_model.base_model.model.model.layers.{n}.self_attn.{proj}.lora_{ab}.default.weight"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "salmonn_tiny.pth"
    tiny.make_salmonn_checkpoint(path, **TINY)
    return path


def _rewrite(path: Path, edit) -> Path:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["model"])
    out = path.with_name("edited.pth")
    torch.save(ckpt, out)
    return out


# ---- happy path ----------------------------------------------------------------------------


def test_tiny_checkpoint_has_the_official_structure(tiny_ckpt: Path) -> None:
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "config", "scaler", "epoch"}
    assert set(ckpt["optimizer"]) == {"state", "param_groups"} and ckpt["optimizer"]["state"]
    keys = set(ckpt["model"])
    assert "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight" in keys
    assert ckpt["model"]["speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"].shape == (32, 24)
    assert LORA.format(n=1, proj="v_proj", ab="B") in keys
    qformer = [k for k in keys if k.startswith("speech_Qformer.")]
    assert len(qformer) == 55  # as in the released checkpoints (incl. position_ids)


def test_round_trip_official_ours_official(tiny_ckpt: Path) -> None:
    weights = load_salmonn_checkpoint(tiny_ckpt, num_heads=4)
    assert weights.lora_rank == 8 and weights.num_llm_layers == 2
    assert weights.qformer_config == QFormerConfig(encoder_dims=(16, 8), hidden_size=32, num_heads=4,
                                                   intermediate_size=128, llm_hidden_size=32)
    adapter = weights.build_adapter()  # strict load
    exported = export_salmonn_state(adapter, weights.lora_state)
    original = torch.load(tiny_ckpt, weights_only=True)["model"]
    kept = {k: v for k, v in original.items() if not any(p.search(k) for p in IGNORED_KEYS)}
    assert set(exported) == set(kept)
    for key, value in kept.items():
        assert torch.equal(exported[key], value), key


def test_extras_are_tolerated_and_reported(tiny_ckpt: Path) -> None:
    report = load_salmonn_checkpoint(tiny_ckpt, num_heads=4).report
    assert report.matched == {"input_norms": 4, "queries": 1, "query_norm": 2, "qformer_layers": 52,
                              "projection": 2, "lora": 8}
    ignored = dict(report.ignored)
    assert "speech_Qformer.bert.embeddings.position_ids" in ignored
    assert sum("rotary_emb.inv_freq" in k for k in ignored) == 2
    assert "beats.encoder.layers.1.self_attn.relative_attention_bias.weight" in ignored
    assert all(reason for reason in ignored.values())
    assert report.ignored_entries == ("optimizer", "config", "scaler", "epoch")
    assert "matched 69 tensors" in report.summary()


def test_without_extras(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    tiny.make_salmonn_checkpoint(path, **TINY, extras=False)
    assert load_salmonn_checkpoint(path, num_heads=4).report.ignored == ()


def test_real_salmonn_13b_geometry_on_meta() -> None:
    """Shape inference for salmonn_v1.pth (13B) without allocating: 40 LoRA layers, 2048-d windows."""
    with torch.device("meta"):
        adapter = AudioAdapter(QFormerConfig.salmonn(5120))
        lora = {}
        for n in range(40):
            for proj in ("q_proj", "v_proj"):
                lora[f"base_model.model.model.layers.{n}.self_attn.{proj}.lora_A.weight"] = torch.empty(8, 5120)
                lora[f"base_model.model.model.layers.{n}.self_attn.{proj}.lora_B.weight"] = torch.empty(5120, 8)
        state = export_salmonn_state(adapter, lora)
    assert len(state) == 61 + 160
    assert state["speech_Qformer.bert.encoder.layer.0.crossattention.self.value.weight"].shape == (768, 2048)
    weights = convert_salmonn_state(state)  # heads default to 12 for hidden 768
    assert weights.qformer_config == QFormerConfig.salmonn(5120)
    assert (weights.lora_rank, weights.num_llm_layers, weights.report.matched["lora"]) == (8, 40, 160)
    assert len(official_adapter_names(QFormerConfig.salmonn())) == 61


# ---- loud failures -------------------------------------------------------------------------


def test_missing_key(tiny_ckpt: Path) -> None:
    key = "speech_Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"
    path = _rewrite(tiny_ckpt, lambda m: m.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n\s+" + key.replace(".", r"\.")):
        load_salmonn_checkpoint(path, num_heads=4)


def test_missing_lora_tensor(tiny_ckpt: Path) -> None:
    key = LORA.format(n=1, proj="q_proj", ab="B")
    path = _rewrite(tiny_ckpt, lambda m: m.pop(key))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_salmonn_checkpoint(path, num_heads=4)


def test_wrong_shape(tiny_ckpt: Path) -> None:
    key = "speech_Qformer.bert.encoder.layer.0.crossattention.self.value.weight"
    path = _rewrite(tiny_ckpt, lambda m: m.__setitem__(key, torch.zeros(32, 20)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r": expected \[32, 24\], got \[32, 20\]"):
        load_salmonn_checkpoint(path, num_heads=4)


def test_shapes_checked_against_given_config(tiny_ckpt: Path) -> None:
    config = QFormerConfig(encoder_dims=(16, 8), hidden_size=32, num_heads=4, intermediate_size=64, llm_hidden_size=32)
    with pytest.raises(CheckpointError, match=r"intermediate_query\.dense\.weight: expected \[64, 32\], got \[128, 32\]"):
        load_salmonn_checkpoint(tiny_ckpt, config)


def test_unknown_key(tiny_ckpt: Path) -> None:
    path = _rewrite(tiny_ckpt, lambda m: m.__setitem__("speech_encoder.conv1.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unknown keys \(1\):\n\s+speech_encoder\.conv1\.weight \[3\]"):
        load_salmonn_checkpoint(path, num_heads=4)


@pytest.mark.parametrize("wrong_prefix", [
    "llama_model.base_model.model.layers.",  # one "model." short
    "llama_model.model.layers.",  # merged/no peft wrapper
    "base_model.model.model.layers.",  # peft names without SALMONN's attribute
])
def test_lora_under_another_prefix_is_an_error(tiny_ckpt: Path, wrong_prefix: str) -> None:
    right_prefix = "llama_model.base_model.model.model.layers."

    def rename(model: dict) -> None:
        for key in [k for k in model if k.startswith(right_prefix) and "lora_" in k]:
            model[wrong_prefix + key.removeprefix(right_prefix)] = model.pop(key)

    path = _rewrite(tiny_ckpt, rename)
    with pytest.raises(CheckpointError, match="unexpected prefix") as info:
        load_salmonn_checkpoint(path, num_heads=4)
    assert wrong_prefix + "0.self_attn.q_proj.lora_A.default.weight" in str(info.value)
    assert "no LoRA weights at all" in str(info.value)


def test_lora_on_other_modules_is_unknown(tiny_ckpt: Path) -> None:
    key = "llama_model.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    path = _rewrite(tiny_ckpt, lambda m: m.__setitem__(key, torch.zeros(8, 32)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" \[8, 32\] \(LoRA on a module other"):
        load_salmonn_checkpoint(path, num_heads=4)


def test_only_q_proj_lora(tiny_ckpt: Path) -> None:
    def drop_v(model: dict) -> None:
        for key in [k for k in model if "v_proj.lora_" in k]:
            del model[key]

    with pytest.raises(CheckpointError, match=r"missing keys \(4\)") as info:
        load_salmonn_checkpoint(_rewrite(tiny_ckpt, drop_v), num_heads=4)
    assert LORA.format(n=1, proj="v_proj", ab="A") in str(info.value)


def test_heads_must_be_given_for_non_bert_base_width(tiny_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="hidden size is 32.*pass num_heads="):
        load_salmonn_checkpoint(tiny_ckpt)


@pytest.mark.parametrize(("content", "message"), [
    ([torch.zeros(1)], "expected a dict with 'model', got a list"),
    ({"state_dict": {}}, r"expected a dict with 'model', got a dict with keys \['state_dict'\]"),
    ({"model": [1, 2]}, "ckpt\\['model'\\] must be a state dict"),
    ({"model": {"ln_speech.weight": 3}}, "not tensors: \\['ln_speech.weight'\\]"),
])
def test_not_a_salmonn_file(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_salmonn_checkpoint(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_salmonn_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_salmonn_checkpoint(tmp_path / "junk.pth")


def test_export_rejects_foreign_lora_names() -> None:
    adapter = AudioAdapter(QFormerConfig(encoder_dims=(4,), hidden_size=8, num_heads=2, intermediate_size=8,
                                         llm_hidden_size=8))
    with pytest.raises(ValueError, match="peft's saved"):
        export_salmonn_state(adapter, {"model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(1)})


# ---- LoRA into a real peft model -----------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_lora_state_loads_into_peft_llama(tiny_ckpt: Path, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    weights = load_salmonn_checkpoint(tiny_ckpt, num_heads=4)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model = get_peft_model(_tiny_llama(), weights.lora_config()).eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits  # fresh LoRA: B = 0, same as the base model
    result = set_peft_model_state_dict(model, weights.lora_state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(weights.lora_state)
    for key, value in weights.lora_state.items():
        assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3

    # the same weights written as a peft adapter folder
    folder = weights.write_peft_adapter(tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(_tiny_llama(), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, after)
    config = reloaded.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (
        8, 32, 0.1, {"q_proj", "v_proj"})
