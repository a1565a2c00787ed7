"""omnivox's audio tools over the Model Context Protocol (``omnivox mcp``; ``mcp`` 2.x ``MCPServer``).

Tools offered (names, descriptions and JSON schemas come from omnivox :class:`~omnivox.agent.tools.Tool`
objects; arguments are checked by ``Tool.validate`` before anything runs):

- ``transcribe(audio, audio_base64, timestamps=False)`` and ``ask(question, audio, audio_base64)``:
  the built-in ``transcribe``/``ask`` (``agent/builtin_tools.py``) with audio from the client;
- the other built-in tools (``detect_speech``, ``measure``, ``trim``, ``mix``, ``convert``) with
  their own schemas, except that a clip argument (``clip``, ``other``) takes any audio
  reference below, not only a workspace id;
- ``speak(text, voice, speed)``, offered only when the model folder can speak (it has a
  ``talker/``): the text said in one of the model's voices (listed in the tool's schema).

Audio in, as one of (checked where it enters):

- ``audio_base64``: the bytes of an audio file, base64 (transcribe and ask);
- a ``data:`` URL (``data:audio/wav;base64,...``);
- a path inside the allowed directory (``--allowed-dir``): relative to it, or absolute inside it;
  ``..``, absolute paths elsewhere and symlinks that lead out are refused
  (:meth:`Workspace.resolve`); without an allowed directory, paths are refused;
- the id of audio the server holds: ``audio-1`` (made by trim, mix, convert), ``clip-1``.

Audio out: a tool that makes audio (trim, mix, convert, speak) answers with its text line
(``audio-1: 0.50 s, 16000 Hz``) and the audio as MCP audio content (``Audio(data=..., format="wav")``);
the audio is held as that id (so ``speak``'s answer can go on to ``mix``) and written to the
allowed directory as ``audio-1.wav``.

Errors the client caused (bad arguments, unreadable audio, a path outside the allowed
directory, a tool that cannot do what was asked) come back as tool errors (``isError``) whose
text says what was wrong; a bug is logged here and answered with a short ``isError`` line.

The model is not thread-safe: every tool runs in a worker thread, one call at a time (a
capacity limiter of one), so the event loop keeps answering (listing, pings) while a tool runs.
The workspace (its clips and the audio tools made) is shared by every client of one server.
``omnivox mcp`` loads the model at start, before it serves (over stdio, with anything printed
meanwhile sent to stderr: stdout is the protocol); Streamable HTTP takes request bodies up to
``MAX_REQUEST_BYTES`` (the SDK's default, 4 MiB, holds about two minutes of WAV in base64).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import pydantic
from mcp.server.mcpserver import Audio, MCPServer
from mcp.server.mcpserver.tools.base import Tool as MCPServerTool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp_types import CallToolResult, TextContent

from omnivox.agent.audio import base64_bytes, data_url_bytes, load_audio
from omnivox.agent.builtin_tools import ClipId, Question, builtin_tools, short_text, speak_into
from omnivox.agent.tools import Tool, ToolArgumentError, ToolError, ToolRegistry, ToolResult, tool
from omnivox.agent.workspace import ID, Workspace, audio_bytes
from omnivox.decoders.speech import MAX_TEXT_CHARS
from omnivox.errors import UserInputError

if TYPE_CHECKING:
    from omnivox.agent.assistant import Assistant

log = logging.getLogger(__name__)

# The schema pattern of a workspace id argument (builtin_tools.ClipId): such arguments are widened
CLIP_PATTERN = pydantic.TypeAdapter(ClipId).json_schema()["pattern"]
AUDIO_REFERENCE = (
    "a path inside the server's allowed directory (when it has one), a data URL "
    "(data:audio/wav;base64,...), or the id of audio the server holds (clip-1, audio-2)"
)
# Longest base64 text taken (stdio has no body limit of its own); load_audio also caps the duration
MAX_BASE64_CHARS = 96 * 1024 * 1024
# Streamable HTTP's own default is 4 MiB (~2 minutes of 16 kHz 16-bit WAV in base64)
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Audio content MIME types by workspace format (the MCP helper would say "audio/mp3")
MIME_FORMAT = {"wav": "wav", "flac": "flac", "ogg": "ogg", "mp3": "mpeg"}

Transport = Literal["stdio", "http"]
AudioReference = Annotated[str, pydantic.Field(min_length=1)]
SpokenText = Annotated[str, pydantic.Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Speed = Annotated[float, pydantic.Field(ge=0.25, le=4.0)]
# speak's docstring: its voice argument names the voices of the model at hand
SPEAK_DOC = """Say a text aloud in one of the model's voices; makes a new audio id and returns the audio.

    Args:
        text: what to say (at most {max_chars} characters).
        voice: the voice, one of {voices}; the part after "engine:" also works.
        speed: how fast, 0.25 to 4; 1 is the voice's own pace.
    """


class AudioInputs:
    """Puts the audio a client sends into the workspace and names it by its id.

    Args:
        workspace: where the audio is held; its root is the allowed directory.
        paths: whether paths are read at all (False: the server has no allowed directory).
    """

    def __init__(self, workspace: Workspace, paths: bool) -> None:
        self.workspace = workspace
        self.paths = paths

    def hold(self, reference: str, field: str = "audio") -> str:
        """The workspace id of ``reference`` (an id, a data URL or a path); UserInputError otherwise."""
        text = reference.strip()
        if ID.match(text):
            return self.workspace.get(text).id  # raises, listing the ids held, when it is not held
        if text.startswith("data:"):
            return self.hold_bytes(data_url_bytes(text, field, MAX_BASE64_CHARS)[0], f"{field} (data URL)")
        if not self.paths:
            raise UserInputError(
                f"{field}: {short_text(reference)!r} is not an audio id or a data URL, and this server reads no paths "
                "(start it with --allowed-dir DIR to read files there)"
            )
        try:
            return self.workspace.add_file(text)
        except UserInputError as err:
            raise UserInputError(f"{field}: {err}") from None

    def hold_base64(self, data: str, field: str = "audio_base64") -> str:
        return self.hold_bytes(base64_bytes(data, field, MAX_BASE64_CHARS), field)

    def hold_bytes(self, data: bytes, name: str) -> str:
        return self.workspace.add_clip(load_audio(data, name=name).samples, 16000, note=name)

    def hold_one(self, audio: str | None, audio_base64: str | None, tool: str) -> str:
        """The id of the clip given as exactly one of ``audio`` and ``audio_base64`` (to ``tool``)."""
        if (audio is None) == (audio_base64 is None):
            given = "both" if audio is not None else "neither"
            raise ToolArgumentError(
                f"{tool}: give the audio as one of audio and audio_base64 ({given} given)"
            )
        return self.hold(audio) if audio is not None else self.hold_base64(audio_base64)


# --------------------------------------------------------------------------------------------
# The tools clients see


def audio_input_tools(registry: ToolRegistry, inputs: AudioInputs) -> list[Tool]:
    """``transcribe`` and ``ask`` taking audio from the client, for the registry's tools of those names."""
    made = []
    if "transcribe" in registry:

        @tool
        def transcribe(
            audio: AudioReference | None = None, audio_base64: str | None = None, timestamps: bool = False
        ) -> ToolResult:
            """Transcribe the speech in an audio clip.

            Args:
                audio: the clip: a path inside the server's allowed directory (when it has one), a data
                    URL (data:audio/wav;base64,...), or the id of audio the server holds (audio-1).
                audio_base64: the clip's file bytes in base64, instead of audio.
                timestamps: give each stretch of speech with its start and end in seconds.
            """
            clip = inputs.hold_one(audio, audio_base64, "transcribe")
            return registry.get("transcribe").run({"clip": clip, "timestamps": timestamps})

        made.append(transcribe)
    if "ask" in registry:

        @tool
        def ask(
            question: Question, audio: AudioReference | None = None, audio_base64: str | None = None
        ) -> ToolResult:
            """Ask a question about what can be heard in an audio clip.

            Args:
                question: the question, in words.
                audio: the clip: a path inside the server's allowed directory (when it has one), a data
                    URL (data:audio/wav;base64,...), or the id of audio the server holds (audio-1).
                audio_base64: the clip's file bytes in base64, instead of audio.
            """
            clip = inputs.hold_one(audio, audio_base64, "ask")
            return registry.get("ask").run({"clip": clip, "question": question})

        made.append(ask)
    return made


class ClipArgumentsTool:
    """A registry tool whose workspace-id arguments also take paths and data URLs.

    The schema is the tool's own with those arguments' ``pattern`` dropped and their
    description extended; :meth:`run` validates the call with the tool's own schema before
    reading any audio, then turns each reference into a workspace id and runs the tool.
    """

    def __init__(self, inner: Tool, inputs: AudioInputs) -> None:
        self.inner = inner
        self.inputs = inputs
        self.name = inner.name
        self.description = inner.description
        self.parameters = copy.deepcopy(inner.parameters)
        properties = self.parameters.get("properties", {})
        self.clip_arguments = [
            name for name, schema in properties.items() if schema.get("pattern") == CLIP_PATTERN
        ]
        for name in self.clip_arguments:
            schema = properties[name]
            del schema["pattern"]
            schema["minLength"] = 1
            schema["description"] = f"{schema.get('description', 'the clip.')} Given as {AUDIO_REFERENCE}."

    def run(self, arguments: Mapping[str, Any]) -> ToolResult:
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(f"{self.name}: arguments must be a JSON object")
        # A stand-in id for every reference: the other arguments (and the types) are checked first
        probe = {k: "clip-1" if k in self.clip_arguments and isinstance(v, str) and v.strip() else v
                 for k, v in arguments.items()}  # fmt: skip
        self.inner.validate(probe)
        held = {k: self.inputs.hold(v, k) if k in self.clip_arguments else v for k, v in arguments.items()}
        return self.inner.run(held)


def speech_tool(assistant: Assistant, workspace: Workspace) -> Tool:
    """``speak``: text said by the assistant's speech head, held (and written) as the next ``audio-N``.

    Loads the speech head now (its voices go into the schema); a folder without one raises
    UserInputError.
    """
    voices = assistant.speech.voices_shown()

    def speak(text: SpokenText, voice: str | None = None, speed: Speed = 1.0) -> ToolResult:
        made, full_voice = speak_into(assistant, workspace, text, voice, speed)
        return ToolResult(f"{made.describe()}, voice {full_voice}", (made.id,))

    speak.__doc__ = SPEAK_DOC.format(voices=voices, max_chars=MAX_TEXT_CHARS)
    return tool(speak)


def server_tools(registry: ToolRegistry, inputs: AudioInputs) -> list[Tool | ClipArgumentsTool]:
    """Every tool the server offers: transcribe and ask on client audio, then the rest of the registry."""
    offered: list[Tool | ClipArgumentsTool] = audio_input_tools(registry, inputs)
    taken = {t.name for t in offered}
    offered += [ClipArgumentsTool(t, inputs) for t in registry if t.name not in taken]
    return offered


# --------------------------------------------------------------------------------------------
# The bridge to MCPServer


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


def _content(workspace: Workspace, result: ToolResult) -> CallToolResult:
    """The result's text, then each audio it made as audio content."""
    content: list[Any] = [TextContent(type="text", text=result.text)]
    for artifact_id in result.artifacts:
        item = workspace.get(artifact_id)
        data = item.path.read_bytes() if item.path is not None and item.path.is_file() else None
        if data is None:
            data = audio_bytes(item.samples, item.sample_rate, item.format)
        content.append(Audio(data=data, format=MIME_FORMAT[item.format]).to_audio_content())
    return CallToolResult(content=content)


class ToolWorker:
    """Runs tools in a worker thread, one at a time (the model and the workspace are not thread-safe)."""

    def __init__(self) -> None:
        self._limiter = anyio.CapacityLimiter(1)

    async def run(self, fn: Callable[[], CallToolResult]) -> CallToolResult:
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)


class _BridgedTool(MCPServerTool):
    """An MCPServer tool whose schema and checks are an omnivox tool's (``fn`` takes the raw arguments)."""

    async def run(self, arguments: dict[str, Any], context: Any, convert_result: bool = False) -> Any:
        result = await self.fn(arguments)
        return self.fn_metadata.convert_result(result) if convert_result else result


def _bridge(offered: Tool | ClipArgumentsTool, workspace: Workspace, worker: ToolWorker) -> _BridgedTool:
    def call(arguments: dict[str, Any]) -> CallToolResult:
        try:
            return _content(workspace, offered.run(arguments))
        # the client's doing: bad arguments, unreadable audio, a path outside, a tool that cannot do it
        except (UserInputError, ToolError) as err:
            log.info("tool %s refused: %s", offered.name, err)
            return _error(" ".join(str(err).split()))
        except Exception:
            log.exception("tool %s failed", offered.name)
            return _error(f"{offered.name}: internal error in omnivox (see the server's log)")

    async def handle(arguments: dict[str, Any]) -> CallToolResult:
        return await worker.run(lambda: call(arguments))

    return _BridgedTool(
        fn=handle,
        name=offered.name,
        description=offered.description,
        parameters=offered.parameters,
        fn_metadata=FuncMetadata(arg_model=ArgModelBase),
        is_async=True,
    )


def create_server(
    assistant: Assistant,
    workspace: Workspace,
    *,
    paths: bool = True,
    registry: ToolRegistry | None = None,
    name: str = "omnivox",
) -> MCPServer:
    """An MCP server offering omnivox's audio tools.

    Args:
        assistant: the loaded :class:`~omnivox.agent.assistant.Assistant` (the model loads before
            the server starts; its weights are not touched until the first tool call). When it can
            speak, its speech head loads here and ``speak`` is offered.
        workspace: the allowed directory (paths are read there, audio tools make is written there)
            and the audio held.
        paths: read paths from clients (False: ids, data URLs and base64 only).
        registry: the tools behind the server; default ``builtin_tools(assistant, workspace)``.
        name: the server's name in the MCP handshake.
    """
    registry = builtin_tools(assistant, workspace) if registry is None else registry
    inputs = AudioInputs(workspace, paths)
    worker = ToolWorker()
    offered = server_tools(registry, inputs)
    if assistant.can_speak:  # the built-in speak, with its voices listed and a speed, for other agents
        offered = [t for t in offered if t.name != "speak"] + [speech_tool(assistant, workspace)]
    tools = [_bridge(t, workspace, worker) for t in offered]
    instructions = (
        "Audio tools of an audio language model. Give audio as audio_base64, a data URL, "
        + ("a path inside the allowed directory, " if paths else "")
        + "or the id of audio a tool made (audio-1); tools that make audio return it as audio content."
        + (" speak says a text aloud." if assistant.can_speak else "")
    )
    return MCPServer(name, instructions=instructions, tools=tools, log_level="WARNING")


def run_server(server: MCPServer, transport: Transport, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until the client goes away (stdio) or the process is stopped (HTTP, at http://HOST:PORT/mcp)."""
    if transport == "stdio":
        server.run("stdio")
    elif transport == "http":
        server.run("streamable-http", host=host, port=port, max_request_body_size=MAX_REQUEST_BYTES)
    else:
        raise UserInputError(f"transport must be stdio or http, got {transport!r}")


@contextlib.contextmanager
def stdout_to_stderr(transport: Transport):
    """Over stdio, stdout is the protocol: whatever is printed while the model loads goes to stderr."""
    if transport != "stdio":
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield
