"""The task-calls suite: does the model call the right tool with the right arguments, or rightly none?

An item (``datagen/task_calls.py``) is an episode of role turns: the request, then assistant turns
that are calls (followed by the tools' results) or text. Every assistant turn is one scored *step*,
teacher-forced: the model sees the reference conversation up to that turn (the reference calls and
the tools' reference results) and the item's tools, offered by ``Assistant.generate`` (``tools``,
``tool_choice="auto"``; the assistant writes the tool list into the system turn and labels the clip).

A step is scored on three things (:func:`score_step`):

- **right tool**: the same tool names as the reference (any order, with repeats), or no call where
  the reference answers in words ("rightly no call"); this is the step's ``correct``.
- **arguments exact**: for steps whose reference calls tools, every reference call has a predicted
  call of that tool with equal arguments after filling in schema defaults. Numbers are equal within
  ``NUMBER_ABS_TOLERANCE`` or ``NUMBER_REL_TOLERANCE``; strings after case folding, collapsing
  whitespace and stripping leading/trailing punctuation and quotes; booleans exactly.
- **schema-valid**: for steps where the model called tools, every call names an offered tool and its
  arguments validate against that tool's JSON schema (``jsonschema``). Constrained decoding makes
  this 100 %; anything less is a decoding bug.

Rows: ``task_calls`` (all steps), ``task_calls/<family>``, ``task_calls/held-out tools`` vs
``task_calls/seen tools`` (an item is held-out when a tool it needs is offered only in test), and
``task_calls/call due`` vs ``task_calls/answer due`` (the reference step calls tools, or answers in
words: a model that never calls scores 0 % and 100 % there).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omnivox.errors import UserInputError
from omnivox.prompts import Message
from omnivox.prompts.tools import ToolSpec, calls_text

TASK = "task_calls"
NUMBER_ABS_TOLERANCE = 0.01
NUMBER_REL_TOLERANCE = 1e-3
# calls can be long (parallel calls, a transcript as an argument): the step's budget is at least this
MIN_NEW_TOKENS = 160
ALL_GROUP = TASK
HELD_OUT_GROUP, SEEN_GROUP = f"{TASK}/held-out tools", f"{TASK}/seen tools"
CALL_DUE_GROUP, ANSWER_DUE_GROUP = f"{TASK}/call due", f"{TASK}/answer due"


def specs_of(metadata: Mapping[str, Any]) -> list[ToolSpec]:
    """The offered tools of an item (``metadata["tools"]``: name, description, parameters)."""
    tools = metadata.get("tools")
    if not isinstance(tools, list) or not tools:
        raise UserInputError("a task_calls item needs metadata['tools'], a list of {name, description, parameters}")
    try:
        return [ToolSpec(t["name"], t.get("description", ""), t["parameters"]) for t in tools]
    except (KeyError, TypeError):
        raise UserInputError(f"metadata['tools'] entries need name and parameters, got {json.dumps(tools)[:200]}") from None


def parse_answer(text: str) -> list[dict[str, Any]] | None:
    """The calls of an answer (``[{"name", "arguments"}]``), or None when it is text."""
    from omnivox.agent.tools import parse_calls

    calls = parse_calls(text)
    return None if calls is None else [{"name": c.name, "arguments": c.arguments} for c in calls]


def answer_text(generation: Any) -> str:
    """A generation as the reference writes it: its calls as ``<tool_call>`` text, else its text."""
    calls = getattr(generation, "tool_calls", None) or []
    return calls_text([(c.name, c.arguments) for c in calls]) if calls else generation.text


def with_defaults(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` with the schema's defaults for the properties left out."""
    out = dict(arguments)
    for name, prop in schema.get("properties", {}).items():
        if name not in out and isinstance(prop, Mapping) and "default" in prop:
            out[name] = prop["default"]
    return out


def schema_errors(call: Mapping[str, Any], specs: Mapping[str, ToolSpec]) -> list[str]:
    """Why ``call`` does not fit the offered tools (empty when it does)."""
    import jsonschema

    spec = specs.get(call["name"])
    if spec is None:
        return [f"{call['name']!r} is not an offered tool ({sorted(specs)})"]
    validator = jsonschema.validators.validator_for(spec.parameters)(spec.parameters)
    return [f"{'.'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in validator.iter_errors(call["arguments"])]


_EDGES = re.compile(r"^[\s\"'.,;:!?]+|[\s\"'.,;:!?]+$")


def normalize_string(text: str) -> str:
    """Case folded, whitespace collapsed, leading/trailing punctuation and quotes removed."""
    return _EDGES.sub("", " ".join(text.split()).casefold())


def values_equal(got: Any, want: Any) -> bool:
    """Argument values equal as :mod:`this module's docstring <omnivox.evaluation.tool_calls>` says."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=NUMBER_REL_TOLERANCE, abs_tol=NUMBER_ABS_TOLERANCE)
    if isinstance(want, str) and isinstance(got, str):
        return normalize_string(got) == normalize_string(want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(values_equal(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        return set(got) == set(want) and all(values_equal(got[k], want[k]) for k in want)
    return got == want


def arguments_equal(got: Mapping[str, Any], want: Mapping[str, Any], schema: Mapping[str, Any]) -> bool:
    return values_equal(with_defaults(got, schema), with_defaults(want, schema))


def calls_match(got: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]], specs: Mapping[str, ToolSpec]) -> bool:
    """Every reference call has its own predicted call with the same tool and equal arguments (any order)."""
    if len(got) != len(want):
        return False
    free = list(got)
    for w in want:
        schema = specs[w["name"]].parameters if w["name"] in specs else {}
        match = next((g for g in free if g["name"] == w["name"] and arguments_equal(g["arguments"], w["arguments"], schema)), None)
        if match is None:
            return False
        free.remove(match)
    return True


def score_step(prediction: str, reference: str, metadata: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """One step: (right tool or rightly no call, details): arguments_correct (None for a text step),
    schema_valid (None when the model made no call), the calls compared."""
    specs = {s.name: s for s in specs_of(metadata)}
    want, got = parse_answer(reference), parse_answer(prediction)
    if want is None:
        right_tool, arguments = got is None, None
    else:
        right_tool = got is not None and sorted(c["name"] for c in got) == sorted(c["name"] for c in want)
        arguments = right_tool and calls_match(got, want, specs)
    errors = [e for c in got for e in schema_errors(c, specs)] if got is not None else []
    return right_tool, {
        "arguments_correct": arguments, "schema_valid": None if got is None else not errors, "schema_errors": errors,
        "expected_calls": want, "predicted_calls": got, "family": metadata.get("family"),
        "held_out": bool(metadata.get("held_out")),
    }  # fmt: skip


# ------------------------------------------------------------------------ conversations


def groups(metadata: Mapping[str, Any], reference: str) -> list[str]:
    """The results rows a step of this item whose reference answer is ``reference`` counts in."""
    family = metadata.get("family") or "other"
    return [ALL_GROUP, f"{TASK}/{family}", HELD_OUT_GROUP if metadata.get("held_out") else SEEN_GROUP,
            ANSWER_DUE_GROUP if parse_answer(reference) is None else CALL_DUE_GROUP]


def step_conversations(dialogue: Sequence[tuple[str, str]]) -> list[list[Message]]:
    """For each assistant turn of ``dialogue`` ((role, text) pairs, a user turn first), the reference
    conversation before it (the clip in the first user turn; labels and tools are the assistant's job)."""
    out = []
    for k, (role, _) in enumerate(dialogue):
        if role == "assistant":
            head = [Message("user", dialogue[0][1], num_audio=1)]
            out.append(head + [Message(r, t) for r, t in dialogue[1:k]])
    return out
