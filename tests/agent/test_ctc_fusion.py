"""Joint CTC / LLM decoding of transcription requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import save_file

from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead, CTCPrefixScorer
from omnivox.agent.assistant import Assistant
from omnivox.agent.ctc_fusion import CTCFusion
from omnivox.agent.generation import GenerationSettings
from omnivox.agent.model import OmnivoxModel
from omnivox.errors import CheckpointError, UserInputError
from omnivox.prompts import Message


def _peaked(path: list[int], labels: int, sure: float = 0.95) -> np.ndarray:
    """Log-probs [T, labels + 1] whose most likely frame-by-frame path is ``path`` (``labels`` = blank)."""
    lp = np.full((len(path), labels + 1), np.log((1 - sure) / labels), np.float32)
    lp[np.arange(len(path)), path] = np.log(sure)
    return lp


def _greedy(fusion: CTCFusion, llm_logits: torch.Tensor, steps: int) -> list[int]:
    ids = torch.zeros((1, 0), dtype=torch.long)
    for step in range(steps):
        scores = fusion(ids, llm_logits[step : step + 1].clone())
        nxt = int(scores.argmax(-1))
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        if nxt == 9:
            break
    return ids[0].tolist()


def test_full_ctc_weight_follows_the_audio_whatever_the_llm_prefers():
    blank = 10  # LLM / CTC vocabulary 0..9, 9 is the stop token
    scorer = CTCPrefixScorer(_peaked([5, 5, blank, 2, blank, 2, 7, 7, blank], labels=10))
    llm = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    llm[:, 3] += 8.0  # the LLM is sure of a word the audio does not hold
    fusion = CTCFusion([scorer], weight=1.0, candidates=10, stop_ids=[9])
    assert _greedy(fusion, llm, 12) == [5, 2, 2, 7, 9]


def test_fusion_stops_a_continuation_the_audio_does_not_hold():
    blank = 10
    scorer = CTCPrefixScorer(_peaked([4, blank, 6, blank, blank], labels=10))
    llm = torch.full((8, 10), -3.0)
    llm[0, 4] = llm[1, 6] = 0.0  # the LLM reads the two words ...
    llm[2:, 1] = 0.0  # ... and then wants to go on with a word of its own
    alone = CTCFusion([None], weight=0.5, candidates=3, stop_ids=[9])
    assert _greedy(alone, llm, 5) == [4, 6, 1, 1, 1]
    fused = CTCFusion([scorer], weight=0.5, candidates=3, stop_ids=[9])
    assert _greedy(fused, llm, 5) == [4, 6, 9]


def test_fusion_checks_its_arguments():
    scorer = CTCPrefixScorer(_peaked([1, 2], labels=4))
    with pytest.raises(ValueError, match="weight must be in"):
        CTCFusion([scorer], weight=0.0, candidates=4, stop_ids=[3])
    with pytest.raises(ValueError, match="2 rows"):
        CTCFusion([scorer], weight=0.5, candidates=4, stop_ids=[3])(torch.zeros((2, 0), dtype=torch.long), torch.zeros(2, 5))


@pytest.fixture(scope="module")
def ctc_model_dir(tmp_path_factory):
    folder = tiny.make_model_folder(tmp_path_factory.mktemp("ctc"), prompt_style="chatml", trim_to_audio=True)
    model = OmnivoxModel.from_pretrained(folder)
    head = CTCHead(model.llm.get_input_embeddings())
    with torch.no_grad():
        head.blank.copy_(torch.randn(head.blank.shape, generator=torch.Generator().manual_seed(1)))
        head.log_scale.fill_(1.5)
    save_file({k: v.detach() for k, v in head.state_dict().items()}, folder / CTC_HEAD_FILE)
    return folder


def _ask(model, prompts, clips, settings):
    conversations = [[Message("user", p, num_audio=1)] for p in prompts]
    return model.generate(conversations, [[model.encode_clip(c)] for c in clips], settings)


def test_transcription_requests_only_are_fused(ctc_model_dir):
    model = Assistant.from_pretrained(ctc_model_dir)
    assert model.model.ctc_head is not None and not any("ctc" in n for n, _ in model.model.named_parameters())
    clips = [tiny.tone_clip(3.0, 880.0, seed=1), tiny.tone_clip(2.0, 300.0, seed=2)]
    prompts = ["Transcribe the speech.", "Describe the sound."]
    plain = _ask(model, prompts, clips, GenerationSettings.greedy(max_new_tokens=10))
    fused = _ask(model, prompts, clips, GenerationSettings.greedy(max_new_tokens=10, ctc_fusion_weight=0.7))
    assert fused[0] != plain[0] and fused[1] == plain[1]
    singles = [_ask(model, [p], [c], GenerationSettings.greedy(max_new_tokens=10, ctc_fusion_weight=0.7))[0] for p, c in zip(prompts, clips, strict=True)]
    assert singles == fused  # a batch decodes each item as alone
    beams = _ask(model, prompts[:1], clips[:1], GenerationSettings(num_beams=3, max_new_tokens=10, ctc_fusion_weight=0.7))
    assert len(beams) == 1 and isinstance(beams[0].text, str)
    assert model.model.generate(
        [[Message("user", prompts[0], num_audio=1)]], [[model.encode_clip(clips[0])]], GenerationSettings.greedy(max_new_tokens=10, ctc_fusion_weight=0.7)
    ) == plain[:1]  # the model alone never fuses: the step does
    copy = model.model.save_pretrained(ctc_model_dir.parent / "copy")  # the head travels with the folder
    assert Assistant.from_pretrained(copy).generate(
        [[Message("user", prompts[0], num_audio=1)]], [[model.encode_clip(clips[0])]], GenerationSettings.greedy(max_new_tokens=10, ctc_fusion_weight=0.7)
    ) == fused[:1]
    model.model.set_ctc_head(None)
    assert _ask(model, prompts, clips, GenerationSettings.greedy(max_new_tokens=10, ctc_fusion_weight=0.7)) == plain


def test_a_folder_sets_ctc_decoding_and_bad_heads_are_refused(ctc_model_dir, tmp_path):
    config = json.loads((ctc_model_dir / "config.json").read_text())
    config["generation"] = {"num_beams": 1, "ctc_fusion_weight": 0.4, "ctc_fusion_candidates": 5}
    (ctc_model_dir / "config.json").write_text(json.dumps(config))
    settings = OmnivoxModel.from_pretrained(ctc_model_dir).config.generation
    assert (settings.ctc_fusion_weight, settings.ctc_fusion_candidates, settings.num_beams) == (0.4, 5, 1)
    with pytest.raises(UserInputError, match="ctc_fusion_weight must be in"):
        GenerationSettings(ctc_fusion_weight=1.5)
    save_file({"blank": torch.zeros(7), "log_scale": torch.zeros(())}, ctc_model_dir / CTC_HEAD_FILE)
    with pytest.raises(CheckpointError, match=r"'blank': \(7,\).*do not fit this LLM"):
        OmnivoxModel.from_pretrained(ctc_model_dir)
