"""The assembled model on a CUDA device: the same answers as on the CPU, half precision, 8/4-bit LLMs.

Marked ``gpu``: ``make test`` (``-m "not gpu"``) leaves them out; ``pytest -m gpu`` runs them where
a CUDA device is.
"""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F

from omnivox.agent.assistant import Assistant
from omnivox.agent.generation import GenerationSettings
from omnivox.agent.model import OmnivoxModel
from omnivox.prompts import Message

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = GenerationSettings.greedy(max_new_tokens=8)
PROMPT = "Please describe the audio."


def _last_logits(model: OmnivoxModel, clip) -> torch.Tensor:
    batch = model.build_inputs([[Message("user", PROMPT, num_audio=1)]], [[model.encode_clip(clip)]])
    with torch.no_grad():
        return model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits[0, -1].float().cpu()


@pytest.fixture(scope="module")
def clip():
    return tiny.tone_clip(2.5, 880.0, seed=3)


@pytest.fixture(scope="module")
def cpu_logits(tiny_model_dir, clip):
    return _last_logits(OmnivoxModel.from_pretrained(tiny_model_dir), clip)


def test_cuda_fp32_gives_the_cpu_logits_and_answer(tiny_model_dir, clip, cpu_logits):
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = OmnivoxModel.from_pretrained(tiny_model_dir, device="cuda")
    assert next(gpu.llm.parameters()).device.type == "cuda"
    assert all(p.device.type == "cuda" for p in gpu.adapter.parameters())
    torch.testing.assert_close(_last_logits(gpu, clip), cpu_logits, rtol=1e-4, atol=1e-4)
    conversation = [[Message("user", PROMPT, num_audio=1)]]
    cpu = OmnivoxModel.from_pretrained(tiny_model_dir)
    expected = cpu.generate(conversation, [[cpu.encode_clip(clip)]], GREEDY)
    assert gpu.generate(conversation, [[gpu.encode_clip(clip)]], GREEDY) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda_stays_close(tiny_model_dir, clip, cpu_logits, dtype):
    model = OmnivoxModel.from_pretrained(tiny_model_dir, device="cuda", dtype=dtype)
    assert next(model.llm.parameters()).dtype == dtype
    logits = _last_logits(model, clip)
    assert torch.isfinite(logits).all()
    similarity = F.cosine_similarity(logits, cpu_logits, dim=0).item()
    assert similarity > 0.99, f"{dtype}: cosine {similarity:.4f} to the fp32 CPU logits"


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_llm_loads_keeps_lora_unmerged_and_answers(tiny_model_dir, clip, cpu_logits, quantization):
    pytest.importorskip("bitsandbytes")
    model = OmnivoxModel.from_pretrained(tiny_model_dir, device="cuda", dtype=torch.float16, quantization=quantization)
    assert model.folded_lora is None  # a quantized LLM keeps peft's LoRA layers: merging would round the update away
    assert any("lora_A" in name for name, _ in model.llm.named_parameters())
    logits = _last_logits(model, clip)
    assert torch.isfinite(logits).all()
    similarity = F.cosine_similarity(logits, cpu_logits, dim=0).item()
    assert similarity > 0.9, f"{quantization}: cosine {similarity:.4f} to the fp32 CPU logits"
    answer = model.generate([[Message("user", PROMPT, num_audio=1)]], [[model.encode_clip(clip)]], GREEDY)
    assert len(answer) == 1 and isinstance(answer[0], str)


def test_joint_ctc_decoding_on_cuda_gives_the_cpu_transcript(tiny_model_dir, clip, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead

    folder = tmp_path / "with_ctc"
    shutil.copytree(tiny_model_dir, folder)
    cpu = OmnivoxModel.from_pretrained(folder)
    head = CTCHead(cpu.llm.get_input_embeddings())
    with torch.no_grad():
        head.blank.normal_(generator=torch.Generator().manual_seed(1))
        head.log_scale.fill_(1.5)
    save_file({k: v.detach() for k, v in head.state_dict().items()}, folder / CTC_HEAD_FILE)
    settings = GenerationSettings.greedy(max_new_tokens=8, ctc_fusion_weight=0.6)
    conversation = [[Message("user", "Transcribe the speech.", num_audio=1)]]
    answers = []
    for device in ("cpu", "cuda"):
        assistant = Assistant.from_pretrained(folder, device=device)
        model = assistant.model
        assert model.ctc_head is not None and model.ctc_head.blank.device.type == device
        answers.append([a.text for a in assistant.generate(conversation, [[model.encode_clip(clip)]], settings)])
    assert answers[0] == answers[1]


def test_whisper_transcriber_on_cuda_gives_the_cpu_candidates_and_transcript(tiny_model_dir, clip, tmp_path):
    import json
    import shutil

    folder = tmp_path / "with_transcriber"
    shutil.copytree(tiny_model_dir, folder)
    whisper_file = tiny.make_whisper(tmp_path / "whisper_full.pt", n_vocab=51864, n_text_ctx=32)
    config = json.loads((folder / "config.json").read_text())
    config["transcriber"] = {"path": str(whisper_file), "beam_size": 3, "whisper_weight": 1.0, "llm_weight": 0.7}
    (folder / "config.json").write_text(json.dumps(config))
    hypotheses, answers = [], []
    for device in ("cpu", "cuda"):
        assistant = Assistant.from_pretrained(folder, device=device)
        assert next(assistant.transcriber.model.parameters()).device.type == device
        hyps = assistant.transcriber.nbest(assistant.transcriber.encode(clip))
        hypotheses.append([(h.tokens, round(h.log_prob, 2)) for h in hyps])
        answers.append(assistant.chat("Transcribe the speech.", [clip], GREEDY).text)
    assert hypotheses[0] == hypotheses[1]
    assert answers[0] == answers[1]


def test_greedy_codec_codes_on_cuda_equal_the_cpu_codes_and_bf16_speaks(tmp_path):
    from omnivox.decoders.speech import SpeechHead

    folder = tiny.add_speech_head(tmp_path / "speaks")
    text = "The quick brown fox jumps over the lazy dog."
    on_cpu = SpeechHead.from_folder(folder).say(text, "joe")
    on_cuda = SpeechHead.from_folder(folder, "cuda").say(text, "joe")
    assert torch.equal(on_cuda.codes, on_cpu.codes)  # the durations and every greedy code
    assert torch.allclose(torch.from_numpy(on_cuda.waveform), torch.from_numpy(on_cpu.waveform), atol=1e-4)
    half = SpeechHead.from_folder(folder, "cuda", torch.bfloat16).say(text, "joe")
    assert half.codes.shape[0] == on_cpu.codes.shape[0] and int(half.codes.max()) < 16 and half.waveform.size > 0
