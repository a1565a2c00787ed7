"""The transcription step: requests answered by Whisper's decoder and the LLM together (``TranscriberSettings``)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import save_file

from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead
from omnivox.agent.assistant import Assistant
from omnivox.agent.config import OmnivoxConfig, TranscriberSettings
from omnivox.agent.generation import GenerationSettings
from omnivox.agent.model import OmnivoxModel
from omnivox.agent.transcription import _json_value, is_json_transcription_request, is_transcription_request
from omnivox.errors import CheckpointError, UserInputError
from omnivox.prompts import Message

SETTINGS = GenerationSettings.greedy(max_new_tokens=8)
ASK = "Transcribe the speech."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcriber")
    folder = tiny.make_model_folder(root, prompt_style="chatml", trim_to_audio=True)
    model = OmnivoxModel.from_pretrained(folder)
    head = CTCHead(model.llm.get_input_embeddings())
    with torch.no_grad():
        head.blank.copy_(torch.randn(head.blank.shape, generator=torch.Generator().manual_seed(1)))
    save_file({k: v.detach() for k, v in head.state_dict().items()}, folder / CTC_HEAD_FILE)
    whisper_file = tiny.make_whisper(root / "parts" / "whisper_full.pt", n_vocab=51864, n_text_ctx=32)
    configure(folder, path=str(whisper_file), beam_size=3, whisper_weight=1.0)
    return folder


def configure(folder, **transcriber) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["transcriber"] = transcriber if "path" in transcriber else {**config["transcriber"], **transcriber}
    (folder / "config.json").write_text(json.dumps(config))


def candidates_and_scores(assistant: Assistant, samples: np.ndarray):
    """What the assistant should choose among, computed from its parts one by one."""
    model, transcriber = assistant.model, assistant.transcriber
    clip = model.encode_clip(samples)
    messages = [Message("user", ASK, num_audio=1)]
    alone = model.generate([messages], [[clip]], GenerationSettings.greedy(max_new_tokens=8))[0].text
    features = transcriber.encode(samples)
    own = [alone] if model.config.transcriber.llm_weight > 0 else []  # weight 0: the LLM is not asked
    texts = list(dict.fromkeys([h.text for h in transcriber.nbest(features) if h.text] + own))
    llm, ids = model.score_answers(messages, [clip], texts)
    scorer = model.ctc_head.scorer(clip.tokens)
    return texts, {
        "whisper": np.asarray(transcriber.score(features, texts)),
        "llm": np.asarray(llm),
        "ctc": np.asarray([scorer.sequence_score(i) for i in ids]),
    }, alone


@pytest.mark.parametrize(
    "weights",
    [dict(whisper_weight=1.0, llm_weight=0.0, ctc_rescore_weight=0.0),
     dict(whisper_weight=0.0, llm_weight=1.0, ctc_rescore_weight=0.0),
     dict(whisper_weight=1.0, llm_weight=0.7, ctc_rescore_weight=0.3)],
)  # fmt: skip
def test_the_transcript_is_the_best_candidate_under_the_folders_weights(folder, weights):
    configure(folder, **weights)
    assistant = Assistant.from_pretrained(folder)
    assert assistant.transcriber is not None and assistant.model.config.transcriber.beam_size == 3
    names = {"whisper": "whisper_weight", "llm": "llm_weight", "ctc": "ctc_rescore_weight"}
    for seed in (1, 2):
        samples = tiny.tone_clip(2.0 + seed, 300.0 * seed, seed=seed)
        texts, scores, alone = candidates_and_scores(assistant, samples)
        assert len(texts) >= 2  # Whisper's beam gives several (and the LLM one more when it is asked)
        # a term of weight 0 is left out (a score of -inf times 0 would be nan)
        total = sum(weights[names[k]] * v for k, v in scores.items() if weights[names[k]] > 0)
        expected = texts[int(np.argmax(total))]
        answer = assistant.chat(ASK, [samples], SETTINGS)
        assert (answer.text, answer.source, answer.details["candidates"]) == (expected, "transcriber", texts)
        if weights["whisper_weight"] == 0.0:
            assert expected == alone or scores["llm"][texts.index(expected)] >= scores["llm"][texts.index(alone)]


def test_llm_scores_are_teacher_forced_log_probabilities(folder):
    model = OmnivoxModel.from_pretrained(folder)
    clip = model.encode_clip(tiny.tone_clip(2.0)).tokens
    messages = [Message("user", ASK, num_audio=1)]
    answers = ["yes", "one two three four", "Rain falls on the roof."]
    from omnivox.agent.llama import LlamaForCausalLM

    assert isinstance(model.llm, LlamaForCausalLM)  # scored with the shared-context cache of the runtime
    batch, ids = model.score_answers(messages, [clip], answers)
    prompt = model.processor.tokenize(messages, [clip.shape[0]])
    context = model.processor.merge(prompt, [clip], model.llm.get_input_embeddings())  # [T, H]
    stop = model.processor.stop_ids[0]
    for answer, score, answer_ids in zip(answers, batch, ids, strict=True):
        assert answer_ids == model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        total, seq = 0.0, context
        for token in answer_ids + [stop]:  # one step at a time, no padding
            with torch.no_grad():
                logits = model.llm(inputs_embeds=seq[None]).logits[0, -1]
            total += float(logits.log_softmax(-1)[token])
            seq = torch.cat([seq, model.llm.get_input_embeddings()(torch.tensor([token]))])
        assert score == pytest.approx(total, abs=1e-4)
    model.llm = model.llm.transformers_model()  # the same weights through transformers: the batched path
    assert model.score_answers(messages, [clip], answers)[0] == pytest.approx(batch, abs=1e-4)


def test_other_requests_streaming_and_opting_out(folder, monkeypatch):
    configure(folder, whisper_weight=1.0, llm_weight=0.0, ctc_rescore_weight=0.0)
    assistant = Assistant.from_pretrained(folder)
    clips = [tiny.tone_clip(3.0, 880.0, seed=1), tiny.tone_clip(2.0, 300.0, seed=2)]
    prompts = [ASK, "Describe the sound."]
    conversations = [[Message("user", p, num_audio=1)] for p in prompts]
    encoded = [assistant.encode_clip(c) for c in clips]
    off = GenerationSettings.greedy(max_new_tokens=8, use_transcriber=False)
    plain = assistant.generate(conversations, [[e] for e in encoded], off)
    assert plain == assistant.model.generate(conversations, [[e] for e in encoded], off)  # opted out: the model's answers
    asked: list[int] = []  # how many conversations the LLM is asked to answer
    real = OmnivoxModel.generate_ids
    monkeypatch.setattr(OmnivoxModel, "generate_ids", lambda self, c, *a, **k: (asked.append(len(c)), real(self, c, *a, **k))[1])
    both = assistant.generate(conversations, [[e] for e in encoded], SETTINGS)
    assert asked == [1]  # llm_weight 0: the transcript request never reaches the LLM, the caption does
    assert both[1] == plain[1]  # a caption is the LLM's
    assert both[0] != plain[0] and both[0].source == "transcriber"
    assert both[0] == assistant.chat(ASK, clips[:1], SETTINGS)  # a batch decodes each item as alone
    pieces: list[str] = []
    assert assistant.chat(ASK, clips[:1], SETTINGS, on_text=pieces.append) == both[0]
    assert pieces == [both[0].text]  # streamed whole once chosen
    with pytest.raises(UserInputError, match="streaming needs a batch of one, got 2"):
        assistant.generate(conversations, [[e] for e in encoded], SETTINGS, on_text=pieces.append)
    with pytest.raises(UserInputError, match="2 conversations but audio for 1"):
        assistant.generate(conversations, [[encoded[0]]], SETTINGS)
    other = encoded[0].tokens  # tokens without the clip's samples: the LLM answers
    assert assistant.generate(conversations[:1], [[other]], SETTINGS) == assistant.generate(conversations[:1], [[other]], off)
    assert Assistant(assistant.model).generate(conversations, [[e] for e in encoded], SETTINGS) == plain


def test_the_transcriber_shares_the_encoders_whisper_weights(folder, tmp_path):
    import shutil

    copy = tmp_path / "shared"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    whisper_file = config["transcriber"]["path"]
    config["encoders"][0]["path"] = whisper_file  # the encoder and the transcriber: one checkpoint
    (copy / "config.json").write_text(json.dumps(config))
    assistant = Assistant.from_pretrained(copy)
    assert assistant.has_transcriber and assistant.transcription._transcriber is None  # loads on first use
    assistant.chat("Describe the sound.", [tiny.tone_clip(1.0)], SETTINGS)
    assert assistant.transcription._transcriber is None  # a question does not load it
    assistant.chat(ASK, [tiny.tone_clip(1.0)], SETTINGS)
    assert assistant.transcription._transcriber is not None
    assert assistant.model.encoders[0].backbone is assistant.transcriber.model.encoder  # one set of weights
    alone = OmnivoxModel.from_pretrained(copy)  # the encoder loaded on its own
    assert alone.encoders[0].backbone is not assistant.transcriber.model.encoder
    samples = tiny.tone_clip(2.0, 440.0)
    torch.testing.assert_close(assistant.encode_clip(samples).tokens, alone.encode_clip(samples).tokens, rtol=0, atol=0)


def test_a_json_transcript_request_gets_the_chosen_words_in_its_object(folder):
    configure(folder, whisper_weight=1.0, llm_weight=0.7, ctc_rescore_weight=0.0)
    assistant = Assistant.from_pretrained(folder)
    samples = tiny.tone_clip(3.0, 600.0, seed=3)
    ask = 'What is being said? Reply in JSON as {"words": "..."}.'
    off = GenerationSettings.greedy(max_new_tokens=8, use_transcriber=False)
    assert _json_value(assistant.chat(ask, [samples], off).text, "words") == ("", "words")  # the tiny LLM writes no JSON
    configure(folder, whisper_weight=1.0, llm_weight=0.0, ctc_rescore_weight=0.0)
    assistant = Assistant.from_pretrained(folder)
    features = assistant.transcriber.encode(samples)
    texts = list(dict.fromkeys(h.text for h in assistant.transcriber.nbest(features)))
    best = texts[int(np.argmax(assistant.transcriber.score(features, texts)))]
    assert json.loads(assistant.chat(ask, [samples], SETTINGS).text) == {"words": best}


def test_json_values():
    assert _json_value('{"transcript": " Hello there. "}', "text") == ("Hello there.", "transcript")
    for answer in ('{"text": 3}', '{"a": "x", "b": "y"}', "Hello", '["x"]', '{"text": '):
        assert _json_value(answer, "text") == ("", "text")


def test_a_clip_over_one_whisper_window_gets_the_long_form_transcript(folder):
    assistant = Assistant.from_pretrained(folder)
    samples = np.tile(tiny.tone_clip(2.0, 500.0), 16)  # 32 s
    assert assistant.chat(ASK, [samples], SETTINGS).text == assistant.transcriber.transcribe_long(samples)


def test_transcriber_settings_are_validated(folder):
    base = json.loads((folder / "config.json").read_text())
    good = OmnivoxConfig.from_dict(base)
    assert OmnivoxConfig.from_dict(json.loads(json.dumps(good.to_dict()))) == good  # survives config.json
    assert asdict(good.transcriber)["beam_size"] == 3
    bad = [
        ({"beam_size": 0}, "beam_size must be an integer"),
        ({"llm_weight": -1}, "llm_weight must be a number >= 0"),
        ({"whisper_weight": 0, "llm_weight": 0, "ctc_rescore_weight": 0}, "at least one"),
        ({"temperature": 1.0}, r"unknown fields in transcriber: \['temperature'\]"),
    ]
    for change, message in bad:
        with pytest.raises(CheckpointError, match=message):
            OmnivoxConfig.from_dict({**base, "transcriber": {**base["transcriber"], **change}})
    with pytest.raises(CheckpointError, match="'path' is missing"):
        OmnivoxConfig.from_dict({**base, "transcriber": {"beam_size": 2}})
    with pytest.raises(CheckpointError, match="transcriber must be a JSON object"):
        OmnivoxConfig.from_dict({**base, "transcriber": "whisper"})
    with pytest.raises(CheckpointError, match="path must name"):
        TranscriberSettings(path="")
    missing = folder.parent / "missing"
    missing.mkdir(exist_ok=True)
    for name in ("config.json", "adapter.safetensors"):
        (missing / name).write_bytes((folder / name).read_bytes())
    configure(missing, path=str(folder.parent / "nowhere.pt"))
    with pytest.raises(CheckpointError, match="Whisper transcriber .* not found"):
        Assistant.from_pretrained(missing)
    Assistant.from_pretrained(missing, transcriber=False)  # the model alone does not need it


@pytest.mark.parametrize(
    "text",
    ["Transcribe the speech.", "What is being said?", "What is said?", "Write down exactly what the speaker says.",
     "Please provide a transcript of this audio.", "Transcribe this recording word for word.", "What does the voice say?",
     "what did she say"],
)  # fmt: skip
def test_transcription_requests_are_recognised(text):
    assert is_transcription_request(text)


@pytest.mark.parametrize(
    "text",
    ["Describe the sound.", "How many beeps are there?", 'Transcribe the speech. Reply in JSON as {"text": "..."}.',
     "Summarise what is said.", "What colour did they mention?", "Is anyone speaking?", "Translate what is said into French."],
)  # fmt: skip
def test_other_requests_are_left_to_the_llm(text):
    assert not is_transcription_request(text)


@pytest.mark.parametrize(
    ("text", "wanted"),
    [('What is being said? Reply in JSON as {"text": "..."}.', True), ("Give the transcript as JSON.", True),
     ('Transcribe this recording word for word. Answer in JSON as {"words": "..."}.', True),
     ("Transcribe the speech.", False), ('How many beeps? Reply in JSON as {"count": 0}.', False),
     ("Summarise what is said. Answer in JSON.", False), ("Transcribe the speech and list the speakers in JSON.", False)],
)  # fmt: skip
def test_json_transcription_requests_are_recognised(text, wanted):
    assert is_json_transcription_request(text) is wanted
