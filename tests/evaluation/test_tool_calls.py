"""The task-calls suite: the step scorer on hand-made cases, reading episodes, a scripted model with known
numbers (teacher forcing, tools offered per item), and a tiny random model end to end."""

from __future__ import annotations

import json

import pytest

from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.tools import ToolCall
from omnivox.datagen.task_calls import TOOLS, spec_dict
from omnivox.errors import UserInputError
from omnivox.evaluation import tool_calls as TC
from omnivox.evaluation.data import load_manifest
from omnivox.evaluation.report import markdown
from omnivox.evaluation.runner import evaluate, select
from omnivox.evaluation.tasks import canonical_task
from omnivox.prompts import Message
from omnivox.prompts.tools import call_text, calls_text, result_text, tools_text


def _meta(*names: str, family: str = "request", held_out: bool = False) -> dict:
    return {"tools": [spec_dict(TOOLS[n].spec) for n in names], "family": family, "held_out": held_out, "format": "text"}


def _score(prediction: str, reference: str, *names: str):
    return TC.score_step(prediction, reference, _meta(*names))


TRIM = call_text("trim", {"clip": "clip-1", "start": 0.0, "end": 2.5})


def test_right_tool_right_arguments_valid_schema():
    correct, d = _score(TRIM, TRIM, "trim", "reverse")
    assert correct and d["arguments_correct"] and d["schema_valid"] and d["schema_errors"] == []
    # numbers within the tolerance, integers for floats
    assert _score(call_text("trim", {"clip": "clip-1", "start": 0, "end": 2.504}), TRIM, "trim")[1]["arguments_correct"]
    assert not _score(call_text("trim", {"clip": "clip-1", "start": 0.0, "end": 2.6}), TRIM, "trim")[1]["arguments_correct"]
    # defaults filled in on both sides
    ref = call_text("convert", {"clip": "clip-1", "format": "mp3"})
    assert _score(call_text("convert", {"clip": "clip-1", "sample_rate": 16000, "format": "mp3"}), ref, "convert")[1]["arguments_correct"]
    assert not _score(call_text("convert", {"clip": "clip-1", "sample_rate": 8000, "format": "mp3"}), ref, "convert")[1]["arguments_correct"]
    # strings: case, whitespace and edge punctuation
    ref = call_text("speak", {"text": "Happy birthday, Emma!"})
    assert _score(call_text("speak", {"text": "happy  birthday, emma"}), ref, "speak")[1]["arguments_correct"]
    assert not _score(call_text("speak", {"text": "Happy birthday Emma"}), ref, "speak")[1]["arguments_correct"]
    # booleans are not numbers
    assert not TC.values_equal(1, True) and TC.values_equal(True, True)


def test_parallel_calls_match_in_any_order_and_wrong_tools_fail():
    ref = calls_text([("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}), ("set_timer", {"minutes": 5})])
    got = calls_text([("set_timer", {"minutes": 5}), ("get_weather", {"city": "rome"}), ("get_weather", {"city": "Paris"})])
    correct, d = _score(got, ref, "get_weather", "set_timer")
    assert correct and d["arguments_correct"]
    swapped = calls_text([("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Paris"}), ("set_timer", {"minutes": 5})])
    correct, d = _score(swapped, ref, "get_weather", "set_timer")
    assert correct and not d["arguments_correct"]  # right tools, one city twice
    correct, d = _score(call_text("reverse", {"clip": "clip-1"}), TRIM, "trim", "reverse")
    assert (correct, d["arguments_correct"], d["schema_valid"]) == (False, False, True)
    correct, d = _score(TRIM + TRIM, TRIM, "trim")
    assert not correct  # a call too many


def test_text_steps_and_schema_validity():
    text = "Done: audio-1 is clip-1 from 0 to 2.5 seconds."
    correct, d = _score("Done.", text, "trim")
    assert correct and d["arguments_correct"] is None and d["schema_valid"] is None
    correct, d = _score(TRIM, text, "trim")  # called where it should have answered
    assert not correct and d["schema_valid"] and d["arguments_correct"] is None
    for bad, why in [
        (call_text("cut", {"clip": "clip-1"}), "not an offered tool"),
        (call_text("trim", {"clip": "clip-1", "start": 0.0}), "'end' is a required property"),
        (call_text("trim", {"clip": "track 1", "start": 0.0, "end": 1.0}), "does not match"),
        (call_text("trim", {"clip": "clip-1", "start": "zero", "end": 1.0}), "is not of type 'number'"),
    ]:
        _, d = _score(bad, TRIM, "trim")
        assert d["schema_valid"] is False and any(why in e for e in d["schema_errors"]), d["schema_errors"]
    with pytest.raises(UserInputError, match="metadata\\['tools'\\]"):
        TC.score_step(TRIM, TRIM, {"family": "request"})


# ----------------------------------------------------------------------------- episodes

STEP1 = call_text("trim", {"clip": "clip-1", "start": 1.0, "end": 3.0})
STEP2 = call_text("transcribe", {"clip": "audio-1"})
CHAIN = [
    {"role": "user", "content": "Keep seconds 1 to 3 of clip-1, then transcribe it."},
    {"role": "assistant", "content": STEP1}, {"role": "tool", "content": result_text("trim", "audio-1: 2.00 s, 16000 Hz")},
    {"role": "assistant", "content": STEP2}, {"role": "tool", "content": result_text("transcribe", "Hello there.")},
    {"role": "assistant", "content": 'The speaker says: "Hello there."'},
]  # fmt: skip
NOTE = call_text("loop", {"clip": "clip-1", "times": 3})


def _line(k: int, turns: list[dict], meta: dict) -> dict:
    specs = [TC.specs_of(meta)]
    return {"id": f"tc-{k}", "audio": f"clips/{k}.wav", "duration": 1.0, "task": "task_calls", "system": tools_text(specs[0]),
            "instruction": turns[0]["content"], "answer": turns[1]["content"], "turns": turns, "metadata": meta}


def _lines() -> list[dict]:
    return [
        _line(1, CHAIN, _meta("trim", "transcribe", "reverse", family="chain")),
        _line(2, [{"role": "user", "content": "Repeat clip-1 3 times."}, {"role": "assistant", "content": NOTE},
                  {"role": "tool", "content": result_text("loop", "audio-1: 3.00 s, 16000 Hz")},
                  {"role": "assistant", "content": "Done: audio-1 is clip-1 repeated 3 times."}],
              _meta("loop", "get_weather", held_out=True)),
        _line(3, [{"role": "user", "content": "How many beeps are there?"}, {"role": "assistant", "content": "3"}],
              _meta("trim", "get_weather", family="no_call")),
        {"id": "plain", "audio": "clips/4.wav", "task": "multi_turn", "instruction": "Transcribe.", "answer": "Hi.",
         "turns": [{"instruction": "Transcribe.", "answer": "Hi."}, {"instruction": "How many words?", "answer": "1"}]},
    ]  # fmt: skip


GROUPS = {"task_calls", "task_calls/chain", "task_calls/request", "task_calls/no_call", "task_calls/seen tools",
          "task_calls/held-out tools", "task_calls/call due", "task_calls/answer due"}


def test_episodes_are_read_as_steps(tmp_path, write_manifest):
    data = write_manifest(tmp_path / "d", _lines(), seconds=0.3)
    items, unknown = load_manifest(data, "test", canonical_task)
    assert not unknown
    chain = items[0]
    assert chain.task == "task_calls" and len(chain.dialogue) == 6 and len(chain.turns) == 3
    assert [t.answer for t in chain.turns] == [STEP1, STEP2, CHAIN[-1]["content"]]
    assert chain.turns[1].instruction == CHAIN[2]["content"]
    convs = TC.step_conversations(chain.dialogue)
    assert convs[0] == [Message("user", CHAIN[0]["content"], num_audio=1)]
    assert convs[2][1:] == [Message(t["role"], t["content"]) for t in CHAIN[1:5]]
    sel = select("task-calls", data)
    assert [it.id for it in sel.items] == ["tc-1", "tc-2", "tc-3"] and sel.turns == [3, 2, 1]
    assert {p.group for p in sel.planned} == GROUPS
    assert len(sel.planned) == 4 * 6
    # other suites leave episodes alone
    assert [it.id for it in select("multiturn", data).items] == ["plain"] and not select("format", data).items
    bad = {**_lines()[0], "turns": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"},
                                    {"role": "assistant", "content": "z"}]}
    write_manifest(tmp_path / "bad", [bad], seconds=0.3)
    with pytest.raises(UserInputError, match="tool turn must follow"):
        load_manifest(tmp_path / "bad", "test", canonical_task)


class ToolScriptedModel:
    """Answers each step from a script keyed by (request, step); records the conversations and formats."""

    has_transcriber = False

    def __init__(self, script: dict[tuple[str, int], Generation]) -> None:
        self.script = script
        self.calls: list[tuple[list, list, GenerationSettings]] = []

    def settings(self, **overrides) -> GenerationSettings:
        return GenerationSettings().override(**overrides)

    def encode_clip(self, samples):
        return samples

    def generate(self, conversations, audio, settings=None, formats=None):
        assert formats is not None and len(formats) == len(conversations) == len(audio)
        self.calls.append((list(conversations), list(formats), settings))
        return [self.script[(c[0].text, sum(m.role == "assistant" for m in c))] for c in conversations]


def _calls(*calls: tuple[str, dict]) -> Generation:
    return Generation("", [], "tool_calls", tool_calls=[ToolCall(n, a) for n, a in calls])


def test_scripted_steps_give_the_hand_computed_numbers(tmp_path, write_manifest):
    data = write_manifest(tmp_path / "d", _lines(), seconds=0.3)
    script = {
        (CHAIN[0]["content"], 0): _calls(("trim", {"clip": "clip-1", "start": 1.0, "end": 3.0})),  # right
        (CHAIN[0]["content"], 1): _calls(("transcribe", {"clip": "clip-1"})),  # right tool, wrong clip
        (CHAIN[0]["content"], 2): Generation("It says hello.", [], "stop"),  # rightly no call
        ("Repeat clip-1 3 times.", 0): _calls(("loop", {"clip": "clip-1", "times": 3})),  # right (held-out tool)
        ("Repeat clip-1 3 times.", 1): _calls(("get_weather", {"city": "Oslo"})),  # a call where text was due
        ("How many beeps are there?", 0): Generation("three", [], "stop"),  # rightly no call
    }  # fmt: skip
    model = ToolScriptedModel(script)
    settings = model.settings(max_new_tokens=32, num_beams=1)
    results = evaluate(model, "task-calls", data, batch_size=4, settings=settings, progress=False)
    m = results.metrics
    assert (m["task_calls"]["n"], m["task_calls"]["correct"]) == (6, 5)
    assert (m["task_calls"]["arguments"]["n"], m["task_calls"]["arguments"]["correct"]) == (3, 2)
    assert (m["task_calls"]["schema_valid"]["n"], m["task_calls"]["schema_valid"]["value"]) == (4, 1.0)
    assert (m["task_calls/chain"]["correct"], m["task_calls/chain"]["n"]) == (3, 3)
    assert m["task_calls/chain"]["arguments"]["correct"] == 1
    assert (m["task_calls/held-out tools"]["correct"], m["task_calls/held-out tools"]["n"]) == (1, 2)
    assert m["task_calls/seen tools"]["n"] == 4 and m["task_calls/no_call"]["value"] == 1.0
    assert (m["task_calls/call due"]["correct"], m["task_calls/call due"]["n"]) == (3, 3)
    assert (m["task_calls/answer due"]["correct"], m["task_calls/answer due"]["n"]) == (2, 3)
    assert (results.overall["accuracy"]["n"], results.overall["accuracy"]["correct"]) == (6, 5)  # each step once
    # teacher forcing: step 2 of the chain sees the reference call and result, not the model's wrong answer
    seen = [c for convs, _, _ in model.calls for c in convs if c[0].text == CHAIN[0]["content"]]
    assert seen[2] == [Message("user", CHAIN[0]["content"], num_audio=1)] + [Message(t["role"], t["content"]) for t in CHAIN[1:5]]
    # each conversation is offered its own item's tools, "auto"; calls get room (>= 160 new tokens)
    for convs, formats, used in model.calls:
        assert used.max_new_tokens >= TC.MIN_NEW_TOKENS and max(len(b) for b in [convs]) <= 4
        for conv, fmt in zip(convs, formats, strict=True):
            assert fmt.tool_choice == "auto" and "trim" in [t.name for t in fmt.tools] or conv[0].text != CHAIN[0]["content"]
    record = next(r for r in results.items if r.group == "task_calls" and r.turn == 2 and r.id == "tc-1")
    assert record.prediction == call_text("transcribe", {"clip": "clip-1"}) and record.details["arguments_correct"] is False
    table = markdown(results)
    assert "| task_calls | right tool or rightly none | 6 | 83.3% |" in table
    assert "| task_calls | arguments exact (steps with calls) | 3 | 66.7% |" in table
    assert "| task_calls | schema-valid (steps the model called) | 4 | 100.0% |" in table
    assert "| **overall** | schema-valid (all steps the model called) | 4 | 100.0% |" in table


def test_tiny_model_end_to_end_through_the_cli(tiny_model_dir, tmp_path, write_manifest):
    """``omnivox eval --suite task-calls`` on a random-weight model: every step answered and scored, and
    whatever it calls is schema-valid (constrained decoding)."""
    import argparse

    from omnivox.evaluation.cli import add_eval_arguments, run_eval

    data = write_manifest(tmp_path / "d", _lines(), seconds=0.5)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_model_dir), "--suite", "task-calls", "--data", str(data), "--out",
                              str(tmp_path / "out"), "--max-new-tokens", "12", "--no-transcriber", "--no-progress"])  # fmt: skip
    assert run_eval(args) == 0
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = [r for r in stored["items"] if r["group"] == "task_calls"]
    assert len(rows) == 6 and stored["metrics"]["task_calls"]["n"] == 6
    assert {r["group"] for r in stored["items"]} == GROUPS
    for r in rows:
        assert r["details"]["schema_valid"] in (None, True)
        assert (r["details"]["predicted_calls"] is None) == (TC.parse_answer(r["prediction"]) is None)
