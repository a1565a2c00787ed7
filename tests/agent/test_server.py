"""The OpenAI-compatible server, driven by the stock ``openai`` client over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import pytest
import soundfile as sf
import tiny

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from omnivox.agent.server import StopText, create_app  # noqa: E402

KEY = "test-key-123"


def _wav_bytes(seconds: float = 1.0, rate: int = 22050) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tiny.tone_clip(seconds, sample_rate=rate), rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A uvicorn server in a thread over a copy of the tiny model whose default decoding is greedy (streams)."""
    from omnivox.agent.assistant import Assistant

    folder = tmp_path_factory.mktemp("serve") / "tiny-greedy"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["generation"] = {"num_beams": 1, "max_new_tokens": 8}
    (folder / "config.json").write_text(json.dumps(config))
    assistant = Assistant.from_pretrained(folder)
    app = create_app(assistant, folder.name, api_key=KEY, max_body_bytes=2 * 1024 * 1024)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", folder.name, assistant
    uv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server[0] + "/v1", api_key=KEY, _strict_response_validation=True, max_retries=0
    )


def _post(server, path: str, content: bytes | str, key: str = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server[0] + path, content=content, headers=headers, timeout=30, **kw)


def _assert_error(response: httpx.Response, status: int, words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    return error


def test_text_chat_has_openai_shape_and_usage(client, server):
    reply = client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert reply.object == "chat.completion" and reply.model == server[1]
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 3 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_audio_chat_and_multi_turn_match_the_assistant(client, tiny_model_dir):
    from omnivox.agent.assistant import Assistant
    from omnivox.agent.audio import load_audio
    from omnivox.agent.generation import GenerationSettings
    from omnivox.prompts import Message

    wav = _wav_bytes()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
            {"type": "text", "text": "What is said?"},
        ]},
    ]  # fmt: skip
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert reply.usage.completion_tokens <= 5
    # the same conversation through the library gives the same answer
    assistant = Assistant.from_pretrained(tiny_model_dir)
    clip = assistant.encode_clip(load_audio(wav).samples)
    turns = [
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "What is said?", num_audio=1),
    ]
    expected = assistant.generate([turns], [[clip]], GenerationSettings.greedy(max_new_tokens=5))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_streaming_deltas_assemble_the_greedy_answer(client):
    messages = [{"role": "user", "content": "Tell me something"}]
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_string_cuts_the_answer(client):
    messages = [{"role": "user", "content": "Tell me something"}]
    whole = client.chat.completions.create(model="m", messages=messages).choices[0].message.content
    if len(whole) < 3:
        pytest.skip(f"the tiny model's answer {whole!r} is too short to cut")
    stop = whole[1:3]
    reply = client.chat.completions.create(model="m", messages=messages, stop=[stop])
    assert reply.choices[0].message.content == whole[: whole.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="m", messages=messages, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole[: whole.find(stop)]


def test_sampling_with_a_seed_repeats(client):
    messages = [{"role": "user", "content": "Say anything"}]
    a, b = (
        client.chat.completions.create(model="m", messages=messages, temperature=1.5, top_p=1.0, seed=7)
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_text_holds_back_a_possible_stop_string():
    cut = StopText(["END"])
    assert cut.feed("abcE") == "abc"
    assert cut.feed("N") == ""
    assert cut.feed("Xy") == "ENXy"
    assert cut.feed("zEND tail") == "z" and cut.stopped
    assert cut.feed("more") == "" and cut.flush() == ""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_transcription(client, fmt):
    answer = client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", _wav_bytes(), "audio/wav"), response_format=fmt
    )
    text = answer if fmt == "text" else answer.text
    assert isinstance(text, str)


def test_transcription_timed_formats_cover_the_clip(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    files = {"file": ("clip.wav", _wav_bytes(1.5), "audio/wav")}
    verbose = httpx.post(server[0] + "/v1/audio/transcriptions", headers=headers, files=files,
                         data={"model": "m", "response_format": "verbose_json"}, timeout=30).json()  # fmt: skip
    assert verbose["duration"] == pytest.approx(1.5, abs=1e-3)
    assert verbose["segments"][0]["end"] == verbose["duration"]
    srt = httpx.post(server[0] + "/v1/audio/transcriptions", headers=headers, files=files,
                     data={"model": "m", "response_format": "srt"}, timeout=30).text  # fmt: skip
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\n")
    empty = httpx.post(server[0] + "/v1/audio/transcriptions", headers=headers, timeout=30,
                       files={"file": ("x.wav", b"not audio", "audio/wav")}, data={"model": "m"})  # fmt: skip
    _assert_error(empty, 400, "audio")


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server[1]]


def test_async_client(server):
    async def ask() -> str:
        async with openai.AsyncOpenAI(
            base_url=server[0] + "/v1", api_key=KEY, _strict_response_validation=True, max_retries=0
        ) as aclient:
            reply = await aclient.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}]
            )
            return reply.choices[0].message.content

    assert isinstance(asyncio.run(ask()), str)


def test_bad_requests_are_4xx_in_openai_shape(server):
    path = "/v1/chat/completions"
    _assert_error(_post(server, path, b"{not json"), 400, "not valid JSON")
    _assert_error(_post(server, path, b"[1, 2]"), 400, "JSON object")
    user = {"role": "user", "content": "hi"}
    cases = [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "tool calls are not supported"),
        ({"messages": [user], "max_tokens": "many"}, "max_tokens"),
        ({"messages": [user], "temperature": 9}, "temperature"),
        ({"messages": [user], "n": 2}, "n must be 1"),
        ({"messages": [user], "modalities": ["text", "audio"]}, "cannot speak"),
        ({"messages": [user], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool calls are not supported"),
        ({"messages": [user, {"role": "user", "content": "again"}]}, "a user turn must follow assistant"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "@@not base64@@", "format": "wav"}}]}]}, "not valid base64"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"junk").decode(), "format": "wav"}}]}]},
         "audio"),
    ]  # fmt: skip
    for body, words in cases:
        _assert_error(_post(server, path, json.dumps(body)), 400, words)
    _assert_error(_post(server, path, json.dumps({"messages": [user]}), key="wrong"), 401, "API key")
    garbled = httpx.post(server[0] + "/v1/audio/transcriptions", content=b"--zz\r\nnonsense",
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=zz"})  # fmt: skip
    _assert_error(garbled, 400, "")
    no_file = httpx.post(
        server[0] + "/v1/audio/transcriptions",
        data={"model": "m"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    _assert_error(no_file, 400, "'file'")
    _assert_error(_post(server, path, b"x" * (3 * 1024 * 1024)), 413, "larger than")
    _assert_error(
        httpx.get(server[0] + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404, "Not Found"
    )
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(3):
            yield b"x" * (1024 * 1024)

    _assert_error(_post(server, "/v1/chat/completions", chunks()), 413, "larger than")


def test_health_answers_while_a_generation_runs(server, monkeypatch):
    assistant = server[2]
    started, release = threading.Event(), threading.Event()
    generate = assistant.generate

    def held(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return generate(*args, **kwargs)

    monkeypatch.setattr(assistant, "generate", held)
    body = json.dumps({"messages": [{"role": "user", "content": "Go"}], "max_tokens": 4})
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("r", _post(server, "/v1/chat/completions", body))
    )
    worker.start()
    try:
        assert started.wait(30)
        assert httpx.get(server[0] + "/health", timeout=5).json() == {"status": "ok"}  # the model is busy
        assert (
            httpx.get(
                server[0] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5
            ).status_code
            == 200
        )
    finally:
        release.set()
        worker.join(30)
    assert result["r"].status_code == 200


def test_beam_search_streams_its_answer_whole(tiny_model_dir):
    from omnivox.agent.assistant import Assistant
    from omnivox.agent.server import ChatRequest, generate, prepare
    from omnivox.prompts import Message

    assistant = Assistant.from_pretrained(tiny_model_dir)
    assert assistant.settings().num_beams > 1
    request = ChatRequest([Message("user", "Hi")], [], {"max_new_tokens": 5}, None, [], True, False)
    prepared = prepare(assistant, request)
    pieces: list[str] = []
    answer = generate(assistant, prepared, None, pieces.append)
    assert pieces == [answer.text]
    assert answer.text == assistant.generate([[Message("user", "Hi")]], [[]], prepared.settings)[0].text


def test_serve_command_line(tmp_path, capsys):
    from omnivox.agent import cli

    args = cli.build_parser("serve").parse_args(["serve", "--port", "9001", "--api-key", "k"])
    assert (args.func, args.host, args.port, args.api_key) == (cli.cmd_serve, "127.0.0.1", 9001, "k")
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert "not an omnivox model folder" in capsys.readouterr().err
