"""LangChain integration: :class:`ChatOmnivox` (a chat model) and :func:`omnivox_tools` (omnivox as tools).

``ChatOmnivox`` is a langchain-core ``BaseChatModel`` that answers with an omnivox model, either

- in this process: ``ChatOmnivox(model="omnivox-nano")`` (the bundled model), ``model="path/to/folder"``
  (loaded on the first call, once per folder and load options, and shared by every ``ChatOmnivox``
  naming it), or ``ChatOmnivox(assistant=Assistant.from_pretrained(...))``; or
- from an ``omnivox serve`` server: ``ChatOmnivox(base_url="http://host:8000/v1", api_key=...)``, through
  the ``openai`` package's client (text and audio; tools and ``response_format`` where the server
  takes them).

What it reads (``messages``):

- text, and audio in user turns as any of the block shapes LangChain and OpenAI use:
  ``{"type": "audio", "base64": ..., "mime_type": "audio/wav"}``, ``{"type": "audio", "url": "data:audio/wav;base64,..."}``
  (data URLs only: nothing is downloaded), ``{"type": "input_audio", "input_audio": {"data", "format"}}`` and
  vLLM's ``{"type": "audio_url", "audio_url": {"url": "data:..."}}``. Audio is decoded by
  :func:`~omnivox.agent.audio.load_audio` (any format it reads). A turn's clips go before its text, in
  order (the prompt format puts audio first). Images, files and video are refused with an error;
- system messages, gathered into the one system turn at the start; consecutive human (or AI)
  messages, joined into one turn (the prompt format alternates turns);
- ``AIMessage.tool_calls`` (an AI turn that calls tools is written as its calls alone, as the
  model writes one: ``prompts/tools.py``; text beside the calls is left out) and ``ToolMessage``
  replies, each written as ``result_text(name, content)`` with the name of the call its
  ``tool_call_id`` names (a ToolMessage with ``status="error"`` is prefixed ``error: ``; its
  ``artifact`` is not shown to the model).

What it offers: ``bind_tools`` (LangChain tools, pydantic models, typed functions or OpenAI tool
dicts; ``tool_choice`` "auto", "none", "any"/"required" or a tool's name); answers whose
``tool_calls`` always parse and fit the tool's schema (decoding is constrained,
``agent/constrained.py``; a call cut short by ``max_tokens`` is no call: the answer then has
``finish_reason`` "length"); ``with_structured_output`` (``method="json_schema"``, the default: the
answer is held to the schema; ``"function_calling"``: one forced call of a tool made of the
schema; ``"json_mode"``: any JSON object); streaming (text as it is decoded; tool calls whole in
the last chunk); async (the sync path in an executor); ``usage_metadata`` (prompt tokens, audio
tokens among them, and answer tokens).

Tools made from Python (LangChain tools, pydantic models, functions, TypedDicts) take exactly their
signature's arguments, so their schema is closed (``additionalProperties: false``), as omnivox's own
typed tools are (``agent/tools.py``): the model cannot add arguments no function takes. OpenAI
dicts and JSON schemas are used as given (``strict=True`` closes them as OpenAI's strict mode does).

Decoding: ``temperature`` None keeps the model folder's default decoding (which may be beam
search; a streamed beam-search answer arrives as one chunk), 0 is greedy, > 0 samples.
``stop`` strings cut the answer after it is decoded (generation runs to its own end). In process
the model works one call at a time per :class:`Assistant` (a lock), so ``batch`` and concurrent
async calls queue; ``timeout`` and ``max_retries`` apply to the server only.

:func:`omnivox_tools` gives omnivox's ``transcribe`` and ``ask`` as LangChain tools (the built-in
tools of ``agent/builtin_tools.py``, taking audio as a path inside an allowed directory, a data
URL, or base64). There is no ``speak`` tool: omnivox models answer in text only (no speech head
yet); once an :class:`Assistant` can speak, ``speak`` belongs here, returning its audio as the
artifact of a ``response_format="content_and_artifact"`` tool.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import Field, PrivateAttr, SecretStr, model_validator

from omnivox.agent.audio import base64_bytes, data_url_bytes
from omnivox.agent.streaming import StopText
from omnivox.errors import UserInputError

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForLLMRun

    from omnivox.agent.assistant import Assistant
    from omnivox.agent.constrained import AnswerFormat
    from omnivox.agent.generation import Generation, GenerationSettings
    from omnivox.prompts import Message

log = logging.getLogger(__name__)

NANO = "omnivox-nano"  # the bundled model (assets/nano, or $OMNIVOX_MODEL)
SERVER_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")  # what omnivox serve takes as input_audio.format
# MIME subtype -> the format name omnivox serve and OpenAI use
AUDIO_SUBTYPES = {
    "wav": "wav", "x-wav": "wav", "wave": "wav", "vnd.wave": "wav",
    "mpeg": "mp3", "mp3": "mp3", "x-mp3": "mp3", "flac": "flac", "x-flac": "flac", "ogg": "ogg",
}  # fmt: skip
# LangChain's and OpenAI's tool_choice values -> omnivox's (agent/constrained.py)
TOOL_CHOICES = {"auto": "auto", "none": "none", "any": "required", "required": "required"}
# ChatMessage roles -> omnivox's (OpenAI's "developer" is its newer name for "system")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "ai": "assistant", "system": "system",
         "developer": "system", "tool": "tool"}  # fmt: skip
# blocks an AI message may hold beside its text that the model need not read again
AI_RECORD_BLOCKS = ("tool_use", "tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call",
                    "server_tool_result", "reasoning", "thinking")  # fmt: skip
CALL_OPTIONS = ("tools", "tool_choice", "response_format", "parallel_tool_calls", "temperature", "max_tokens",
                "top_p", "seed", "model")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models in this process: one Assistant per folder and load options, one lock per Assistant

_LOADING = threading.Lock()
_ASSISTANTS: dict[tuple[str, str], Assistant] = {}
_LOCKS_GUARD = threading.Lock()
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def model_folder(model: str | Path) -> Path:
    """The folder ``model`` names: a path, or ``"omnivox-nano"`` for the bundled model."""
    if str(model) == NANO:
        from omnivox.agent.cli import default_model_dir

        return default_model_dir()
    return Path(model).expanduser()


def load_assistant(model: str | Path, **options: Any) -> Assistant:
    """The :class:`Assistant` of ``model`` (see :func:`model_folder`), loaded once per folder and options.

    Args:
        model: a model folder or ``"omnivox-nano"``.
        options: as :meth:`Assistant.from_pretrained` (device, dtype, quantization, transcriber, ...).
    """
    from omnivox.agent.assistant import Assistant

    folder = model_folder(model)
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{str(model)!r} is not an omnivox model folder (no config.json in {folder})")
    key = (str(folder.resolve()), repr(sorted(options.items())))
    with _LOADING:
        if key not in _ASSISTANTS:
            log.info("loading omnivox model from %s", folder)
            _ASSISTANTS[key] = Assistant.from_pretrained(folder, **options)
        return _ASSISTANTS[key]


def assistant_lock(assistant: Any) -> threading.Lock:
    """The lock every model call on ``assistant`` holds here (the model is not thread-safe)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(assistant)
        if lock is None:
            lock = _LOCKS[assistant] = threading.Lock()
        return lock


# --------------------------------------------------------------------------------------------
# Reading LangChain messages


@dataclass(frozen=True)
class AudioPart:
    """One audio clip of a message: the file's bytes, its format when known, and where it was."""

    data: bytes
    format: str | None
    where: str


@dataclass
class Turn:
    """One turn of a conversation, before it is written for the model or for a server.

    ``calls`` (assistant turns) are (id, name, arguments); ``call_id`` and ``name`` (tool turns)
    say which call the result answers.
    """

    role: str
    texts: list[str] = field(default_factory=list)
    audio: list[AudioPart] = field(default_factory=list)
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    call_id: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(t for t in self.texts if t.strip())


def _format_of(mime: str | None) -> str | None:
    if not mime:
        return None
    return AUDIO_SUBTYPES.get(mime.lower().split("/")[-1], mime.lower().split("/")[-1])


def data_url_audio(url: str, where: str) -> AudioPart:
    """The audio in a ``data:<type>;base64,<data>`` URL (nothing else: no download, no file)."""
    data, mime = data_url_bytes(url, where)
    return AudioPart(data, _format_of(mime), where)


def read_audio_block(block: Mapping[str, Any], where: str) -> AudioPart:
    """The clip of one audio content block (any shape the module docstring lists)."""
    kind = block.get("type")
    if kind == "input_audio":
        inner = block.get("input_audio")
        if not isinstance(inner, Mapping):
            raise UserInputError(f"{where}: an input_audio block needs input_audio: {{data, format}}")
        return AudioPart(base64_bytes(inner.get("data"), where), _format_of(inner.get("format")), where)
    if kind == "audio_url":
        inner = block.get("audio_url")
        url = inner.get("url") if isinstance(inner, Mapping) else inner
        return data_url_audio(url, where)
    mime = block.get("mime_type")
    if block.get("base64") is not None:
        return AudioPart(base64_bytes(block["base64"], where), _format_of(mime), where)
    if block.get("source_type") == "base64":  # LangChain v0 blocks
        return AudioPart(base64_bytes(block.get("data"), where), _format_of(mime), where)
    if block.get("url") is not None:  # v1 and v0 URL blocks
        return data_url_audio(block["url"], where)
    raise UserInputError(f"{where}: an audio block needs base64 data or a data URL (file ids are not read)")


def _read_content(content: Any, where: str, role: str) -> tuple[list[str], list[AudioPart]]:
    """Texts and clips of a ``role`` message's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return [content], []
    texts: list[str] = []
    clips: list[AudioPart] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind in ("audio", "input_audio", "audio_url"):
            if role != "user":
                raise UserInputError(f"{at}: only human messages carry audio")
            clips.append(read_audio_block(block, at))
        elif kind in AI_RECORD_BLOCKS and role == "assistant":
            continue  # an AI message's record of its calls or reasoning: tool_calls is what is read
        else:
            raise UserInputError(f"{at}: omnivox reads text and audio, not {kind!r} content blocks")
    return texts, clips


def _role(message: BaseMessage) -> str | None:
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, SystemMessage):
        return "system"
    return ROLES.get(message.role) if isinstance(message, ChatMessage) else None


def read_messages(messages: Sequence[BaseMessage]) -> list[Turn]:
    """The conversation as turns the prompt format can hold (see the module docstring)."""
    if not messages:
        raise UserInputError("the conversation is empty")
    system = Turn("system")
    turns: list[Turn] = []
    call_names: dict[str, str] = {}  # tool call id -> tool name, from the AI messages so far
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = _role(message)
        if role is None:
            raise UserInputError(f"{where}: omnivox reads human, AI, system and tool messages, not {message.type!r}")
        texts, clips = _read_content(message.content, where, role)
        if role == "system":
            system.texts += texts
            continue
        turn = Turn(role, texts, clips)
        if role == "assistant" and isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                call_id = call.get("id") or f"call_{len(call_names)}"
                call_names[call_id] = call["name"]
                turn.calls.append((call_id, call["name"], dict(call.get("args") or {})))
        if role == "tool":
            call_id = getattr(message, "tool_call_id", None)
            name = call_names.get(call_id) or getattr(message, "name", None)
            if not name:
                raise UserInputError(f"{where}: tool_call_id {call_id!r} names no tool call of an earlier AI message "
                                     f"(the calls so far: {sorted(call_names)})")  # fmt: skip
            turn.call_id, turn.name = call_id, name
            if getattr(message, "status", "success") == "error" and not turn.text.lower().startswith("error"):
                turn.texts = [f"error: {turn.text}"]
        last = turns[-1] if turns else None
        if last is not None and last.role == role and role in ("user", "assistant"):
            last.texts += turn.texts
            last.audio += turn.audio
            last.calls += turn.calls
        else:
            turns.append(turn)
    if not turns or turns[-1].role not in ("user", "tool"):
        raise UserInputError("the last message must be a human or tool message (the model answers it)")
    return ([system] if system.text else []) + turns


def omnivox_conversation(turns: Sequence[Turn]) -> tuple[list[Message], list[AudioPart]]:
    """The turns as omnivox messages, and their clips in order."""
    from omnivox.prompts import Message, calls_text, result_text

    messages: list[Message] = []
    clips: list[AudioPart] = []
    for turn in turns:
        if turn.role == "assistant" and turn.calls:
            messages.append(Message("assistant", calls_text([(name, args) for _, name, args in turn.calls])))
        elif turn.role == "tool":
            messages.append(Message("tool", result_text(turn.name or "", turn.text)))
        else:
            messages.append(Message(turn.role, turn.text, num_audio=len(turn.audio)))  # type: ignore[arg-type]
            clips += turn.audio
    return messages, clips


def _server_audio(part: AudioPart) -> dict[str, Any]:
    """An ``input_audio`` part; formats the server does not take are sent as 16 kHz WAV."""
    data, fmt = part.data, part.format
    if fmt not in SERVER_AUDIO_FORMATS:
        from omnivox.agent.audio import load_audio
        from omnivox.agent.workspace import audio_bytes

        data, fmt = audio_bytes(load_audio(data, name=part.where).samples, 16000, "wav"), "wav"
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt}}


def openai_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """The turns as OpenAI Chat Completions messages (what ``omnivox serve`` reads)."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role == "assistant" and turn.calls:
            calls = [{"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                     for cid, name, args in turn.calls]  # fmt: skip
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
        elif turn.role == "tool":
            out.append({"role": "tool", "tool_call_id": turn.call_id, "content": turn.text})
        elif turn.audio:
            parts = [_server_audio(p) for p in turn.audio] + ([{"type": "text", "text": turn.text}] if turn.text else [])
            out.append({"role": turn.role, "content": parts})
        else:
            out.append({"role": turn.role, "content": turn.text})
    return out


# --------------------------------------------------------------------------------------------
# Tools and answer formats


def _closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """An object schema that takes no arguments beyond its properties (unless it says otherwise)."""
    if parameters.get("type", "object") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def openai_tool(tool: Any, strict: bool | None = None) -> dict[str, Any]:
    """An OpenAI tool dict of a LangChain tool, pydantic model, function, TypedDict or tool dict.

    Tools made from Python get a closed schema unless ``strict`` is False (module docstring).
    """
    definition = convert_to_openai_tool(tool, strict=strict)
    if strict is None and not isinstance(tool, Mapping):
        function = definition["function"]
        definition = {**definition, "function": {**function, "parameters": _closed(function.get("parameters", {}))}}
    from omnivox.agent.tools import Tool

    Tool.from_openai(definition)  # a bad name or schema fails here, not at the first call
    return definition


def _tool_choice(choice: Any, names: Sequence[str]) -> str:
    """omnivox's tool_choice ("auto", "none", "required" or a tool's name) for LangChain's or OpenAI's."""
    if choice is None:
        return "auto"
    if choice is True:
        return "required"
    if isinstance(choice, Mapping):
        inner = choice.get("function")
        name = inner.get("name") if isinstance(inner, Mapping) else choice.get("name")
        choice = name if isinstance(name, str) else choice.get("type")
    if isinstance(choice, str):
        if choice in names:
            return choice
        if choice in TOOL_CHOICES:
            return TOOL_CHOICES[choice]
    raise UserInputError(f"tool_choice must be one of {sorted(TOOL_CHOICES)} or a bound tool's name {list(names)}, "
                         f"got {choice!r}")  # fmt: skip


def _schema_of(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI ``response_format`` (None: plain text)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), Mapping):
        return dict(response_format["json_schema"].get("schema") or {"type": "object"})
    raise UserInputError('response_format must be {"type": "text"}, {"type": "json_object"} or '
                         f'{{"type": "json_schema", "json_schema": {{"name", "schema"}}}}, got {response_format!r}'[:300])  # fmt: skip


@dataclass
class Options:
    """One call's options: the model's fields with the call's overrides applied."""

    model: str
    temperature: float | None
    max_tokens: int | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    tools: list[dict[str, Any]]
    tool_choice: str
    response_format: dict[str, Any] | None
    parallel_tool_calls: bool | None


def _usage(prompt_tokens: int, answer_tokens: int, audio_tokens: int) -> UsageMetadata:
    usage = UsageMetadata(input_tokens=prompt_tokens, output_tokens=answer_tokens,
                          total_tokens=prompt_tokens + answer_tokens)  # fmt: skip
    if audio_tokens:
        usage["input_token_details"] = {"audio": audio_tokens}
    return usage


def _check_complete(result: list[Any]) -> None:
    """Raise unless the answer is whole JSON (LangChain's parsers would close a cut-off answer's brackets)."""
    text = result[0].text if result else ""
    try:
        json.loads(text)
    except ValueError:
        message = getattr(result[0], "message", None) if result else None
        finish = getattr(message, "response_metadata", {}).get("finish_reason")
        hint = " (the answer reached max_tokens)" if finish == "length" else ""
        raise OutputParserException(f"the answer is not complete JSON{hint}: {text[:200]!r}", llm_output=text) from None


class CompleteJsonParser(JsonOutputParser):
    """JSON answers as dicts; a whole answer must be complete JSON (streamed parts may be partial)."""

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        if not partial:
            _check_complete(result)
        return super().parse_result(result, partial=partial)


class CompletePydanticParser(PydanticOutputParser):
    """JSON answers as pydantic objects; a whole answer must be complete JSON."""

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        if not partial:
            _check_complete(result)
        return super().parse_result(result, partial=partial)


class _Cancelled(Exception):
    """Raised in the generating thread when the stream's reader went away."""


@dataclass
class _Answer:
    """A finished answer in either backend's terms."""

    text: str
    calls: list[tuple[str, str, Any]]  # (id, name, arguments: a dict, or the raw string when it did not parse)
    finish_reason: str
    usage: UsageMetadata | None
    model_name: str
    source: str | None = None


# --------------------------------------------------------------------------------------------
# The chat model


class ChatOmnivox(BaseChatModel):
    """An omnivox model as a LangChain chat model (see the module docstring).

    Example::

        chat = ChatOmnivox(model="omnivox-nano", temperature=0, max_tokens=64)
        wav = base64.b64encode(Path("clip.wav").read_bytes()).decode()
        chat.invoke([HumanMessage([{"type": "text", "text": "What do you hear?"},
                                   {"type": "audio", "base64": wav, "mime_type": "audio/wav"}])])
    """

    model: str = NANO
    """In process: a model folder, or "omnivox-nano" (the bundled model). With ``assistant`` or
    ``base_url`` it is the name reported (and sent to the server)."""
    assistant: Any = Field(default=None, exclude=True, repr=False)
    """An :class:`Assistant` to answer with, instead of loading ``model``."""
    base_url: str | None = None
    """An ``omnivox serve`` server's OpenAI API root (``http://host:8000/v1``): answer from there."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("OMNIVOX_API_KEY", default=None))
    """The server's key (default: $OMNIVOX_API_KEY); unused in process."""
    temperature: float | None = None
    """In process, None: the model folder's default decoding; 0: greedy; > 0: sampling at that
    temperature. A server decides for itself (``omnivox serve`` keeps its default for 0 too)."""
    max_tokens: int | None = None
    """Most answer tokens (None: the folder's default)."""
    top_p: float | None = None
    stop: list[str] | None = None
    """Strings that end the answer (cut after decoding)."""
    seed: int | None = None
    """Seeds torch's generator before each answer (sampling), or the server's."""
    timeout: float | None = None
    """Seconds to wait for the server."""
    max_retries: int = 2
    """Retries of a failed server request."""
    streaming: bool = False
    """Answer ``invoke`` by streaming (LangChain's switch)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More decoding settings: in process, :class:`GenerationSettings` fields (num_beams,
    repetition_penalty, ...); for a server, extra request fields."""
    load_options: dict[str, Any] = Field(default_factory=dict)
    """In process: :meth:`Assistant.from_pretrained` options (device, dtype, quantization, transcriber)."""

    _client: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _name_given_assistant(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("assistant") is not None and values.get("model") is None:
            values = {**values, "model": "omnivox"}
        return values

    @model_validator(mode="after")
    def _one_backend(self) -> ChatOmnivox:
        if self.assistant is not None and self.base_url is not None:
            raise ValueError("give assistant (answer in this process) or base_url (answer from a server), not both")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        return self

    # ------------------------------------------------------------------ LangChain's descriptors
    @property
    def _llm_type(self) -> str:
        return "omnivox"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            **({"model_kwargs": self.model_kwargs} if self.model_kwargs else {}),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="omnivox",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------------ tools and structured output
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """The model offering ``tools`` (see the module docstring for ``tool_choice`` and ``strict``).

        ``parallel_tool_calls=False``: at most one call per answer (in process, the first).
        """
        definitions = [openai_tool(t, strict) for t in tools]
        names = [d["function"]["name"] for d in definitions]  # duplicates are refused when called
        if tool_choice is not None:
            kwargs["tool_choice"] = _tool_choice(tool_choice, names)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=definitions, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """Answers parsed into ``schema`` (a pydantic class gives instances, anything else dicts).

        Args:
            schema: a pydantic class, TypedDict, JSON schema or OpenAI tool dict (json_mode: optional).
            method: "json_schema": the answer is JSON held to the schema by constrained decoding;
                "function_calling": one forced call of a tool made of the schema; "json_mode": any
                JSON object (the schema only parses it).
            include_raw: give ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
            strict: as :meth:`bind_tools` (the answer always fits the schema it is held to).
        """
        if kwargs:
            raise UserInputError(f"with_structured_output got unknown arguments {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise UserInputError(f'method must be "json_schema", "function_calling" or "json_mode", got {method!r}')
        if schema is None and method != "json_mode":
            raise UserInputError(f"method {method!r} needs a schema")
        pydantic_class = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable
        if method == "function_calling":
            definition = openai_tool(schema, strict)
            name = definition["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, ls_structured_output_format=traced)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic_class
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))  # fmt: skip
        else:
            if method == "json_mode":
                response_format: dict[str, Any] = {"type": "json_object"}
            else:
                definition = openai_tool(schema, strict)
                json_schema = {**convert_to_json_schema(schema, strict=strict), **definition["function"]["parameters"]}
                response_format = {"type": "json_schema",
                                   "json_schema": {"name": definition["function"]["name"], "schema": json_schema, "strict": True}}  # fmt: skip
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced if schema is not None else None)
            parser = CompletePydanticParser(pydantic_object=schema) if pydantic_class else CompleteJsonParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    # ------------------------------------------------------------------ calls
    def _options(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> Options:
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise UserInputError(f"ChatOmnivox got unknown call options {unknown}; it takes {list(CALL_OPTIONS)}")
        tools = list(kwargs.get("tools") or [])
        tools = [t if isinstance(t, Mapping) and t.get("type") == "function" else openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in tools]
        choice = _tool_choice(kwargs.get("tool_choice"), names)
        return Options(
            model=kwargs.get("model") or self.model,
            temperature=kwargs.get("temperature", self.temperature),
            max_tokens=kwargs.get("max_tokens", self.max_tokens),
            top_p=kwargs.get("top_p", self.top_p),
            seed=kwargs.get("seed", self.seed),
            stop=list(stop if stop is not None else self.stop or []),
            tools=tools,
            tool_choice=choice,
            response_format=kwargs.get("response_format"),
            parallel_tool_calls=kwargs.get("parallel_tool_calls"),
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options = self._options(stop, kwargs)
        turns = read_messages(messages)
        answer = self._remote(turns, options) if self.base_url else self._local(turns, options)
        message = AIMessage(
            content=answer.text,
            tool_calls=[tool_call(name=n, args=a, id=i) for i, n, a in answer.calls if isinstance(a, dict)],
            invalid_tool_calls=[invalid_tool_call(name=n, args=a, id=i, error="the arguments are not a JSON object")
                                for i, n, a in answer.calls if not isinstance(a, dict)],  # fmt: skip
            usage_metadata=answer.usage,
            response_metadata=self._metadata(answer),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = self._options(stop, kwargs)
        turns = read_messages(messages)
        pieces = self._remote_stream(turns, options) if self.base_url else self._local_stream(turns, options)
        answer: _Answer | None = None
        with contextlib.closing(pieces):  # a reader that stops early closes the stream (and the generation) now
            for item in pieces:
                if isinstance(item, str):
                    yield ChatGenerationChunk(message=AIMessageChunk(content=item))
                else:
                    answer = item
        assert answer is not None  # both streams end with the answer
        chunks = [tool_call_chunk(name=n, args=a if isinstance(a, str) else json.dumps(a), id=i, index=k)
                  for k, (i, n, a) in enumerate(answer.calls)]  # fmt: skip
        last = AIMessageChunk(content="", tool_call_chunks=chunks, usage_metadata=answer.usage,
                              response_metadata=self._metadata(answer), chunk_position="last")  # fmt: skip
        yield ChatGenerationChunk(message=last)

    @staticmethod
    def _metadata(answer: _Answer) -> dict[str, Any]:
        out: dict[str, Any] = {"model_name": answer.model_name, "finish_reason": answer.finish_reason}
        if answer.source is not None:
            out["source"] = answer.source
        return out

    # ------------------------------------------------------------------ in process
    def _assistant(self, model: str) -> Assistant:
        if self.assistant is not None:
            if model != self.model:
                raise UserInputError(f"this ChatOmnivox answers with the assistant it was given; cannot switch to {model!r}")
            return self.assistant
        return load_assistant(model, **self.load_options)

    def _settings(self, assistant: Assistant, options: Options) -> GenerationSettings:
        overrides = dict(self.model_kwargs)
        if options.max_tokens is not None:
            overrides["max_new_tokens"] = options.max_tokens
        if options.temperature is not None:
            overrides.update(num_beams=1, do_sample=options.temperature > 0)
            if options.temperature > 0:
                overrides["temperature"] = options.temperature
        if options.top_p is not None:
            overrides["top_p"] = options.top_p
        return assistant.settings(**overrides)

    def _answer_format(self, options: Options) -> AnswerFormat | None:
        from omnivox.agent.constrained import AnswerFormat
        from omnivox.agent.tools import Tool

        specs = tuple(Tool.from_openai(t).spec() for t in options.tools)
        schema = _schema_of(options.response_format)
        if not specs and schema is None:
            if options.tool_choice not in ("auto", "none"):
                raise UserInputError(f"tool_choice {options.tool_choice!r} needs tools (bind_tools)")
            return None
        return AnswerFormat(specs, options.tool_choice, schema)

    def _local_generation(
        self, turns: Sequence[Turn], options: Options, on_text: Callable[[str], None] | None
    ) -> _Answer:
        """One answer in this process; text streams to ``on_text`` (uncut) when given."""
        import torch

        from omnivox.agent.assistant import offer_tools
        from omnivox.agent.audio import load_audio

        assistant = self._assistant(options.model)
        messages, parts = omnivox_conversation(turns)
        answer_format = self._answer_format(options)
        settings = self._settings(assistant, options)
        samples = [load_audio(p.data, name=p.where).samples for p in parts]  # checked before waiting for the model
        with assistant_lock(assistant):
            clips = [assistant.encode_clip(s) for s in samples]
            prompt = offer_tools(messages, answer_format.tools) if answer_format and answer_format.offers_tools else messages
            audio_tokens = [c.num_tokens for c in clips]
            prompt_tokens = int(assistant.model.processor.tokenize(prompt, audio_tokens).input_ids.shape[0])
            if options.seed is not None:
                torch.manual_seed(options.seed)
            streams = on_text is not None and (settings.num_beams == 1 or bool(answer_format and answer_format.constrained))
            out: Generation = assistant.generate([messages], [clips], settings, on_text if streams else None,
                                                 formats=[answer_format])[0]  # fmt: skip
        if on_text is not None and not streams and not out.tool_calls:
            on_text(out.text)  # beam search: the answer arrives whole
        calls = [(c.id, c.name, c.arguments) for c in out.tool_calls]
        if options.parallel_tool_calls is False:
            calls = calls[:1]
        return _Answer(out.text, calls, out.finish_reason, _usage(prompt_tokens, len(out.token_ids), sum(audio_tokens)),
                       options.model, out.source)  # fmt: skip

    def _local(self, turns: Sequence[Turn], options: Options) -> _Answer:
        answer = self._local_generation(turns, options, None)
        cut = StopText(options.stop)
        text = cut.feed(answer.text) + cut.flush()
        if cut.stopped:
            answer.text, answer.finish_reason = text, "stop"
        return answer

    def _local_stream(self, turns: Sequence[Turn], options: Options) -> Iterator[str | _Answer]:
        """Text pieces as the model decodes them (in a worker thread), then the answer."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        reader_gone = threading.Event()

        def on_text(piece: str) -> None:
            if reader_gone.is_set():
                raise _Cancelled
            events.put(("text", piece))

        def job() -> None:
            try:
                events.put(("done", self._local_generation(turns, options, on_text)))
            except _Cancelled:
                pass  # the reader went away: there is no one to tell
            except BaseException as err:  # re-raised in the reader
                events.put(("error", err))

        threading.Thread(target=job, name="omnivox-langchain-stream", daemon=True).start()
        cut = StopText(options.stop)
        try:
            while True:
                kind, value = events.get()
                if kind == "text":
                    piece = cut.feed(value)
                    if piece:
                        yield piece
                    continue
                if kind == "error":
                    raise value
                break
            rest = cut.flush()
            if rest:
                yield rest
            if cut.stopped:
                value.finish_reason = "stop"
            yield value
        finally:
            reader_gone.set()  # a reader that stops early stops the generation at its next piece

    # ------------------------------------------------------------------ a server
    def _openai(self) -> Any:
        if self._client is None:
            import openai

            key = self.api_key.get_secret_value() if self.api_key is not None else "omnivox"
            self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout,
                                         max_retries=self.max_retries)  # fmt: skip
        return self._client

    def _request(self, turns: Sequence[Turn], options: Options) -> dict[str, Any]:
        body: dict[str, Any] = {"model": options.model, "messages": openai_messages(turns)}
        for key in ("temperature", "max_tokens", "top_p", "seed", "response_format", "parallel_tool_calls"):
            if getattr(options, key) is not None:
                body[key] = getattr(options, key)
        if options.stop:
            body["stop"] = options.stop
        if options.tools:
            body["tools"] = options.tools
            names = [t["function"]["name"] for t in options.tools]
            choice = options.tool_choice
            body["tool_choice"] = {"type": "function", "function": {"name": choice}} if choice in names else choice
        if self.model_kwargs:
            body["extra_body"] = dict(self.model_kwargs)
        return body

    @staticmethod
    def _arguments(text: str | None) -> Any:
        try:
            parsed = json.loads(text or "{}")
        except ValueError:
            return text or ""
        return parsed if isinstance(parsed, dict) else text

    @staticmethod
    def _server_usage(usage: Any) -> UsageMetadata | None:
        if usage is None:
            return None
        details = getattr(usage, "prompt_tokens_details", None)
        audio = getattr(details, "audio_tokens", None) if details is not None else None
        return _usage(usage.prompt_tokens, usage.completion_tokens, audio or 0)

    def _remote(self, turns: Sequence[Turn], options: Options) -> _Answer:
        response = self._openai().chat.completions.create(**self._request(turns, options))
        choice = response.choices[0]
        calls = [(c.id, c.function.name, self._arguments(c.function.arguments)) for c in choice.message.tool_calls or []]
        return _Answer(choice.message.content or "", calls, choice.finish_reason, self._server_usage(response.usage),
                       response.model)  # fmt: skip

    def _remote_stream(self, turns: Sequence[Turn], options: Options) -> Iterator[str | _Answer]:
        body = self._request(turns, options)
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments so far]
        finish, usage, model = "stop", None, options.model
        with self._openai().chat.completions.create(**body, stream=True, stream_options={"include_usage": True}) as stream:
            for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = self._server_usage(chunk.usage)
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
                    for delta in choice.delta.tool_calls or []:
                        call = calls.setdefault(delta.index, ["", "", ""])
                        call[0] = delta.id or call[0]
                        if delta.function is not None:
                            call[1] += delta.function.name or ""
                            call[2] += delta.function.arguments or ""
                    if choice.finish_reason:
                        finish = choice.finish_reason
        ordered = [calls[k] for k in sorted(calls)]
        yield _Answer("", [(i, n, self._arguments(a)) for i, n, a in ordered], finish, usage, model)


# --------------------------------------------------------------------------------------------
# omnivox as LangChain tools


def omnivox_tools(
    assistant: Assistant | str | Path,
    *,
    allowed_dir: str | Path | None = None,
    raise_on_error: bool = False,
) -> list[BaseTool]:
    """omnivox's ``transcribe`` and ``ask`` as LangChain tools.

    Each takes its clip as ``audio`` (a path inside ``allowed_dir``, relative to it or absolute
    inside it, or a ``data:`` URL) or ``audio_base64`` (a file's bytes). Paths outside the allowed
    directory, ``..`` and symlinks leading out are refused (:meth:`Workspace.resolve`); without
    ``allowed_dir`` no path is read. The built-in tools do the work (``agent/builtin_tools.py``,
    the folder's default decoding). No ``speak``: omnivox models answer in text only.

    Args:
        assistant: an :class:`Assistant`, or a model folder / "omnivox-nano" (:func:`load_assistant`).
        allowed_dir: the only directory whose files the tools read.
        raise_on_error: raise on a bad call (unreadable audio, a refused path) instead of answering
            the error as the tool's text (LangChain's ``handle_tool_error``).
    """
    from omnivox.agent.builtin_tools import builtin_tools
    from omnivox.agent.tools import ToolError
    from omnivox.agent.workspace import Workspace

    if isinstance(assistant, str | Path):
        assistant = load_assistant(assistant)
    root = Path(allowed_dir).expanduser() if allowed_dir is not None else None
    if root is not None and not root.is_dir():
        raise UserInputError(f"allowed_dir {str(root)!r} is not a directory")

    def run(name: str, audio: str | None, audio_base64: str | None, **arguments: Any) -> str:
        try:
            workspace = Workspace(root, write_artifacts=False)
            clip = _hold(workspace, audio, audio_base64, paths=root is not None)
            with assistant_lock(assistant):
                return builtin_tools(assistant, workspace).get(name).run({"clip": clip, **arguments}).text
        except (UserInputError, ToolError) as err:  # the caller's mistake, or the tool's
            raise ToolException(f"{name}: {err}") from None

    def transcribe(audio: str | None = None, audio_base64: str | None = None, timestamps: bool = False) -> str:
        """Transcribe the speech in an audio clip.

        Args:
            audio: the clip: a path inside the allowed directory, or a data URL (data:audio/wav;base64,...).
            audio_base64: the clip's file bytes in base64, instead of audio.
            timestamps: give each stretch of speech with its start and end in seconds.
        """
        return run("transcribe", audio, audio_base64, timestamps=timestamps)

    def ask(question: str, audio: str | None = None, audio_base64: str | None = None) -> str:
        """Ask a question about what can be heard in an audio clip.

        Args:
            question: the question, in words.
            audio: the clip: a path inside the allowed directory, or a data URL (data:audio/wav;base64,...).
            audio_base64: the clip's file bytes in base64, instead of audio.
        """
        return run("ask", audio, audio_base64, question=question)

    return [
        StructuredTool.from_function(fn, parse_docstring=True, handle_tool_error=not raise_on_error)
        for fn in (transcribe, ask)
    ]


def _hold(workspace: Any, audio: str | None, audio_base64: str | None, paths: bool) -> str:
    """The workspace id of the clip given as exactly one of ``audio`` and ``audio_base64``."""
    from omnivox.agent.audio import load_audio

    if (audio is None) == (audio_base64 is None):
        raise UserInputError(f"give the clip as one of audio and audio_base64 ({'both' if audio else 'neither'} given)")
    if audio_base64 is not None:
        part = AudioPart(base64_bytes(audio_base64, "audio_base64"), None, "audio_base64")
    elif audio.strip().startswith("data:"):
        part = data_url_audio(audio, "audio")
    elif not paths:
        raise UserInputError("audio: no path is read (no allowed directory was given); send audio_base64 or a data URL")
    else:
        return workspace.add_file(audio)
    return workspace.add_clip(load_audio(part.data, name=part.where).samples, 16000, note=part.where)
