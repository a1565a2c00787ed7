"""How tools, tool calls and tool results are written in a prompt (data, one place).

A model is offered tools in its system turn: one line per tool, a compact signature and the
tool's description (a 135 M model reads a signature line far more cheaply than a JSON
schema, and the schema itself still constrains the call: ``agent/constrained.py``). A call is
written as

    <tool_call>{"name": "trim", "arguments": {"clip": "clip-1", "start": 0.0, "end": 2.5}}</tool_call>

one or more per assistant turn, nothing else in that turn; the results come back in ``tool``
turns (one per call, in order), each ``{"name": ..., "content": ...}`` as JSON. Clips in
the conversation are called ``clip-1``, ``clip-2``, ... in the order they appear, and the
labels are written before each clip's audio (``Message.audio_labels``); audio that tools make
is named ``audio-1``, ``audio-2``, ... by the agent's workspace (HuggingGPT's
``<GENERATED>-id``: the model refers to artifacts by id, never by a path it invents).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

TOOLS_INTRO = (
    "You can call these tools. To call one, answer only with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>; if none fits, answer in words.'
)


@dataclass(frozen=True)
class ToolSpec:
    """What a prompt needs of a tool: its name, description and JSON schema of arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


def clip_label(index: int) -> str:
    """The id of the ``index``-th clip (0-based) of a conversation: ``clip-1``, ``clip-2``, ..."""
    return f"clip-{index + 1}"


def _type_name(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return "|".join(_type_name(s) for s in schema["anyOf"] if s.get("type") != "null")
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}))}]"
    return {"string": "str", "number": "float", "integer": "int", "boolean": "bool", "object": "dict"}.get(kind, str(kind))


def signature(spec: ToolSpec) -> str:
    """``trim(clip: str, start: float, end: float = null)``: optional arguments show their default."""
    properties = spec.parameters.get("properties", {})
    required = set(spec.parameters.get("required", ()))
    args = []
    for name, schema in properties.items():
        text = f"{name}: {_type_name(schema)}"
        if name not in required:
            text += f" = {json.dumps(schema.get('default'))}"
        args.append(text)
    return f"{spec.name}({', '.join(args)})"


def tools_text(specs: Sequence[ToolSpec]) -> str:
    """The system-turn text that offers ``specs``."""
    lines = [TOOLS_INTRO]
    for spec in specs:
        description = " ".join(spec.description.split())
        lines.append(f"- {signature(spec)}: {description}" if description else f"- {signature(spec)}")
    return "\n".join(lines)


def call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """One call as the model writes it."""
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': dict(arguments)}, ensure_ascii=False)}{CALL_CLOSE}"


def calls_text(calls: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """An assistant turn that makes ``calls`` (name, arguments) in order."""
    return "".join(call_text(name, arguments) for name, arguments in calls)


def result_text(name: str, content: str) -> str:
    """A tool turn's text: the result of one call (a tool's output, or its error as text)."""
    return json.dumps({"name": name, "content": content}, ensure_ascii=False)
