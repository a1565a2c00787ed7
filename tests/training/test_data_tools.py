"""Manifest rows with a system turn and role turns (tool calls): messages, labels, old rows unchanged."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
from tiny import tone_clip
from transformers import AutoTokenizer

from omnivox.agent.processor import OmnivoxProcessor
from omnivox.errors import UserInputError
from omnivox.prompts import Message, get_prompt_style
from omnivox.prompts.tools import ToolSpec, call_text, result_text, tools_text
from omnivox.training.data import IGNORE_INDEX, build_example, estimate_length, read_manifest

TRIM = ToolSpec("trim", "Cut a clip.", {"type": "object", "properties": {"clip": {"type": "string"}, "start": {"type": "number"},
                                                                          "end": {"type": "number"}}, "required": ["clip", "start", "end"]})
CALL = call_text("trim", {"clip": "clip-1", "start": 0.0, "end": 1.5})
RESULT = result_text("trim", "audio-1: 1.50 s, 16000 Hz")
TOOL_ROW = {
    "audio": "a.wav", "duration": 2.0, "task": "task_calls", "system": tools_text([TRIM]),
    "instruction": "Keep only the first 1.5 seconds of clip-1.", "answer": CALL,
    "turns": [{"role": "user", "content": "Keep only the first 1.5 seconds of clip-1."}, {"role": "assistant", "content": CALL},
              {"role": "tool", "content": RESULT}, {"role": "assistant", "content": "Done: audio-1 is clip-1 from 0 to 1.5 seconds."}],
    "metadata": {"tools": [{"name": "trim", "description": "Cut a clip.", "parameters": dict(TRIM.parameters)}]},
}  # fmt: skip
OLD_ROWS = [
    {"audio": "a.wav", "duration": 2.0, "task": "pitch", "instruction": "Is the tone high or low?", "answer": "high"},
    {"audio": "a.wav", "duration": 2.0, "task": "pitch", "instruction": "Is the tone high or low?", "answer": "low",
     "turns": [{"instruction": "How many tones?", "answer": "one"}]},
    {"audio": "a.wav", "duration": 2.0, "task": "multi_turn", "instruction": "Transcribe the speech.", "answer": "Hi.",
     "turns": [{"instruction": "Transcribe the speech.", "answer": "Hi."}, {"instruction": "How many words?", "answer": "1"}]},
]  # fmt: skip


def _manifest(tmp_path, rows):
    sf.write(tmp_path / "a.wav", tone_clip(2.0), 16000)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_manifest(path)


@pytest.fixture(scope="module")
def processors(tiny_folder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder / "tokenizer")
    return [OmnivoxProcessor(tokenizer, get_prompt_style(s)) for s in ("chatml", "chatml-bare", "salmonn")]


def _spans(processor, example) -> list[str]:
    spans, current = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [processor.tokenizer.decode(s) for s in spans + ([current] if current else [])]


def test_tool_row_messages(tmp_path):
    item = _manifest(tmp_path, [TOOL_ROW])[0]
    assert item.offers_tools and item.system == TOOL_ROW["system"]
    messages = item.messages(multi_turn=True)
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[1] == Message("user", TOOL_ROW["instruction"], num_audio=1, audio_labels=("clip-1",))
    assert messages[2].text == CALL and messages[3].text == RESULT
    # without multi_turn the conversation ends at the first assistant turn (the call)
    assert [m.role for m in item.messages(multi_turn=False)] == ["system", "user", "assistant"]


def test_tool_row_labels_cover_assistant_turns_only(tmp_path, processors):
    item = _manifest(tmp_path, [TOOL_ROW])[0]
    for processor in processors:
        example = build_example(processor, item.messages(True), audio_tokens=4)
        stop = processor.style.stop_tokens[0]
        assert [s.strip() for s in _spans(processor, example)] == [CALL + stop, "Done: audio-1 is clip-1 from 0 to 1.5 seconds." + stop]
        text = processor.tokenizer.decode(example.input_ids[~example.audio_mask])
        assert "clip-1: " in text and "You can call these tools" in text and "audio-1: 1.50 s" in text


def test_old_rows_give_the_same_token_ids_as_before(tmp_path, processors):
    """Rows without system/role turns build exactly the conversations the previous reader built."""
    items = _manifest(tmp_path, OLD_ROWS)
    # what training/data.py made of these rows before tool calls (user turn with the clip, no label, no system)
    before = [
        [Message("user", "Is the tone high or low?", num_audio=1), Message("assistant", "high")],
        [Message("user", "Is the tone high or low?", num_audio=1), Message("assistant", "low"),
         Message("user", "How many tones?"), Message("assistant", "one")],
        [Message("user", "Transcribe the speech.", num_audio=1), Message("assistant", "Hi."),
         Message("user", "Transcribe the speech."), Message("assistant", "Hi."),
         Message("user", "How many words?"), Message("assistant", "1")],
    ]  # fmt: skip
    for item, old in zip(items, before, strict=True):
        assert item.messages(True) == old and item.messages(False) == old[:2]
        assert estimate_length(item, 12.5, True) == int(2.0 * 12.5) + sum(len(m.text) for m in old) // 4
        for processor in processors:
            got, want = build_example(processor, item.messages(True), 4), build_example(processor, old, 4)
            assert got.input_ids.tolist() == want.input_ids.tolist() and got.labels.tolist() == want.labels.tolist()


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"role": "assistant", "content": "x"}], "first turn must be a user turn"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], "tool turn must follow"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "tool", "content": "z"}],
         "last turn should be an assistant turn"),
        ([{"role": "user", "content": 3}], "string 'content'"),
    ],
)
def test_bad_role_turns_fail_at_read(tmp_path, turns, message):
    with pytest.raises(UserInputError, match=message) as err:
        _manifest(tmp_path, [{**TOOL_ROW, "turns": turns}])
    assert "train.jsonl:1" in str(err.value)
