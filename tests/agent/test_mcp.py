"""The MCP server (``omnivox mcp``): in process with ``mcp.Client(server)``, and once over stdio."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import anyio
import pytest
import soundfile as sf
import tiny

mcp = pytest.importorskip("mcp")

from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp_types import AudioContent, TextContent  # noqa: E402

from omnivox.agent.builtin_tools import TRANSCRIBE  # noqa: E402
from omnivox.agent.mcp_server import create_server  # noqa: E402
from omnivox.agent.workspace import Workspace  # noqa: E402

TOOLS = {"transcribe", "ask", "detect_speech", "measure", "trim", "mix", "convert"}


def _wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tiny.tone_clip(seconds, sample_rate=rate), rate, format="WAV")
    return buffer.getvalue()


def _text(result) -> str:
    assert all(isinstance(c, TextContent) for c in result.content[:1]), result.content
    return result.content[0].text


@pytest.fixture(scope="module")
def greedy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with short greedy answers (a tool call takes well under a second)."""
    return tiny.greedy_copy(tiny_model_dir, tmp_path_factory.mktemp("mcp"), max_new_tokens=6)


@pytest.fixture(scope="module")
def assistant(greedy_dir):
    from omnivox.agent.assistant import Assistant

    return Assistant.from_pretrained(greedy_dir)


@pytest.fixture
def allowed(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "a.wav").write_bytes(_wav(1.0, 22050))
    return root


@pytest.fixture
def server(assistant, allowed):
    return create_server(assistant, Workspace(allowed))


def _expected_transcript(assistant, wav: bytes) -> str:
    from omnivox.agent.audio import load_audio

    return assistant.chat(TRANSCRIBE, [load_audio(wav).samples], assistant.settings()).text.strip() or "(no speech)"


async def test_tools_are_listed_with_their_schemas(server):
    async with mcp.Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS  # no speak: the model answers in text only
    for t in tools.values():
        assert t.description and t.input_schema["type"] == "object", t
    transcribe = tools["transcribe"].input_schema
    assert set(transcribe["properties"]) == {"audio", "audio_base64", "timestamps"}
    assert transcribe["properties"]["timestamps"] == {
        "default": False, "description": "give each stretch of speech with its start and end in seconds.",
        "type": "boolean",
    }  # fmt: skip
    assert tools["ask"].input_schema["required"] == ["question"]
    assert tools["ask"].input_schema["properties"]["question"]["maxLength"] == 300
    trim = tools["trim"].input_schema
    assert trim["required"] == ["clip", "start", "end"] and trim["properties"]["start"]["minimum"] == 0
    assert "pattern" not in trim["properties"]["clip"] and "data URL" in trim["properties"]["clip"]["description"]


async def test_transcribe_base64_data_url_and_path_agree(server, assistant, allowed):
    wav = (allowed / "a.wav").read_bytes()
    expected = _expected_transcript(assistant, wav)
    encoded = base64.b64encode(wav).decode()
    async with mcp.Client(server) as client:
        answers = [
            await client.call_tool("transcribe", {"audio_base64": encoded}),
            await client.call_tool("transcribe", {"audio": f"data:audio/wav;base64,{encoded}"}),
            await client.call_tool("transcribe", {"audio": "a.wav"}),
            await client.call_tool("transcribe", {"audio": str(allowed / "a.wav")}),  # absolute, inside
            await client.call_tool("ask", {"audio": "a.wav", "question": "What is said?"}),
        ]
    for answer in answers:
        assert not answer.is_error, answer.content
    assert [_text(a) for a in answers[:4]] == [expected] * 4
    assert _text(answers[4]).strip()


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
async def test_paths_outside_the_allowed_directory_are_refused(server, allowed, where):
    outside = allowed.parent / "secret.wav"
    outside.write_bytes(_wav(0.5))
    (allowed / "link.wav").symlink_to(outside)
    path, words = {
        "dotdot": ("../secret.wav", "contains '..'"),
        "absolute": (str(outside), "outside the allowed directory"),
        "symlink": ("link.wav", "outside the allowed directory"),
    }[where]
    async with mcp.Client(server) as client:
        for name, arguments in [("transcribe", {"audio": path}), ("trim", {"clip": path, "start": 0, "end": 0.2})]:
            result = await client.call_tool(name, arguments)
            assert result.is_error and words in _text(result), result.content


async def test_without_an_allowed_directory_paths_are_refused(assistant):
    server = create_server(assistant, Workspace(), paths=False)
    async with mcp.Client(server) as client:
        result = await client.call_tool("measure", {"clip": "a.wav"})
        assert result.is_error and "--allowed-dir" in _text(result)
        ok = await client.call_tool("measure", {"clip": "data:audio/wav;base64," + base64.b64encode(_wav(0.5)).decode()})
        assert not ok.is_error and json.loads(_text(ok))["duration"] == 0.5


@pytest.mark.parametrize(
    ("name", "arguments", "words"),
    [
        ("transcribe", {"audio": "a.wav", "timestamps": "yes please"}, "timestamps"),
        ("transcribe", {"audio": 7}, "audio"),
        ("transcribe", {}, "neither given"),
        ("transcribe", {"audio": "a.wav", "audio_base64": "AAAA"}, "both given"),
        ("transcribe", {"audio_base64": "not base64!"}, "not valid base64"),
        ("transcribe", {"audio_base64": base64.b64encode(b"no audio here").decode()}, "audio_base64"),
        ("transcribe", {"audio": "data:audio/wav,raw"}, "data:<type>;base64"),
        ("transcribe", {"audio": "audio-9"}, "no audio called 'audio-9'"),
        ("transcribe", {"audio": "missing.wav"}, "no file 'missing.wav'"),
        ("ask", {"audio": "a.wav"}, "question: Field required"),
        ("ask", {"audio": "a.wav", "question": "x" * 301}, "question"),
        ("trim", {"clip": "a.wav", "start": 0.5}, "end: Field required"),
        ("trim", {"clip": "a.wav", "start": "soon", "end": 1}, "start"),
        ("trim", {"clip": "a.wav", "start": 0, "end": 1, "speed": 2}, "speed"),
        ("trim", {"clip": "a.wav", "start": 0.8, "end": 0.2}, "start < end"),  # the tool's own check
        ("convert", {"clip": "a.wav", "format": "aiff"}, "format"),
        ("speak", {"text": "hello"}, "Unknown tool"),
    ],
)
async def test_bad_calls_are_tool_errors_with_a_message(server, name, arguments, words):
    async with mcp.Client(server) as client:
        result = await client.call_tool(name, arguments)
    assert result.is_error, result.content
    assert words in _text(result)


async def test_audio_tools_return_audio_content(server, allowed):
    async with mcp.Client(server) as client:
        trimmed = await client.call_tool("trim", {"clip": "a.wav", "start": 0.25, "end": 0.75})
        mixed = await client.call_tool("mix", {"clip": "audio-1", "other": "a.wav", "offset": 0.1})
        converted = await client.call_tool("convert", {"clip": "audio-1", "sample_rate": 8000, "format": "flac"})
        heard = await client.call_tool("transcribe", {"audio": "audio-1"})
    assert not any(r.is_error for r in (trimmed, mixed, converted, heard))
    text, audio = trimmed.content
    assert text.text == "audio-1: 0.50 s, 16000 Hz"
    assert isinstance(audio, AudioContent) and audio.mime_type == "audio/wav"
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio.data)))
    assert (rate, len(samples)) == (16000, 8000)
    assert mixed.content[0].text.startswith("audio-2: 1.10 s") and mixed.content[1].mime_type == "audio/wav"
    flac = converted.content[1]
    assert flac.mime_type == "audio/flac" and sf.info(io.BytesIO(base64.b64decode(flac.data))).samplerate == 8000
    assert (allowed / "audio-1.wav").is_file()  # what tools make is written to the allowed directory


async def test_calls_run_one_at_a_time_off_the_event_loop(server, assistant, monkeypatch):
    active, most = [0], [0]
    lock = threading.Lock()
    real_chat = assistant.chat

    def slow_chat(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        try:
            return real_chat(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(assistant, "chat", slow_chat)
    encoded = base64.b64encode(_wav(0.5)).decode()
    results, finished, listed = [], [], []
    async with mcp.Client(server) as client:
        started = time.monotonic()

        async def call() -> None:
            results.append(await client.call_tool("transcribe", {"audio_base64": encoded}))
            finished.append(time.monotonic())

        async def list_meanwhile() -> None:
            await anyio.sleep(0.1)
            await client.list_tools()
            listed.append(time.monotonic())

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(call)
            group.start_soon(list_meanwhile)
    assert len(results) == 3 and not any(r.is_error for r in results)
    assert most[0] == 1 and max(finished) - started >= 0.9  # the model never ran two calls at once
    assert listed[0] < max(finished)  # the event loop answered while calls waited and ran


async def test_stdio_subprocess_lists_and_transcribes(greedy_dir, assistant, allowed, tmp_path):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "omnivox.agent.cli", "mcp", "--model", str(greedy_dir), "--transport", "stdio",
              "--allowed-dir", str(allowed)],  # fmt: skip
    )
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as errlog:
        async with mcp.Client(stdio_client(params, errlog=errlog), read_timeout_seconds=120) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("transcribe", {"audio": "a.wav"})
    assert names == TOOLS, errors.read_text()
    assert not result.is_error, result.content
    assert _text(result) == _expected_transcript(assistant, (allowed / "a.wav").read_bytes())


async def test_http_subprocess_serves_streamable_http(greedy_dir, allowed, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "omnivox.agent.cli", "mcp", "--model", str(greedy_dir), "--transport", "http",
               "--port", str(port), "--allowed-dir", str(allowed)]  # fmt: skip
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as errlog:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, errors.read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await anyio.sleep(0.2)
        async with mcp.Client(f"http://127.0.0.1:{port}/mcp") as client:
            names = {t.name for t in (await client.list_tools()).tools}
            trimmed = await client.call_tool("trim", {"clip": "a.wav", "start": 0, "end": 0.5})
    finally:
        process.terminate()
        process.wait(10)
    assert names == TOOLS
    assert not trimmed.is_error and trimmed.content[1].mime_type == "audio/wav", trimmed.content


def test_mcp_command_line(tmp_path, capsys):
    from omnivox.agent import cli

    args = cli.build_parser("mcp").parse_args(["mcp"])
    assert (args.func, args.transport, args.host, args.port, args.allowed_dir, args.model) == (
        cli.cmd_mcp, "stdio", "127.0.0.1", 8001, None, None,
    )  # fmt: skip
    assert cli.main(["mcp", "--model", str(tmp_path)]) == 2
    assert "not an omnivox model folder" in capsys.readouterr().err
    assert cli.main(["mcp", "--allowed-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["mcp", "--transport", "http", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# speak: offered when the model folder can speak


@pytest.fixture(scope="module")
def speaking_assistant(greedy_dir, tmp_path_factory):
    """The tiny model with a tiny speech head (voices kokoro:jf_tiny, piper:joe)."""
    import shutil

    from omnivox.agent.assistant import Assistant

    folder = tmp_path_factory.mktemp("mcp-speaks") / "speaks"
    shutil.copytree(greedy_dir, folder)
    return Assistant.from_pretrained(tiny.add_speech_head(folder))


async def test_speak_returns_the_spoken_audio(speaking_assistant, allowed):
    server = create_server(speaking_assistant, Workspace(allowed))
    async with mcp.Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        spoken = await client.call_tool("speak", {"text": "Hello there.", "voice": "joe", "speed": 1.25})
        measured = await client.call_tool("measure", {"clip": "audio-1"})  # the audio is held by its id
    assert set(tools) == TOOLS | {"speak"}
    schema = tools["speak"].input_schema
    assert schema["required"] == ["text"] and schema["properties"]["speed"]["maximum"] == 4.0
    assert (
        "kokoro:jf_tiny, piper:joe (default kokoro:jf_tiny)" in schema["properties"]["voice"]["description"]
    )
    assert not spoken.is_error, spoken.content
    text, audio = spoken.content
    expected = speaking_assistant.say("Hello there.", "joe", speed=1.25).audio
    assert text.text == f"audio-1: {expected.seconds:.2f} s, 16000 Hz, voice piper:joe"
    assert isinstance(audio, AudioContent) and audio.mime_type == "audio/wav"
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")
    assert rate == expected.sample_rate and samples.shape == expected.waveform.shape
    assert abs(samples - expected.waveform).max() <= 1.5 / 32768  # 16-bit WAV
    assert (allowed / "audio-1.wav").read_bytes() == base64.b64decode(audio.data)  # written where tools write
    assert json.loads(_text(measured))["duration"] == round(expected.seconds, 2)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (
            {"text": "Hello.", "voice": "alloy"},
            "unknown voice 'alloy'; this model speaks with kokoro:jf_tiny, piper:joe",
        ),
        ({"text": ""}, "text: String should have at least 1 character"),
        ({"text": "x" * 4097}, "text: String should have at most 4096 characters"),
        ({"text": "   "}, "there is no text to speak"),
        ({"text": "Hello.", "speed": 9}, "speed: Input should be less than or equal to 4"),
        ({"voice": "joe"}, "text: Field required"),
    ],
)
async def test_bad_speak_calls_are_tool_errors(speaking_assistant, allowed, arguments, words):
    async with mcp.Client(create_server(speaking_assistant, Workspace(allowed))) as client:
        result = await client.call_tool("speak", arguments)
    assert result.is_error and words in _text(result), result.content
