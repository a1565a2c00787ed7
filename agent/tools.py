"""Tools: typed Python functions whose JSON schema comes from their signature (one source of truth).

A :class:`Tool` is a function with type hints and a docstring. :func:`tool` reads the signature
into a pydantic model (each parameter's type, default, and the description from the docstring's
``Args:`` section); the model's JSON schema is what the LLM is offered and what its call is held
to (``agent/constrained.py``), and the same model validates the arguments before the function
runs. A :class:`ToolRegistry` holds tools by name; a caller chooses which are offered.

Tools a client describes only by schema (the OpenAI API's ``tools``) are :meth:`Tool.from_openai`:
they have no function here (the client runs them) and are validated with ``jsonschema``.
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from omnivox.errors import UserInputError
from omnivox.prompts.tools import CALL_CLOSE, CALL_OPEN, ToolSpec

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolArgumentError(UserInputError):
    """A call's arguments do not fit its tool's schema (the message says which and why)."""


class ToolError(Exception):
    """A tool could not do what it was asked; the message goes back to the model as text."""


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` as parsed from its JSON."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ToolResult:
    """What a tool returns: ``text`` is what the model reads; ``artifacts`` the ids of audio it made."""

    text: str
    artifacts: tuple[str, ...] = ()
    data: Any = None


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """The description (text before ``Args:``) and per-argument descriptions (Google style)."""
    doc = inspect.cleandoc(doc or "")
    head, _, rest = doc.partition("\nArgs:")
    described: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        if line.strip() and not line.startswith((" ", "\t")):
            break  # the next section (Returns:, Raises:)
        match = re.match(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if match and (current is None or len(line) - len(line.lstrip()) <= 4):
            current = match.group(1)
            described[current] = match.group(2).strip()
        elif current and line.strip():
            described[current] += " " + line.strip()
    description = " ".join(head.split("\n\n")[0].split())
    return description, described


def _strip_titles(schema: Any) -> Any:
    """Pydantic's schema without the ``title`` keys (noise to a model reading it)."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


class Tool:
    """A tool: name, description, JSON schema of its arguments, and (when it runs here) its function.

    Build one with :func:`tool` (from a typed function) or :meth:`from_openai` (schema only).
    """

    def __init__(
        self,
        name: str,
        description: str,
        parameters: Mapping[str, Any],
        function: Callable[..., Any] | None = None,
        arguments_model: type[pydantic.BaseModel] | None = None,
    ) -> None:
        if not NAME.match(name):
            raise UserInputError(f"a tool name must be 1-64 letters, digits, _ or -, got {name!r}")
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise UserInputError(f"tool {name!r}: parameters must be a JSON schema of type object, got {parameters!r}"[:300])
        self.name = name
        self.description = description
        self.parameters = dict(parameters)
        self.function = function
        self.arguments_model = arguments_model
        self._validator = None
        if arguments_model is None:
            import jsonschema

            try:
                cls = jsonschema.validators.validator_for(self.parameters)
                cls.check_schema(self.parameters)
            except jsonschema.SchemaError as err:
                raise UserInputError(f"tool {name!r}: parameters is not a valid JSON schema: {err.message}") from None
            self._validator = cls(self.parameters)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    @classmethod
    def from_openai(cls, definition: Any) -> Tool:
        """A tool from an OpenAI ``{"type": "function", "function": {name, description, parameters}}``."""
        if not isinstance(definition, Mapping) or definition.get("type") != "function":
            raise UserInputError('each tool must be {"type": "function", "function": {...}}')
        function = definition.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise UserInputError("a function tool needs function.name (a string)")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise UserInputError(f"tool {function['name']!r}: description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise UserInputError(f"tool {function['name']!r}: parameters must be a JSON schema object")
        return cls(function["name"], description, parameters or {"type": "object", "properties": {}})

    def spec(self) -> ToolSpec:
        """What the prompt and the grammar need."""
        return ToolSpec(self.name, self.description, self.parameters)

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: Mapping[str, Any] | str) -> dict[str, Any]:
        """The arguments, checked against the schema (defaults filled in for typed tools)."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise ToolArgumentError(f"{self.name}: arguments are not valid JSON ({err})") from None
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(f"{self.name}: arguments must be a JSON object, got {type(arguments).__name__}")
        if self.arguments_model is not None:
            try:
                return self.arguments_model.model_validate(dict(arguments)).model_dump()
            except pydantic.ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in err.errors())
                raise ToolArgumentError(f"{self.name}: {problems}") from None
        errors = sorted(self._validator.iter_errors(dict(arguments)), key=lambda e: list(e.path))
        if errors:
            problems = "; ".join(f"{'.'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in errors[:5])
            raise ToolArgumentError(f"{self.name}: {problems}")
        return dict(arguments)

    def run(self, arguments: Mapping[str, Any] | str) -> ToolResult:
        """Validate and run. Raises ToolArgumentError (bad arguments) or ToolError (the tool failed)."""
        if self.function is None:
            raise ToolError(f"{self.name} has no function here: the caller runs it")
        values = self.validate(arguments)
        out = self.function(**values)
        if isinstance(out, ToolResult):
            return out
        if isinstance(out, str):
            return ToolResult(out)
        return ToolResult(json.dumps(out, ensure_ascii=False, default=str), data=out)


def tool(function: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Make a :class:`Tool` of a typed function (``@tool`` or ``@tool(name="...")``).

    Every parameter needs a type hint; its description comes from the docstring's ``Args:``
    section; the description of the tool is the docstring's first paragraph.
    """

    def build(fn: Callable[..., Any]) -> Tool:
        description, described = _docstring_parts(fn.__doc__ or "")
        hints = inspect.get_annotations(fn, eval_str=True)
        fields: dict[str, Any] = {}
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {fn.__name__}: *args/**kwargs cannot be described by a schema")
            if pname not in hints:
                raise TypeError(f"tool {fn.__name__}: parameter {pname!r} needs a type hint")
            default = ... if param.default is param.empty else param.default
            fields[pname] = (hints[pname], pydantic.Field(default, description=described.get(pname)))
        tool_name = name or fn.__name__
        model = pydantic.create_model(
            f"{tool_name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields
        )
        schema = _strip_titles(model.model_json_schema())
        schema.setdefault("properties", {})
        return Tool(tool_name, description, schema, fn, model)

    return build(function) if function is not None else build


class ToolRegistry:
    """Tools by name; :meth:`select` picks the ones a request offers."""

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool) -> Tool:
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UserInputError(f"no tool named {name!r}; known: {sorted(self._tools)}") from None

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def select(self, names: Sequence[str] | None = None) -> list[Tool]:
        return list(self._tools.values()) if names is None else [self.get(n) for n in names]

    def specs(self, names: Sequence[str] | None = None) -> list[ToolSpec]:
        return [t.spec() for t in self.select(names)]

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)


CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls in an answer written as ``<tool_call>{...}</tool_call>...``; None if it is not calls.

    Constrained decoding makes every complete answer either text or well-formed calls; an answer
    cut short by ``max_new_tokens`` inside a call is not calls (None) and stays text.
    """
    stripped = text.strip()
    if not stripped.startswith(CALL_OPEN):
        return None
    calls = []
    end = 0
    for match in CALL.finditer(stripped):
        if stripped[end : match.start()].strip():
            return None
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("arguments"), dict):
            return None
        calls.append(ToolCall(body["name"], body["arguments"]))
        end = match.end()
    if not calls or stripped[end:].strip():
        return None
    return calls
