"""Tools from typed functions, the answer grammar, and constrained decoding on a random-weight tiny model."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import pydantic
import pytest
import tiny

from omnivox.agent.constrained import AnswerFormat, answer_grammar
from omnivox.agent.tools import Tool, ToolArgumentError, ToolRegistry, parse_calls, tool
from omnivox.errors import UserInputError
from omnivox.prompts import Message, ToolSpec, call_text, calls_text, signature, tools_text


@tool
def set_volume(
    clip: Annotated[str, pydantic.Field(pattern=r"^clip-[1-9]$")],
    gain_db: Annotated[float, pydantic.Field(ge=-30, le=30)],
    mode: Literal["peak", "rms"] = "peak",
) -> str:
    """Change a clip's volume.

    Longer text that is not part of the description.

    Args:
        clip: the clip's id.
        gain_db: the change in dB;
            negative is quieter.
        mode: how the level is measured.
    """
    return f"{clip} {gain_db:+.1f} dB ({mode})"


@tool(name="count-events")
def count_events(
    clip: Annotated[str, pydantic.Field(pattern=r"^clip-[1-9]$")],
    label: Annotated[str, pydantic.Field(pattern=r"^[a-z ]{1,12}$")],
    at_most: Annotated[int, pydantic.Field(ge=0, le=99)] = 10,
    strict: bool = False,
    tags: Annotated[list[Annotated[str, pydantic.Field(max_length=6)]], pydantic.Field(max_length=2)] = [],  # noqa: B006
) -> str:
    """Count the events of one kind in a clip."""
    return str(at_most)


def test_schema_comes_from_the_signature_and_docstring():
    schema = set_volume.parameters
    assert set_volume.name == "set_volume" and set_volume.description == "Change a clip's volume."
    assert schema["required"] == ["clip", "gain_db"] and schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["gain_db"] == {"description": "the change in dB; negative is quieter.", "maximum": 30, "minimum": -30,
                                "type": "number"}  # fmt: skip
    assert props["mode"]["enum"] == ["peak", "rms"] and props["mode"]["default"] == "peak"
    assert "title" not in json.dumps(schema)
    assert count_events.name == "count-events"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert signature(set_volume.spec()) == 'set_volume(clip: str, gain_db: float, mode: "peak"|"rms" = "peak")'
    assert set_volume.openai_schema()["function"]["parameters"] == schema


def test_untyped_parameters_are_refused():
    with pytest.raises(TypeError, match="needs a type hint"):

        @tool
        def bad(x):  # noqa: ANN001
            """No hints."""


def test_arguments_are_validated_with_defaults_filled():
    assert set_volume.validate({"clip": "clip-1", "gain_db": -6}) == {"clip": "clip-1", "gain_db": -6.0, "mode": "peak"}
    assert set_volume.validate('{"clip": "clip-2", "gain_db": 3, "mode": "rms"}')["mode"] == "rms"
    for bad, where in [
        ({"clip": "clip-1"}, "gain_db"),
        ({"clip": "clip-1", "gain_db": "loud"}, "gain_db"),
        ({"clip": "../etc/passwd", "gain_db": 1}, "clip"),
        ({"clip": "clip-1", "gain_db": 1, "extra": 1}, "extra"),
        ({"clip": "clip-1", "gain_db": 99}, "gain_db"),
        ("not json", "not valid JSON"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(ToolArgumentError, match=where):
            set_volume.validate(bad)
    assert set_volume.run({"clip": "clip-1", "gain_db": 2}).text == "clip-1 +2.0 dB (peak)"


def test_client_tools_are_schema_only_and_checked():
    t = Tool.from_openai({"type": "function", "function": {"name": "lookup", "description": "Look up.",
                          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}})  # fmt: skip
    assert t.validate({"q": "x"}) == {"q": "x"}
    with pytest.raises(ToolArgumentError, match="'q' is a required property"):
        t.validate({})
    for bad, message in [
        ({"type": "function", "function": {"name": "bad name!"}}, "tool name"),
        ({"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}, "type object"),
        ({"type": "function", "function": {"name": "x", "parameters": {"type": "object", "properties": 3}}}, "not a valid JSON schema"),
        ({"type": "retrieval"}, "type"),
        ({"type": "function", "function": {"name": 3}}, "function.name"),
    ]:
        with pytest.raises(UserInputError, match=message):
            Tool.from_openai(bad)


def test_registry():
    reg = ToolRegistry([set_volume, count_events])
    assert reg.names == ["set_volume", "count-events"] and "set_volume" in reg and len(reg) == 2
    assert [s.name for s in reg.specs(["count-events"])] == ["count-events"]
    with pytest.raises(UserInputError, match="known: \\['count-events', 'set_volume'\\]"):
        reg.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(set_volume)


def test_parse_calls():
    one = call_text("set_volume", {"clip": "clip-1", "gain_db": -3.0})
    assert parse_calls(one)[0].arguments == {"clip": "clip-1", "gain_db": -3.0}
    two = parse_calls(calls_text([("a", {}), ("b", {"x": [1]})]))
    assert [c.name for c in two] == ["a", "b"] and two[0].id != two[1].id
    for text in ["hello", one[:-3], one + " and more", "<tool_call>{bad}</tool_call>", '<tool_call>{"name": 1}</tool_call>', ""]:
        assert parse_calls(text) is None


def test_grammar_choices_and_errors():
    specs = [set_volume.spec(), count_events.spec()]
    assert answer_grammar(specs, "none") is None and answer_grammar((), "auto") is None
    assert "start: TEXT | calls" in answer_grammar(specs, "auto")
    assert "start: calls" in answer_grammar(specs, "required")
    assert "call?" not in answer_grammar(specs, "required", parallel_tool_calls=False)
    named = answer_grammar(specs, "count-events")
    assert "start: call\n" in named and '"set_volume"' not in named
    with pytest.raises(UserInputError, match="tool_choice"):
        answer_grammar(specs, "other")
    with pytest.raises(UserInputError, match="needs at least one tool"):
        answer_grammar((), "required")
    with pytest.raises(UserInputError, match="unique"):
        answer_grammar([specs[0], specs[0]])
    assert not AnswerFormat(tuple(specs), "none").constrained and AnswerFormat(response_format={"type": "object"}).constrained


@pytest.fixture(scope="module")
def assistant(tiny_model_dir):
    from omnivox.agent.assistant import Assistant

    return Assistant.from_pretrained(tiny_model_dir, transcriber=False)


def _matcher(assistant, fmt: AnswerFormat):
    return assistant.model.constraint([fmt]).matchers[0]


def test_the_grammar_accepts_what_the_prompt_format_writes(assistant):
    """The constraint and prompts.tools agree on the form of a call (separators, key order)."""
    tok = assistant.model.tokenizer
    fmt = AnswerFormat((set_volume.spec(), count_events.spec()), "auto")
    good = [
        call_text("set_volume", {"clip": "clip-1", "gain_db": -3.5}),
        calls_text([("set_volume", {"clip": "clip-2", "gain_db": 1, "mode": "rms"}), ("count-events", {"clip": "clip-1", "label": "dog"})]),
        "Three beeps.",
    ]
    for text in good:
        m = _matcher(assistant, fmt)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert m.try_consume_tokens(ids) == len(ids) and m.is_accepting(), text
    bad = [
        call_text("set_volume", {"clip": "clip-1"}),  # missing a required argument
        call_text("set_volume", {"clip": "clip-1", "gain_db": 99}),  # out of range
        call_text("unknown", {}),
        '<tool_call>{"name":"set_volume", "arguments": {}}</tool_call>',  # other separators
        " <tool_call>",  # text may not start with blanks then a call
    ]
    for text in bad:
        m = _matcher(assistant, fmt)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert m.try_consume_tokens(ids) < len(ids) or not m.is_accepting(), text


def test_a_thousand_constrained_calls_from_random_weights_all_validate(assistant):
    """Sampling from a random-weight model (the worst writer there is): every call parses and validates."""
    specs = [set_volume.spec(), count_events.spec()]
    by_name = {s.name: s for s in specs}
    clip = assistant.encode_clip(tiny.tone_clip(1.0))
    settings = assistant.settings(num_beams=1, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=200)
    seen, names = 0, set()
    for choice in ["required", "count-events", "required", "set_volume"] * 2 + ["required"] * 2:
        out = assistant.generate([[Message("user", "Do it.", num_audio=1)]] * 100, [[clip]] * 100, settings,
                                 tools=specs, tool_choice=choice, parallel_tool_calls=False)  # fmt: skip
        for answer in out:
            assert answer.finish_reason == "tool_calls" and answer.text == "", answer
            for call in answer.tool_calls:
                jsonschema.validate(call.arguments, by_name[call.name].parameters)
                assert choice == "required" or call.name == choice
                names.add(call.name)
                seen += 1
    assert seen >= 1000 and names == set(by_name)


def test_auto_gives_text_or_calls_and_response_format_gives_valid_json(assistant):
    specs = [set_volume.spec()]
    clip = assistant.encode_clip(tiny.tone_clip(1.0))
    settings = assistant.settings(num_beams=1, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=60)
    out = assistant.generate([[Message("user", "Hi.", num_audio=1)]] * 60, [[clip]] * 60, settings, tools=specs)
    for answer in out:
        assert (answer.finish_reason == "tool_calls") == bool(answer.tool_calls)
        if not answer.tool_calls:
            assert answer.text and not answer.text.startswith(("<", " "))
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9},
              "sound": {"enum": ["beep", "knock"]}}, "required": ["count", "sound"], "additionalProperties": False}  # fmt: skip
    out = assistant.generate([[Message("user", "Count.", num_audio=1)]] * 20, [[clip]] * 20, settings, response_format=schema)
    for answer in out:
        jsonschema.validate(json.loads(answer.text), schema)


def test_tools_are_written_into_the_prompt_and_calls_are_not_streamed_as_text(assistant):
    from omnivox.agent.assistant import offer_tools

    conv = offer_tools([Message("system", "Be brief."), Message("user", "Two clips.", num_audio=2), Message("assistant", "ok"),
                        Message("user", "One more.", num_audio=1)], [set_volume.spec()])  # fmt: skip
    assert conv[0].text.startswith("Be brief.\n\n") and tools_text([set_volume.spec()]) in conv[0].text
    assert conv[1].audio_labels == ("clip-1", "clip-2") and conv[3].audio_labels == ("clip-3",)
    clip = assistant.encode_clip(tiny.tone_clip(1.0))
    pieces, calls = [], []
    answer = assistant.generate([[Message("user", "Do it.", num_audio=1)]], [[clip]], assistant.settings(num_beams=1, max_new_tokens=120),
                                pieces.append, tools=[count_events.spec()], tool_choice="required", on_tool_call=calls.append)[0]  # fmt: skip
    assert answer.tool_calls and pieces == [] and calls == answer.tool_calls


def test_tool_turns_render_in_order_and_bad_orders_are_refused():
    from omnivox.prompts import get_prompt_style

    style = get_prompt_style("chatml-bare")
    messages = [Message("user", "Cut it.", num_audio=1, audio_labels=("clip-1",)), Message("assistant", call_text("trim", {})),
                Message("tool", '{"name": "trim", "content": "audio-1: 1.00 s, 16000 Hz"}'), Message("assistant", "Done.")]  # fmt: skip
    text = "".join(s if isinstance(s, str) else f"[{s.value}]" for s in style.render(messages, add_generation_prompt=False))
    assert "<|im_start|>user\nclip-1: <audio>[audio]</audio>Cut it." in text
    assert "<|im_start|>tool\n{\"name\": \"trim\"" in text
    with pytest.raises(UserInputError, match="a tool turn must follow assistant or tool"):
        style.render([Message("user", "x"), Message("tool", "y")])
    with pytest.raises(UserInputError, match="audio labels"):
        Message("user", "x", num_audio=1, audio_labels=("clip-1", "clip-2"))


def test_constrained_answers_refuse_beam_search(assistant):
    clip = assistant.encode_clip(tiny.tone_clip(1.0))
    with pytest.raises(UserInputError, match="num_beams 1"):
        assistant.model.generate([[Message("user", "x", num_audio=1)]], [[clip]], assistant.settings(num_beams=2),
                                 formats=[AnswerFormat((ToolSpec("a", "", {"type": "object", "properties": {}}),), "required")])  # fmt: skip
