"""The transformers-free Llama runtime, tokenizer and streamer: parity with transformers on tiny models.

The reference is transformers itself (the suite has it): the same folder loaded with
``AutoModelForCausalLM`` / ``AutoTokenizer`` must give the same logits, token ids and text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from omnivox.adapters.lora import FoldedLora
from omnivox.agent.llama import GenerationDefaults, LlamaConfig, LlamaForCausalLM
from omnivox.agent.streaming import TextStreamer
from omnivox.agent.text_tokenizer import TextTokenizer
from omnivox.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
NANO_TOKENIZER = ROOT / "assets" / "nano" / "tokenizer"

TEXTS = [
    "Hello world", " leading space", "trailing  ", "The quick brown fox jumps over the lazy dog.",
    "What is said? Is anyone speaking?", "USER: <Speech></Speech> ASSISTANT:", "<|im_start|>user\nhi<|im_end|>",
    "<s> hi </s>", "don't won't I'm we're they've", "émigré café naïve", "日本語のテキスト", "中文测试一下",
    "emoji 🎉🔥 ok", "tabs\tand\nnewlines\n\n", "", " ", "1234567890 3.14159", "a , b . c ! d ?", "<unk><unk>",
    "multiple   spaces    here", "C++ && x->y; // comment", "https://example.com/a?b=c&d=e", "Ünïcödé ÅÄÖ",
    "ﬁ ligature", "\u200bzero width", "😀😀😀", "<|endoftext|>text", "Привет мир", "مرحبا بالعالم", "x" * 60,
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny HF Llama (hidden 32, 2 layers, 4 heads / 2 KV heads, untied) with its BPE tokenizer."""
    folder = tmp_path_factory.mktemp("llama") / "llm"
    tokenizer = tiny.make_tokenizer(folder)
    return tiny.make_llm(folder, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runtime(folder) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder)


def _batch(batch: int = 3, length: int = 12, pads: tuple[int, ...] = (0, 4, 7), seed: int = 0):
    """Left-padded prompt vectors [B, T, 32] (zeros under the padding) and their mask [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, 32, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads[:batch]):
        mask[row, :pad] = 0
        embeds[row, :pad] = 0
    return embeds, mask


# ------------------------------------------------------------------------------ config
def test_config_reads_both_rope_layouts_and_names_what_it_does_not_support():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    assert LlamaConfig.supported(base) is None
    config = LlamaConfig.from_dict({**base, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert (config.rope_theta, config.head_dim, config.num_key_value_heads) == (100000.0, 4, 2)
    assert LlamaConfig.from_dict({**base, "rope_theta": 500.0}).rope_theta == 500.0
    reasons = {
        "hidden_act": {**base, "hidden_act": "gelu"},
        "attention_bias": {**base, "attention_bias": True},
        "llama3": {**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "mistral": {**base, "model_type": "mistral"},
        "quantized": {**base, "quantization_config": {"quant_method": "bitsandbytes"}},
        "vocab_size": {k: v for k, v in base.items() if k != "vocab_size"},
    }
    for word, data in reasons.items():
        reason = LlamaConfig.supported(data)
        assert reason is not None and word in reason, (word, reason)
    with pytest.raises(CheckpointError, match="llama3"):
        LlamaConfig.from_dict(reasons["llama3"])


def test_unsupported_generation_settings_are_listed(tmp_path, folder):
    config = LlamaConfig.load(folder / "config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3], "no_repeat_ngram_size": 3, "top_k": 20}))
    defaults = GenerationDefaults.from_files(tmp_path, config)
    assert defaults.eos_token_id == [2, 3] and defaults.top_k == 20
    assert defaults.unimplemented == ("no_repeat_ngram_size",)


# ------------------------------------------------------------------------------ forward
def test_logits_equal_transformers(reference, runtime):
    embeds, mask = _batch()
    with torch.no_grad():
        for kwargs in ({"inputs_embeds": embeds[:1]}, {"inputs_embeds": embeds, "attention_mask": mask}):
            ours = runtime(**kwargs).logits  # [B, T, V]
            theirs = reference(**kwargs).logits
            real = (kwargs.get("attention_mask", torch.ones(1, 12)) == 1)
            assert ours.shape == theirs.shape == (len(kwargs["inputs_embeds"]), 12, 320)
            torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)
        ids = torch.randint(0, 320, (2, 7))
        torch.testing.assert_close(runtime(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_logits_to_keep_projects_only_the_last_positions(runtime):
    embeds, mask = _batch()
    with torch.no_grad():
        full = runtime(inputs_embeds=embeds, attention_mask=mask).logits
        last3 = runtime(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=3).logits
        picked = runtime(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=torch.tensor([0, 11])).logits
    assert last3.shape == (3, 3, 320) and picked.shape == (3, 2, 320)
    torch.testing.assert_close(last3, full[:, -3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(picked[:, 1], full[:, 11], rtol=0, atol=1e-5)


def test_bad_inputs_fail_with_the_shapes(runtime):
    embeds, mask = _batch()
    with pytest.raises(ValueError, match=r"\[3, 12\]"):
        runtime(inputs_embeds=embeds, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="32"):
        runtime(inputs_embeds=torch.zeros(1, 4, 16))


# ----------------------------------------------------------------------------- generate
def _both(reference, runtime, seed: int | None = None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    theirs = reference.generate(**kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    ours = runtime.generate(**kwargs)
    return ours, theirs


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("min_new_tokens", [0, 5])
def test_greedy_tokens_equal_transformers(reference, runtime, batch, min_new_tokens):
    embeds, mask = _batch(batch)
    # 95 / 90 are among the tiny model's early greedy tokens: rows stop at different steps
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, min_new_tokens=min_new_tokens,
                  do_sample=False, num_beams=1, eos_token_id=[95, 90], pad_token_id=2)  # fmt: skip
    ours, theirs = _both(reference, runtime, **kwargs)
    assert ours.dtype == torch.long and ours.tolist() == theirs.tolist()
    rows = ours.tolist()
    stopped = [next(i for i, t in enumerate(r) if t in (95, 90)) for r in rows if {95, 90} & set(r)]
    assert all(s >= min_new_tokens for s in stopped)
    assert stopped or (batch, min_new_tokens) == (1, 5)  # that row runs to max_new_tokens
    for row in rows:  # after the stop token, only padding
        if {95, 90} & set(row):
            end = next(i for i, t in enumerate(row) if t in (95, 90))
            assert set(row[end + 1 :]) <= {2}


def test_max_new_tokens_bounds_the_answer(reference, runtime):
    embeds, mask = _batch()
    ours, theirs = _both(reference, runtime, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, eos_token_id=[2])
    assert ours.shape == (3, 4) and ours.tolist() == theirs.tolist()


def test_sampling_with_a_seed_equals_transformers_and_tiny_top_p_is_greedy(reference, runtime):
    embeds, mask = _batch()
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, eos_token_id=[95, 90], pad_token_id=2)
    for sampling in ({"temperature": 0.7, "top_p": 0.9}, {}, {"temperature": 1.5, "top_k": 5}):
        ours, theirs = _both(reference, runtime, seed=3, do_sample=True, **sampling, **kwargs)
        assert ours.tolist() == theirs.tolist()
        assert ((ours >= 0) & (ours < 320)).all()
    greedy = runtime.generate(**kwargs, do_sample=False)
    assert runtime.generate(**kwargs, do_sample=True, top_p=1e-9).tolist() == greedy.tolist()


def test_repetition_penalty_equals_transformers(reference, runtime):
    """Equal on a batch of one. In a left-padded batch transformers' penalty skips the first
    ``pad_length`` generated tokens of a row (it reads the prompt mask as if the prompt were in the
    ids, but with ``inputs_embeds`` the ids hold only new tokens); the runtime penalises every
    generated token, which is what transformers does for the same row alone."""
    embeds, mask = _batch()
    kwargs = dict(max_new_tokens=20, eos_token_id=[2], pad_token_id=2, repetition_penalty=1.5)
    plain = runtime.generate(inputs_embeds=embeds[:1], max_new_tokens=20, eos_token_id=[2])
    ours, theirs = _both(reference, runtime, inputs_embeds=embeds[:1], **kwargs)
    assert ours.tolist() == theirs.tolist() and ours.tolist() != plain.tolist()  # the penalty mattered
    batch = runtime.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    for row in range(3):
        real = mask[row] == 1
        alone = reference.generate(inputs_embeds=embeds[row : row + 1, real], **kwargs)
        assert batch[row].tolist() == alone[0].tolist()


def test_logits_processors_see_the_new_ids_and_change_the_choice(runtime):
    embeds, mask = _batch()
    seen = []

    def force_seven(new_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(new_ids.shape))
        out = torch.full_like(scores, float("-inf"))
        out[:, 7] = 0.0
        return out

    out = runtime.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, eos_token_id=[95], logits_processor=[force_seven])
    assert out.tolist() == [[7] * 4] * 3
    assert seen == [(3, 0), (3, 1), (3, 2), (3, 3)]


def test_streamer_gets_an_empty_prompt_then_each_step(runtime):
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(value.tolist())

        def end(self):
            calls.append("end")

    embeds, _ = _batch(1)
    out = runtime.generate(inputs_embeds=embeds, max_new_tokens=3, eos_token_id=[2], streamer=Recorder())
    assert calls == [[[]], *([t] for t in out[0].tolist()), "end"]


def test_beam_search_is_transformers_on_the_same_weights(reference, runtime):
    embeds, mask = _batch()
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, num_beams=3, eos_token_id=[95, 90], pad_token_id=2)
    ours, theirs = _both(reference, runtime, **kwargs)
    assert ours.tolist() == theirs.tolist()
    twin = runtime.transformers_model()
    assert twin.model.layers[0].self_attn.q_proj.weight.data_ptr() == runtime.model.layers[0].self_attn.q_proj.weight.data_ptr()


# ----------------------------------------------------------------------------- weights
def test_folded_lora_finds_the_modules_and_edits_both_models(tmp_path, folder, reference, runtime):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for n in range(2):
        for proj, (out_f, in_f) in {"self_attn.q_proj": (32, 32), "mlp.down_proj": (32, 64)}.items():
            state[f"base_model.model.model.layers.{n}.{proj}.lora_A.weight"] = torch.randn(4, in_f, generator=gen)
            state[f"base_model.model.model.layers.{n}.{proj}.lora_B.weight"] = torch.randn(out_f, 4, generator=gen)
    save_file(state, lora / "adapter_model.safetensors")
    model = LlamaForCausalLM.from_pretrained(folder)
    twin = model.transformers_model()  # built before the fold: it must see the edit (shared storage)
    folded = FoldedLora.load(lora, model)
    assert folded is not None and len(folded) == 4
    folded.rescale(1.0)
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    FoldedLora.load(lora, expected).rescale(1.0)
    embeds, mask = _batch()
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(ours, expected(inputs_embeds=embeds, attention_mask=mask).logits[:, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(twin(inputs_embeds=embeds, attention_mask=mask).logits[:, -1], ours, rtol=0, atol=1e-5)
        assert not torch.allclose(ours, runtime(inputs_embeds=embeds, attention_mask=mask).logits[:, -1])


def test_tied_embeddings_and_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    config = HFConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0)  # fmt: skip
    HFLlama(config).save_pretrained(tmp_path / "tied")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "tied")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.rope_theta == 100000.0 and model.config.head_dim == 8
    ids = torch.randint(0, 50, (2, 9))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
        model.save_pretrained(tmp_path / "again")
        assert "lm_head.weight" not in load_file(tmp_path / "again" / "model.safetensors")
        for again in (LlamaForCausalLM.from_pretrained(tmp_path / "again"), AutoModelForCausalLM.from_pretrained(tmp_path / "again")):
            torch.testing.assert_close(again(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["missing", "shape", "unexpected"])
def test_weights_that_do_not_fit_are_named(tmp_path, folder, case):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    if case == "missing":
        del state[key]
    elif case == "shape":
        state[key] = torch.zeros(3, 3)
    else:
        state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj" + (r".*\(3, 3\)" if case == "shape" else "")):
        LlamaForCausalLM.from_pretrained(bad)


def test_unsupported_folders_say_why(tmp_path, folder):
    assert LlamaForCausalLM.supported(folder) is None
    assert "config.json" in LlamaForCausalLM.supported(tmp_path)  # type: ignore[operator]
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "hidden_act": "gelu"}))
    assert "model.safetensors" in LlamaForCausalLM.supported(tmp_path)  # type: ignore[operator]
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert "gelu" in LlamaForCausalLM.supported(tmp_path)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="gelu"):
        LlamaForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("which", ["tiny", "nano"])
def test_tokenizer_ids_and_text_equal_autotokenizer(folder, which):
    from transformers import AutoTokenizer

    path = folder if which == "tiny" else NANO_TOKENIZER
    theirs, ours = AutoTokenizer.from_pretrained(path), TextTokenizer.from_pretrained(path)
    assert len(ours) == len(theirs)
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "bos_token", "eos_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for text in TEXTS:
        for special in (False, True):
            assert ours(text, add_special_tokens=special)["input_ids"] == theirs(text, add_special_tokens=special)["input_ids"], text
        assert ours.encode(text) == theirs.encode(text), text
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        for skip in (False, True):
            for part in (ids, ids[1:], ids[:-1]):  # partial sequences cut multi-byte characters
                assert ours.decode(part, skip_special_tokens=skip) == theirs.decode(part, skip_special_tokens=skip), text
    tokens = [theirs.eos_token, "zzzunknownzzz", theirs.unk_token]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.decode(torch.tensor([5, 6, 7])) == theirs.decode(torch.tensor([5, 6, 7]))
    assert ours.decode(7) == theirs.decode(7)


def test_tokenizer_save_pretrained_round_trip(tmp_path):
    from transformers import AutoTokenizer

    ours = TextTokenizer.from_pretrained(NANO_TOKENIZER)
    ours.save_pretrained(tmp_path / "tok")
    for again in (TextTokenizer.from_pretrained(tmp_path / "tok"), AutoTokenizer.from_pretrained(tmp_path / "tok")):
        assert again("Transcribe the speech.", add_special_tokens=False)["input_ids"] == ours("Transcribe the speech.", add_special_tokens=False)["input_ids"]


def test_tokenizer_refuses_what_it_does_not_reproduce(tmp_path, folder):
    def variant(name: str, **changes) -> Path:
        target = tmp_path / name
        target.mkdir()
        (target / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
        config = {**json.loads((folder / "tokenizer_config.json").read_text()), **changes}
        (target / "tokenizer_config.json").write_text(json.dumps(config))
        return target

    assert TextTokenizer.supported(folder) is None
    reasons = {
        "LlamaTokenizer": variant("llama", tokenizer_class="LlamaTokenizer"),
        "split_special_tokens": variant("split", split_special_tokens=True),
        "[MASK]": variant("mask", mask_token="[MASK]"),
    }
    for word, path in reasons.items():
        reason = TextTokenizer.supported(path)
        assert reason is not None and word in reason, (word, reason)
    with pytest.raises(CheckpointError, match="LlamaTokenizer"):
        TextTokenizer.from_pretrained(reasons["LlamaTokenizer"])
    assert "tokenizer.json" in TextTokenizer.supported(tmp_path)  # type: ignore[operator]


def test_tokenizer_post_processor_settings_like_transformers(tmp_path, folder):
    """transformers ignores add_bos_token / add_eos_token next to a tokenizer.json, and gives a
    tokenizer.json without a post-processor its plain template."""
    from transformers import AutoTokenizer

    for name, drop_post_processor in (("flags", False), ("no_post_processor", True)):
        target = tmp_path / name
        target.mkdir()
        data = json.loads((folder / "tokenizer.json").read_text())
        if drop_post_processor:
            data["post_processor"] = None
        (target / "tokenizer.json").write_text(json.dumps(data))
        config = {**json.loads((folder / "tokenizer_config.json").read_text()), "add_bos_token": True, "add_eos_token": True}
        (target / "tokenizer_config.json").write_text(json.dumps(config))
        ours, theirs = TextTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(target)
        for special in (True, False):
            assert ours("the dog", add_special_tokens=special)["input_ids"] == theirs("the dog", add_special_tokens=special)["input_ids"]
        pair_ours = ours.backend_tokenizer.encode("the dog", "a fox").type_ids
        assert pair_ours == theirs.backend_tokenizer.encode("the dog", "a fox").type_ids


def test_special_tokens_missing_from_added_tokens_become_special_like_transformers(tmp_path, folder):
    from transformers import AutoTokenizer

    target = tmp_path / "not_added"
    target.mkdir()
    data = json.loads((folder / "tokenizer.json").read_text())
    assert "</s>" in data["model"]["vocab"]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    (target / "tokenizer.json").write_text(json.dumps(data))
    (target / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    ours, theirs = TextTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(target)
    for text in ("<s> the dog </s>", "a</s>b"):
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert len(ours) == len(theirs) and ours.eos_token_id == theirs.eos_token_id


# ----------------------------------------------------------------------------- streamer
def _pieces(streamer_class, tokenizer, ids: list[int], chunks: int = 1) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = []

    class Collect(streamer_class):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append((text, stream_end))

    streamer = Collect(tokenizer, skip_prompt=False, skip_special_tokens=True)
    streamer.put(torch.zeros(1, 0, dtype=torch.long))  # generate's first put: no prompt ids
    for start in range(0, len(ids), chunks):
        streamer.put(torch.tensor(ids[start : start + chunks]))
    streamer.end()
    return pieces


def test_streamer_gives_the_pieces_transformers_gives():
    from transformers import AutoTokenizer
    from transformers import TextStreamer as HFTextStreamer

    theirs_tok, ours_tok = AutoTokenizer.from_pretrained(NANO_TOKENIZER), TextTokenizer.from_pretrained(NANO_TOKENIZER)
    texts = [
        "A man is speaking while music plays.\nThen a door closes.\n\nThe end.",
        "Prices: $3.50, 20% off! (maybe) <b>bold</b> a*b=c",
        "中文测试一下，好的。日本語もある", "emoji 🎉🔥 in the middle 😀 and at the end 🙂",
        "<|im_end|>after a special token", "Thai: ภาษาไทยไม่มีช่องว่าง and Hangul 한국어 텍스트",
        "trailing newline\n", "   leading spaces and\ttabs",
    ]  # fmt: skip
    for text in texts:
        ids = theirs_tok(text, add_special_tokens=False)["input_ids"]
        expected = _pieces(HFTextStreamer, theirs_tok, ids)
        assert _pieces(TextStreamer, ours_tok, ids) == expected, text
        assert _pieces(TextStreamer, theirs_tok, ids) == expected, text
        assert _pieces(TextStreamer, ours_tok, ids, chunks=3) == _pieces(HFTextStreamer, theirs_tok, ids, chunks=3), text
        assert "".join(p for p, _ in expected) == theirs_tok.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------- no transformers
def test_the_runtime_never_imports_transformers(folder):
    script = textwrap.dedent(f"""
        import sys, torch
        from omnivox.agent.llama import LlamaForCausalLM
        from omnivox.agent.streaming import TextStreamer
        from omnivox.agent.text_tokenizer import TextTokenizer
        tokenizer = TextTokenizer.from_pretrained({str(folder)!r})
        model = LlamaForCausalLM.from_pretrained({str(folder)!r})
        ids = torch.tensor([tokenizer("Please describe the audio.", add_special_tokens=False)["input_ids"]])
        embeds = model.get_input_embeddings()(ids)
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits
        out = model.generate(inputs_embeds=embeds, max_new_tokens=3, eos_token_id=[tokenizer.eos_token_id],
                             streamer=TextStreamer(tokenizer, skip_special_tokens=True))
        assert logits.shape[-1] == len(tokenizer) and out.shape[0] == 1
        heavy = ("transformers", "peft", "accelerate", "sympy", "scipy", "torch._dynamo")
        loaded = sorted(m for m in sys.modules if m in heavy or m.split(".")[0] in heavy)
        print("LOADED", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


# --------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_tokens_equal_transformers_on_cuda(folder, dtype):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()
    runtime = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device="cuda")
    embeds, mask = _batch()
    kwargs = dict(inputs_embeds=embeds.to("cuda", dtype), attention_mask=mask.to("cuda"), max_new_tokens=10,
                  eos_token_id=[95, 90], pad_token_id=2)  # fmt: skip
    ours, theirs = _both(reference, runtime, **kwargs)
    assert ours.tolist() == theirs.tolist()
    with torch.no_grad():
        torch.testing.assert_close(runtime(**{k: kwargs[k] for k in ("inputs_embeds", "attention_mask")}).logits[:, -1],
                                   reference(**{k: kwargs[k] for k in ("inputs_embeds", "attention_mask")}).logits[:, -1])
