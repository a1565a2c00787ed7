"""The assembled model on tiny random parts: folder round trip, batching, long audio, LoRA."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import tiny
import torch

from omnivox.agent.generation import GenerationSettings
from omnivox.agent.model import EncodedClip, OmnivoxModel
from omnivox.errors import CheckpointError, UserInputError
from omnivox.prompts import Message

GREEDY = GenerationSettings.greedy(max_new_tokens=8)


def _first_logits(model: OmnivoxModel, clip: np.ndarray, prompt: str = "Please describe the audio.") -> torch.Tensor:
    batch = model.build_inputs([[Message("user", prompt, num_audio=1)]], [[model.encode_clip(clip)]])
    return model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits[0, -1]


def test_folder_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    clip = tiny.tone_clip(2.0)
    before = _first_logits(tiny_model, clip)
    tiny_model.save_pretrained(tmp_path / "copy")
    again = OmnivoxModel.from_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["adapter.safetensors", "config.json", "lora", "tokenizer"]
    torch.testing.assert_close(_first_logits(again, clip), before, rtol=0, atol=0)


def test_audio_steers_the_answer(tiny_model):
    a = _first_logits(tiny_model, tiny.tone_clip(2.0, 300.0))
    b = _first_logits(tiny_model, tiny.tone_clip(2.0, 2000.0, seed=3) * 3)
    assert (a - b).abs().max() > 1e-3


def test_encode_audio_shape_and_salmonn_token_count(tiny_model):
    tokens = tiny_model.encode_audio(np.stack([tiny.tone_clip(3.0), tiny.tone_clip(3.0, 600)]), sample_rate=16000)
    assert tokens.shape == (2, 88, 32)  # 30 s window -> 1500 frames -> 88 windows of 17
    assert tiny_model.audio_token_count(3 * 16000) == 88
    # a clip at another rate is resampled first: same length in seconds, same token count
    assert tiny_model.encode_audio(tiny.tone_clip(3.0, sample_rate=8000), sample_rate=8000).shape == (1, 88, 32)


def test_batch_equals_single(tiny_model):
    clips = [tiny.tone_clip(2.0, 220.0), tiny.tone_clip(0.5, 1000.0, seed=1), tiny.tone_clip(33.0, 500.0, seed=2)]
    prompts = ["Please describe the audio.", "What is said?", "Is anyone speaking? Answer yes or no."]
    encoded = [[tiny_model.encode_clip(c)] for c in clips]
    conversations = [[Message("user", p, num_audio=1)] for p in prompts]
    assert [e[0].num_tokens for e in encoded] == [88, 88, 176]  # the 33 s clip has two windows
    for settings in (GREEDY, replace(GREEDY, num_beams=3)):
        batch = tiny_model.generate(conversations, encoded, settings)
        single = [tiny_model.generate([c], [e], settings)[0] for c, e in zip(conversations, encoded, strict=True)]
        assert batch == single
    # the batch path really pads: prompt lengths differ
    lengths = [tiny_model.processor.tokenize(c, [e[0].num_tokens]).input_ids.numel() for c, e in zip(conversations, encoded, strict=True)]
    assert len(set(lengths)) == 3


def test_placeholder_count_mismatch_is_loud(tiny_model):
    prompt = tiny_model.processor.tokenize([Message("user", "hi", num_audio=1)], [88])
    embed = tiny_model.llm.get_input_embeddings()
    with pytest.raises(ValueError, match="tokens: 88, features 87"):
        tiny_model.processor.merge(prompt, [torch.zeros(87, 32)], embed)
    with pytest.raises(UserInputError, match="placeholders 1, clips 2"):
        tiny_model.processor.tokenize([Message("user", "hi", num_audio=1)], [88, 88])


def test_salmonn_prompt_segments(tiny_model):
    prompt = tiny_model.processor.tokenize([Message("user", "  Describe it. ", num_audio=1)], [3])
    ids = prompt.input_ids.tolist()
    tok = tiny_model.tokenizer
    assert ids[0] == tok.bos_token_id
    first = tok("USER: <Speech>", add_special_tokens=False)["input_ids"]
    second = tok("</Speech> Describe it.\nASSISTANT:", add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id, *first, *[tiny_model.processor.audio_id] * 3, *second]
    assert prompt.audio_mask.tolist() == [False] * (1 + len(first)) + [True] * 3 + [False] * len(second)


class _CountingEncoder(torch.nn.Module):
    """Wraps an encoder and records the largest batch it is given (samples in one call)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.largest = 0
        self.calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, waves, lengths):
        self.largest = max(self.largest, waves.numel())
        self.calls += 1
        return self.inner(waves, lengths)


def test_long_audio_is_windowed_in_order_with_flat_encoder_memory(tiny_model_dir):
    model = OmnivoxModel.from_pretrained(tiny_model_dir)
    model.config = replace(model.config, audio=replace(model.config.audio, windows_per_batch=2))
    model.encoders = torch.nn.ModuleList(_CountingEncoder(e) for e in model.encoders)
    window = 30 * 16000
    minutes = [tiny.tone_clip(60.0 * m, 300.0 + 100 * m, seed=m) for m in (1, 4)]
    outputs = [model.encode_clip(c).tokens for c in minutes]
    assert [o.shape[0] for o in outputs] == [2 * 88, 8 * 88]  # every window's tokens, nothing dropped
    # memory: no encoder call ever saw more than windows_per_batch windows, however long the audio
    assert all(e.largest <= 2 * window for e in model.encoders)
    # order: window k of the long clip equals that window encoded alone
    second = minutes[1][window : 2 * window]
    torch.testing.assert_close(outputs[1][88:176], model.encode_clip(second).tokens, rtol=1e-5, atol=1e-5)


def test_overlapping_windows(tiny_model_dir, tmp_path):
    model = OmnivoxModel.from_pretrained(tiny_model_dir)
    model.config = replace(model.config, audio=replace(model.config.audio, overlap_seconds=10.0))
    assert model.audio_token_count(50 * 16000) == 2 * 88  # windows [0, 30) and [20, 50)
    assert model.encode_clip(tiny.tone_clip(50.0)).num_tokens == 2 * 88


def test_trim_to_audio_keeps_only_covering_windows(tiny_model_dir):
    full = OmnivoxModel.from_pretrained(tiny_model_dir)
    trimmed = OmnivoxModel.from_pretrained(tiny_model_dir)
    trimmed.config = replace(trimmed.config, audio=replace(trimmed.config.audio, trim_to_audio=True))
    clip = tiny.tone_clip(3.0)
    kept = trimmed.encode_clip(clip).tokens
    assert kept.shape[0] == trimmed.audio_token_count(clip.size) == 9  # 150 frames / 17 per window
    # fewer windows run: other GEMM shapes, equal only up to float32 reordering
    torch.testing.assert_close(kept, full.encode_clip(clip).tokens[:9], rtol=1e-5, atol=1e-5)


def test_too_long_audio_is_rejected_not_truncated(tiny_model_dir):
    model = OmnivoxModel.from_pretrained(tiny_model_dir)
    model.config = replace(model.config, audio=replace(model.config.audio, max_seconds=5.0))
    with pytest.raises(UserInputError, match="6.0 s long, the limit is 5 s"):
        model.encode_clip(tiny.tone_clip(6.0))


def test_lora_scale_changes_output_and_zero_removes_it(tiny_model_dir):
    model = OmnivoxModel.from_pretrained(tiny_model_dir, merge_lora=False)  # peft layers, unmerged
    clip = tiny.tone_clip(2.0)
    base = _first_logits(model, clip)
    model.set_lora_scale(0.0)
    without = _first_logits(model, clip)
    with model.llm.disable_adapter():
        disabled = _first_logits(model, clip)
    torch.testing.assert_close(without, disabled)
    assert (base - without).abs().max() > 1e-3
    model.set_lora_scale(1.0)
    torch.testing.assert_close(_first_logits(model, clip), base)


def test_merged_lora_gives_the_unmerged_logits_and_can_still_be_scaled(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    folded = OmnivoxModel.from_pretrained(tiny_model_dir)  # merge_lora=True by default: folded without peft
    plain = OmnivoxModel.from_pretrained(tiny_model_dir, merge_lora=False)
    peft_merged = OmnivoxModel.from_pretrained(tiny_model_dir, merge_lora=False)
    peft_merged.merge_lora()
    assert folded.folded_lora is not None and len(folded.folded_lora) > 0
    assert not any(isinstance(m, LoraLayer) for m in folded.llm.modules())
    layers = [m for m in peft_merged.llm.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.merged for m in layers)
    assert not any(m.merged for m in plain.llm.modules() if isinstance(m, LoraLayer))
    clip = tiny.tone_clip(2.0)
    reference = _first_logits(plain, clip)
    torch.testing.assert_close(_first_logits(folded, clip), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_first_logits(peft_merged, clip), reference, rtol=1e-5, atol=1e-5)
    for scale in (0.5, 0.0, 1.0):
        for model in (folded, plain, peft_merged):
            model.set_lora_scale(scale)
        assert all(m.merged for m in layers)
        reference = _first_logits(plain, clip)
        torch.testing.assert_close(_first_logits(folded, clip), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_first_logits(peft_merged, clip), reference, rtol=1e-5, atol=1e-5)
    with plain.llm.disable_adapter():
        base = _first_logits(plain, clip)
    folded.set_lora_scale(0.0)
    torch.testing.assert_close(_first_logits(folded, clip), base, rtol=1e-5, atol=1e-5)


def test_loading_a_plain_lora_model_does_not_import_peft(tiny_model_dir):
    code = (
        "import sys\n"
        "from omnivox.agent.model import OmnivoxModel\n"
        f"m = OmnivoxModel.from_pretrained({str(tiny_model_dir)!r})\n"
        "assert m.folded_lora is not None\n"
        "print(sorted(k for k in ('peft', 'bitsandbytes') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_streaming_yields_the_same_text(tiny_model):
    pieces: list[str] = []
    clip = [tiny_model.encode_clip(tiny.tone_clip(2.0))]
    conv = [[Message("user", "What is said?", num_audio=1)]]
    answer = tiny_model.generate(conv, [clip], GREEDY, on_text=pieces.append)[0]
    assert "".join(pieces).strip() == answer.text
    assert answer.source == "llm" and answer.finish_reason in ("stop", "length")
    assert answer.token_ids == tiny_model.generate_ids(conv, [clip], GREEDY)[0]


def test_bad_model_folders(tmp_path, tiny_model_dir):
    with pytest.raises(CheckpointError, match="no such directory"):
        OmnivoxModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        OmnivoxModel.from_pretrained(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        OmnivoxModel.from_pretrained(broken)
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    state = load_file(copy / "adapter.safetensors")
    key = sorted(state)[0]
    state[key] = torch.zeros(3, 3)
    save_file(state, copy / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        OmnivoxModel.from_pretrained(copy)


def test_a_model_folder_sets_its_default_decoding(tiny_model_dir, tmp_path):
    import json
    import shutil

    from omnivox.agent.config import OmnivoxConfig

    copy = tmp_path / "greedy"
    shutil.copytree(tiny_model_dir, copy)
    data = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**data, "generation": {"num_beams": 1, "max_new_tokens": 7}}))
    config = OmnivoxConfig.load(copy / "config.json")
    assert config.generation == GenerationSettings.greedy(max_new_tokens=7)
    assert config.generation.override(num_beams=3).num_beams == 3
    assert OmnivoxConfig.load(tiny_model_dir / "config.json").generation == GenerationSettings()
    assert config.to_dict()["generation"] == {"num_beams": 1, "max_new_tokens": 7}  # only what differs is stored
    with pytest.raises(UserInputError, match="num_beams must be >= 1"):
        config.generation.override(num_beams=0)
    for bad, message in (({"beams": 2}, "unknown decoding settings \\['beams'\\]"), ({"num_beams": 2.5}, "num_beams must be int"),
                         ({"temperature": True}, "temperature must be a number"), ([1], "must be an object"),
                         ({"num_beams": 0}, "generation: num_beams must be >= 1")):
        (copy / "config.json").write_text(json.dumps({**data, "generation": bad}))
        with pytest.raises(CheckpointError, match=message):
            OmnivoxConfig.load(copy / "config.json")


def test_a_version_1_folder_loads_with_its_old_decoding_names(tiny_model_dir, tmp_path):
    import json
    import shutil

    from omnivox.agent.config import FORMAT_VERSION, OmnivoxConfig

    copy = tmp_path / "v1"
    shutil.copytree(tiny_model_dir, copy)
    data = json.loads((copy / "config.json").read_text())
    old = {**data, "format_version": 1, "generation": {"num_beams": 1, "ctc_weight": 0.3, "ctc_candidates": 5},
           "transcriber": {"path": "tiny.pt", "llm_weight": 0.7, "ctc_weight": 0.2}}
    (copy / "config.json").write_text(json.dumps(old))
    config = OmnivoxConfig.load(copy / "config.json")
    assert config.format_version == FORMAT_VERSION == 2
    assert (config.generation.ctc_fusion_weight, config.generation.ctc_fusion_candidates) == (0.3, 5)
    assert (config.transcriber.llm_weight, config.transcriber.ctc_rescore_weight) == (0.7, 0.2)
    saved = config.to_dict()
    assert saved["generation"] == {"num_beams": 1, "ctc_fusion_weight": 0.3, "ctc_fusion_candidates": 5}
    assert "ctc_weight" not in saved["transcriber"] and saved["transcriber"]["ctc_rescore_weight"] == 0.2
    unnamed = {k: v for k, v in old.items() if k != "format_version"}  # early folders may not name a version
    (copy / "config.json").write_text(json.dumps(unnamed))
    assert OmnivoxConfig.load(copy / "config.json").generation == config.generation
    (copy / "config.json").write_text(json.dumps({**old, "format_version": 2}))  # the old names in a v2 file: refused
    with pytest.raises(CheckpointError, match="ctc_weight"):
        OmnivoxConfig.load(copy / "config.json")


def test_encoded_clip_keeps_its_samples(tiny_model):
    clip = tiny.tone_clip(2.0)
    encoded = tiny_model.encode_clip(clip)
    assert isinstance(encoded, EncodedClip) and encoded.num_tokens == encoded.tokens.shape[0] == 88
    np.testing.assert_array_equal(encoded.samples, clip)
    # a bare tensor of tokens stands for a clip without samples: same answer
    conv = [[Message("user", "What is said?", num_audio=1)]]
    assert tiny_model.generate(conv, [[encoded]], GREEDY) == tiny_model.generate(conv, [[encoded.tokens]], GREEDY)


def test_a_small_folded_llm_is_cached_once_and_reloaded(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from omnivox.adapters.lora import FoldedLora

    monkeypatch.setenv("OMNIVOX_CACHE", str(tmp_path / "cache"))
    folds = []
    real_rescale = FoldedLora.rescale
    monkeypatch.setattr(FoldedLora, "rescale", lambda self, scale: (folds.append(scale), real_rescale(self, scale)))
    clip = tiny.tone_clip(2.0)
    reference = _first_logits(OmnivoxModel.from_pretrained(tiny_model_dir, merge_lora=False), clip)
    first = OmnivoxModel.from_pretrained(tiny_model_dir)
    cached = sorted((tmp_path / "cache" / "llm-folded").iterdir())
    assert len(cached) == 1 and folds == [1.0]
    second = OmnivoxModel.from_pretrained(tiny_model_dir)
    assert folds == [1.0]  # loaded folded, not folded again
    for model in (first, second):
        torch.testing.assert_close(_first_logits(model, clip), reference, rtol=1e-5, atol=1e-5)
    half = OmnivoxModel.from_pretrained(tiny_model_dir, lora_scale=0.5)  # another scale: another copy
    assert len(list((tmp_path / "cache" / "llm-folded").iterdir())) == 2
    second.set_lora_scale(0.5)
    torch.testing.assert_close(_first_logits(second, clip), _first_logits(half, clip), rtol=1e-5, atol=1e-5)
    # another LoRA: another key; only the newest copies are kept
    for i in range(3):
        copy = tmp_path / f"m{i}"
        shutil.copytree(tiny_model_dir, copy)
        path = copy / "lora" / "adapter_model.safetensors"
        from safetensors.torch import load_file, save_file

        state = load_file(path)
        save_file({k: v * (1.5 + i) for k, v in state.items()}, path)
        OmnivoxModel.from_pretrained(copy)
    from omnivox.agent.loading import FOLDED_COPIES_KEPT

    assert len(list((tmp_path / "cache" / "llm-folded").iterdir())) == FOLDED_COPIES_KEPT
