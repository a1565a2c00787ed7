"""Tool-call items: offered tools, calls that parse and validate, arguments from the request and the
audio, held-out tools and wordings, and a generator whose earlier items are unchanged (espeak-ng needed)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from omnivox.agent.tools import parse_calls
from omnivox.datagen import SynthOptions, generate
from omnivox.datagen import task_calls as TC
from omnivox.datagen.generate import ItemKey, plan_items, voices_by_split
from omnivox.datagen.tasks import Resources
from omnivox.datagen.text import BUILTIN_SENTENCES, TextCorpus
from omnivox.datagen.voices import available_voices
from omnivox.prompts import Message
from omnivox.prompts.styles import PromptStyle
from omnivox.prompts.tools import ToolSpec, result_text, tools_text

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not on PATH")

N_PER_SPLIT = {"train": 160, "validation": 40, "test": 160}


@pytest.fixture(scope="module")
def resources() -> Resources:
    corpus = TextCorpus.build(list(BUILTIN_SENTENCES), 0.15, "builtin")
    return Resources(voices_by_split(available_voices(("espeak",)), 0.1), corpus, {}, mp3=False)


@pytest.fixture(scope="module")
def items(resources) -> dict[str, list]:
    return {split: [TC.build_task_calls(np.random.default_rng([7, k, len(split)]), split, resources) for k in range(n)]
            for split, n in N_PER_SPLIT.items()}  # fmt: skip


def _all(items):
    return [(split, it) for split, group in items.items() for it in group]


def _calls(item) -> list[list[dict]]:
    """Each assistant turn's calls as parsed from its text ([] for a text turn)."""
    out = []
    for turn in item.turns:
        if turn["role"] == "assistant":
            calls = parse_calls(turn["content"])
            out.append([] if calls is None else [{"name": c.name, "arguments": c.arguments} for c in calls])
    return out


def test_builtin_specs_are_the_agents():
    """The built-ins are offered in training exactly as the agent offers them."""
    from omnivox.agent.builtin_tools import builtin_tools
    from omnivox.agent.workspace import Workspace

    registry = builtin_tools(None, Workspace())
    assert set(registry.names) <= set(TC.BUILTIN_TOOLS)
    for name in registry.names:
        theirs = registry.get(name).spec()
        assert TC.TOOLS[name].spec == ToolSpec(theirs.name, theirs.description, theirs.parameters), name
        assert tools_text([TC.TOOLS[name].spec]) == tools_text([theirs])


def test_tool_table():
    others = [n for n in TC.TOOLS if n not in TC.BUILTIN_TOOLS]
    assert len(others) >= 20 and TC.HELD_OUT_TOOLS < set(others)
    for tool in TC.TOOLS.values():
        jsonschema.Draft202012Validator.check_schema(tool.spec.parameters)
        assert tool.kind in ("edit", "listen", "make", "info")
    phrased = {p.tool for p in TC.PHRASINGS} | {"ask", "mix"}
    assert phrased == set(TC.TOOLS)
    for p in TC.PHRASINGS:  # a wording is one split's or the other's, never both
        assert p.train and p.test and not set(p.train) & set(p.test), p.tool


def test_items_are_well_formed_episodes(items):
    families = Counter()
    for _, item in _all(items):
        families[item.metadata["family"]] += 1
        specs = [TC.spec_of(t) for t in item.metadata["tools"]]
        names = [s.name for s in specs]
        assert 2 <= len(specs) <= 6 and len(set(names)) == len(names)
        assert item.system == tools_text(specs)
        assert item.turns[0] == {"role": "user", "content": item.instruction} and item.answer == item.turns[1]["content"]
        PromptStyle.check_order([Message("system", item.system)] + [Message(t["role"], t["content"]) for t in item.turns])
        assert item.turns[-1]["role"] == "assistant" and parse_calls(item.turns[-1]["content"]) is None
        assert TC.MIN_SECONDS <= item.audio.size / 16000 <= TC.MAX_SECONDS
        assert item.metadata["no_call"] == (not item.metadata["expected"][0])
    assert set(families) == set(TC.FAMILIES), families


def test_calls_parse_validate_and_match_the_metadata(items):
    for _, item in _all(items):
        specs = {t["name"]: t["parameters"] for t in item.metadata["tools"]}
        calls = _calls(item)
        assert calls == item.metadata["expected"]
        results = [t["content"] for t in item.turns if t["role"] == "tool"]
        made = [c for step in calls for c in step]
        assert len(results) == len(made)
        for call, result in zip(made, results, strict=True):
            assert call["name"] in specs, (call, list(specs))
            jsonschema.validate(call["arguments"], specs[call["name"]])
            assert json.loads(result)["name"] == call["name"]
        for call in made:
            for value in call["arguments"].values():
                if isinstance(value, str) and re.fullmatch(r"(clip|audio)-\d+", value):
                    assert value == "clip-1" or value in " ".join(results), value  # ids exist when used


def test_held_out_tools_and_wordings_stay_in_test(items):
    seen = {split: {t["name"] for it in group for t in it.metadata["tools"]} for split, group in items.items()}
    assert not seen["train"] & TC.HELD_OUT_TOOLS and not seen["validation"] & TC.HELD_OUT_TOOLS
    assert seen["test"] & TC.HELD_OUT_TOOLS == TC.HELD_OUT_TOOLS
    assert any(it.metadata["held_out"] for it in items["test"])
    # a held-out wording never frames a train request (slots matched loosely)
    held_out = [t for p in TC.PHRASINGS if p.tool not in TC.HELD_OUT_TOOLS for t in p.test]
    held_out += [w for group in (TC.SPEECH_REQUESTS, TC.ASK_FRAMES) for w in group["test"]]
    patterns = [re.compile(r"\b" + re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t)) + r"\b", re.IGNORECASE) for t in held_out]
    for item in items["train"]:
        spoken = item.metadata.get("text", "") if item.metadata["family"] == "speech" else ""
        for text in (item.instruction, spoken):
            hit = [p.pattern for p in patterns if p.search(text)]
            assert not hit, (text, hit)
    train_requests = {it.instruction for it in items["train"] if it.metadata["family"] != "no_call"}
    assert not train_requests & {it.instruction for it in items["test"]}


def test_arguments_are_what_was_asked_or_heard(items):
    def number_words(text):
        return {abs(float(x)) for x in re.findall(r"-?\d+(?:\.\d+)?", text)}

    for split, item in _all(items):
        meta, family = item.metadata, item.metadata["family"]
        calls = [c for step in meta["expected"] for c in step]
        heard = meta.get("text", "")
        if family in ("request", "speech", "unavailable", "parallel"):
            source = item.instruction if family != "speech" else heard
            numbers = number_words(source)
            for call in calls:
                for key, value in call["arguments"].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        implied = key == "start" and value == 0.0  # "the first 2 seconds"
                        assert implied or abs(value) in numbers or abs(value) / 1000 in numbers, (key, value, source)
                    elif isinstance(value, str) and key not in ("clip", "text", "expression"):
                        assert value.lower() in source.lower(), (key, value, source)
        if family == "speech":
            assert item.instruction in TC.SPEECH_REQUESTS["train" if split == "train" else "test"]
            assert "clip-1" not in heard and heard.strip()
        if family == "transcript":
            (call,) = calls
            assert call["arguments"].get("text", call["arguments"].get("query")) == heard
        if family == "ask":
            question = calls[0]["arguments"]["question"]
            assert item.instruction.endswith(question)
        if family == "sound":
            (seg,) = meta["segments"]
            assert calls[0]["arguments"]["description"] == seg["caption"]
        if family == "chain" and meta["chain"] == "listen_info":
            first, second = calls
            transcript = json.loads([t for t in item.turns if t["role"] == "tool"][0]["content"])["content"]
            assert transcript == heard and transcript in second["arguments"].values()
        for call in calls:
            if call["name"] == "trim" and call["arguments"]["clip"] == "clip-1":
                assert 0 <= call["arguments"]["start"] < call["arguments"]["end"] <= item.audio.size / 16000


def test_no_call_items_offer_nothing_that_fits(items):
    for _, item in _all(items):
        offered = {t["name"] for t in item.metadata["tools"]}
        family = item.metadata["family"]
        if family == "no_call":
            assert not offered & TC.LISTEN_TOOLS and item.metadata["source_task"]
        if family == "unavailable":
            (needed,) = item.metadata["targets"]
            assert needed not in offered and item.answer == TC.NO_TOOL_ANSWER
        if family not in ("no_call", "unavailable"):
            assert set(item.metadata["targets"]) <= offered


def test_results_are_written_as_the_agent_tools_write_them(items):
    from omnivox.agent.builtin_tools import measure_audio

    for _, item in _all(items):
        calls = [c for step in item.metadata["expected"] for c in step]
        results = [json.loads(t["content"])["content"] for t in item.turns if t["role"] == "tool"]
        for call, result in zip(calls, results, strict=True):
            if call["name"] == "measure" and call["arguments"]["clip"] == "clip-1":
                assert json.loads(result) == measure_audio(item.audio, 16000)
            if call["name"] in ("trim", "mix", "set_volume", "reverse", "speak", "generate_sound"):
                assert re.fullmatch(r"audio-\d+: \d+\.\d\d s, \d+ Hz", result), result
            if call["name"] == "convert":
                assert re.fullmatch(rf"audio-\d+: \d+\.\d\d s, {call['arguments'].get('sample_rate', 16000)} Hz, \w+", result)
            if call["name"] == "detect_speech":
                assert result == "no speech" or all(set(s) == {"start", "end"} for s in json.loads(result))
            if call["name"] == "trim" and call["arguments"]["clip"] == "clip-1":
                want = call["arguments"]["end"] - call["arguments"]["start"]
                assert float(result.split()[1]) == pytest.approx(want, abs=0.011)
    assert result_text("trim", "x") == '{"name": "trim", "content": "x"}'


def test_plan_grows_without_moving_items():
    small, big = plan_items(10, {"task_calls": 0.2}), plan_items(30, {"task_calls": 0.2})
    for task in (None, "task_calls"):
        a, b = [k for k in small if k.task == task], [k for k in big if k.task == task]
        assert b[: len(a)] == a
    assert Counter(k.task for k in big) == {None: 30, "task_calls": 8}  # a fifth of all items
    assert [k for k in plan_items(12, {"task_calls": 0.0})] == [ItemKey(None, i) for i in range(12)]


OPTS = SynthOptions(engines=("espeak",), fortune_dir=None, sentences=BUILTIN_SENTENCES, validation_items=0.2,
                    test_items=0.2, held_out_sentences=0.15, progress=False)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((folder / "items").glob("*.json")) + sorted((folder / "audio").rglob("*.wav"))}


def test_adding_tool_calls_keeps_every_earlier_item(tmp_path):
    """A dataset made without tool calls is the same bytes inside one made with them, and grows into it."""
    without = SynthOptions(**{**OPTS.__dict__, "task_shares": {"task_calls": 0.0}})
    generate(tmp_path / "old", 0.01, seed=3, options=without)
    generate(tmp_path / "new", 0.01, seed=3, options=OPTS)
    old, new = _digests(tmp_path / "old"), _digests(tmp_path / "new")
    assert old.items() < new.items() and any("task_calls-" in k for k in new)
    state = json.loads((tmp_path / "old" / "state.json").read_text())
    state.pop("added_tasks")  # as a dataset of generator 1.0 wrote it
    (tmp_path / "old" / "state.json").write_text(json.dumps(state))
    generate(tmp_path / "old", 0.01, seed=3, options=OPTS)  # extended in place
    assert _digests(tmp_path / "old") == new
    for split in ("train", "validation", "test"):
        assert (tmp_path / "old" / f"{split}.jsonl").read_text() == (tmp_path / "new" / f"{split}.jsonl").read_text()
    lines = [json.loads(x) for x in (tmp_path / "new" / "train.jsonl").read_text().splitlines()]
    calls = [x for x in lines if x["task"] == "task_calls"]
    assert calls and all(x["system"].startswith("You can call these tools") and x["id"].startswith("task_calls-") for x in calls)
    summary = json.loads((tmp_path / "new" / "dataset.json").read_text())
    assert summary["held_out"]["tools"]["test"] == sorted(TC.HELD_OUT_TOOLS) and "task_calls" in summary["tasks"]
