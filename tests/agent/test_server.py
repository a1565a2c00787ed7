"""The OpenAI-compatible server, driven by the stock ``openai`` client over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import pytest
import soundfile as sf
import tiny

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from omnivox.agent.server import ServerLimits, StopText, create_app  # noqa: E402

KEY = "test-key-123"


def _wav_bytes(seconds: float = 1.0, rate: int = 22050) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tiny.tone_clip(seconds, sample_rate=rate), rate, format="WAV")
    return buffer.getvalue()


running = tiny.serving


@pytest.fixture(scope="module")
def greedy_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model whose default decoding is greedy (so it streams), 8 new tokens."""
    return tiny.greedy_copy(tiny_model_dir, tmp_path_factory.mktemp("serve"), max_new_tokens=8)


@pytest.fixture(scope="module")
def server(greedy_dir):
    """(base URL, model name, assistant): the greedy tiny model behind a key, bodies up to 2 MiB."""
    from omnivox.agent.assistant import Assistant

    assistant = Assistant.from_pretrained(greedy_dir)
    limits = ServerLimits(max_body_bytes=2 * 1024 * 1024, max_audio_seconds=5, max_tokens=300)
    with running(create_app(assistant, greedy_dir.name, api_key=KEY, limits=limits)) as url:
        yield url, greedy_dir.name, assistant


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
    _assert_error(_post(server, path, b'{"messages": NaN}'), 400, "NaN is not a JSON value")
    _assert_error(_post(server, path, b"[" * 100_000), 400, "nested too deeply")
    _assert_error(_post(server, path, b"[1, 2]"), 400, "JSON object")
    user = {"role": "user", "content": "hi"}
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(_wav_bytes(6.5)).decode(), "format": "wav"}}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    cases = [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "names no tool call"),
        ({"messages": [user, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_2",
                                                                           "content": "x"}]}, "'call_2' names no tool call"),
        ({"messages": [user, {"role": "assistant", "tool_calls": [{**call, "function": {"name": "f", "arguments": "[1]"}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, "JSON object encoded as a string"),
        ({"messages": [user], "max_tokens": "many"}, "max_tokens"),
        ({"messages": [user], "max_tokens": 301}, "max_tokens must be at most 300 on this server, got 301"),
        ({"messages": [user], "max_completion_tokens": 0}, "max_completion_tokens must be an integer >= 1"),
        ({"messages": [user], "temperature": 9}, "temperature"),
        ({"messages": [user], "n": 9}, "n must be at most 8"),
        ({"messages": [user], "modalities": ["text", "audio"]}, "cannot speak"),
        ({"messages": [user], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "parameters must be a JSON schema of type object"),
        ({"messages": [user], "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": 12}}}}}]}, "not a valid JSON schema"),
        ({"messages": [user], "tools": [{"type": "code_interpreter"}]}, '"type": "function"'),
        ({"messages": [user], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {
            "type": "function", "function": {"name": "g"}}}, "'g', which is not among the tools offered ['f']"),
        ({"messages": [user], "tool_choice": "required"}, "needs tools"),
        ({"messages": [user], "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": [user], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "minProperties": "two"}}}}, "not a valid JSON schema"),
        ({"messages": [user, {"role": "user", "content": "again"}]}, "a user turn must follow assistant or tool"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "@@not base64@@", "format": "wav"}}]}]}, "not valid base64"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"junk").decode(), "format": "wav"}}]}]},
         "audio"),
        ({"messages": [{"role": "user", "content": [audio_part]}]}, "is 6.5 s long, over this server's limit of 5 s"),
        ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {
            "url": "https://example.com/a.wav"}}]}]}, "only data URLs"),
        ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {
            "url": "file:///etc/passwd"}}]}]}, "only data URLs"),
        ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {
            "url": "data:audio/wav,abc"}}]}]}, "base64 data URL"),
    ]  # fmt: skip
    for body, words in cases:
        _assert_error(_post(server, path, json.dumps(body)), 400, words)
    long = {"messages": [{"role": "user", "content": "the quick brown fox " * 600}], "max_tokens": 50}
    for stream in (False, True):  # checked before a stream begins: a 400, not an error event after a 200
        _assert_error(_post(server, path, json.dumps({**long, "stream": stream})), 400,
                      "and max_tokens is 50: ")  # fmt: skip
    error = _post(server, path, json.dumps(long)).json()["error"]["message"]
    assert "over the model's context of 2048 tokens" in error and "(0 of them audio)" in error
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

    assistant = Assistant.from_pretrained(tiny_model_dir)
    assert assistant.settings().num_beams > 1
    with running(create_app(assistant, "beam")) as url:
        beam = openai.OpenAI(base_url=url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        chunks = list(beam.chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True))
        whole = beam.chat.completions.create(model="m", messages=messages, max_tokens=5).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == ([whole] if whole else [])


def test_serve_command_line(tmp_path, capsys):
    from omnivox.agent import cli

    args = cli.build_parser("serve").parse_args(["serve", "--port", "9001", "--api-key", "k", "--max-queue", "3",
                                                 "--max-batch-size", "2", "--request-timeout", "7.5"])  # fmt: skip
    assert (args.func, args.host, args.port, args.api_key) == (cli.cmd_serve, "127.0.0.1", 9001, "k")
    assert (args.max_queue, args.max_batch_size, args.request_timeout, args.max_audio_seconds) == (3, 2, 7.5, 600.0)
    assert cli.main(["serve", "--model", str(tmp_path), "--max-queue", "0"]) == 2
    assert "max_queue must be a number >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert "not an omnivox model folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# audio_url, usage, n


def _audio_messages(wav: bytes, part: str) -> list[dict]:
    data = base64.b64encode(wav).decode()
    audio = ({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}} if part == "input_audio"
             else {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}})  # fmt: skip
    return [{"role": "user", "content": [audio, {"type": "text", "text": "What is said?"}]}]


def test_audio_url_data_url_is_read_like_input_audio_and_counted_in_usage(client, server):
    wav = _wav_bytes(1.2)
    by_url = client.chat.completions.create(model="m", messages=_audio_messages(wav, "audio_url"), max_tokens=6)
    by_part = client.chat.completions.create(model="m", messages=_audio_messages(wav, "input_audio"), max_tokens=6)
    assert by_url.choices[0].message.content == by_part.choices[0].message.content
    clip = server[2].encode_clip(_samples(wav))
    assert by_url.usage.prompt_tokens_details.audio_tokens == clip.num_tokens > 0
    assert by_url.usage.prompt_tokens > clip.num_tokens
    text = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert text.usage.prompt_tokens_details.audio_tokens == 0


def _samples(wav: bytes):
    from omnivox.agent.audio import load_audio

    return load_audio(wav).samples


def test_max_completion_tokens_is_max_tokens(client):
    messages = [{"role": "user", "content": "Tell me a long story"}]
    reply = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=3)
    assert reply.usage.completion_tokens <= 3


def test_n_answers_are_sampled_in_one_batch(client):
    messages = [{"role": "user", "content": "Say anything"}]
    reply = client.chat.completions.create(model="m", messages=messages, n=3, seed=1, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # samples, not one answer thrice
    one = client.chat.completions.create(model="m", messages=messages, max_tokens=6)
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, three answers
    assert 3 <= reply.usage.completion_tokens <= 18
    again = client.chat.completions.create(model="m", messages=messages, n=3, seed=1, max_tokens=6)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    chunks = list(client.chat.completions.create(model="m", messages=messages, n=2, max_tokens=6, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.index for c in finishes) == [0, 1]


# ---------------------------------------------------------------------------------------------
# Concurrency: batches, the queue bound, timeouts, clients that leave


def _held(assistant):
    """Make ``assistant.generate`` wait for ``release``; returns (started, release, calls)."""
    started, release, calls = threading.Event(), threading.Event(), []
    generate = assistant.generate

    def held(conversations, *args, **kwargs):
        calls.append(len(conversations))
        started.set()
        assert release.wait(30)
        return generate(conversations, *args, **kwargs)

    assistant.generate = held
    return started, release, calls


def _until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _chat(url: str, text: str, timeout: float = 30, **kw) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def test_requests_that_arrive_together_share_a_batch(greedy_dir, client):
    from omnivox.agent.assistant import Assistant

    prompts = ["Hello there", "Tell me something", "Say anything"]
    alone = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}]).choices[0].message.content
             for p in prompts]  # fmt: skip
    wav = _wav_bytes(1.0)
    heard = client.audio.transcriptions.create(model="m", file=("a.wav", wav, "audio/wav")).text
    assistant = Assistant.from_pretrained(greedy_dir)
    sizes: list[int] = []
    generate = assistant.generate
    assistant.generate = lambda conversations, *a, **kw: sizes.append(len(conversations)) or generate(conversations, *a, **kw)
    limits = ServerLimits(max_batch_size=4, batch_window_ms=3000)
    with running(create_app(assistant, "b", limits=limits)) as url:
        with ThreadPoolExecutor(4) as pool:
            chats = [pool.submit(_chat, url, p) for p in prompts]
            transcript = pool.submit(httpx.post, url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav)},
                                     data={"model": "m"}, timeout=30)  # fmt: skip
            replies = [c.result().json() for c in chats]
            metrics = httpx.get(url + "/metrics").text
    assert sizes == [4]  # three chats and a transcription, in one batch, answered as each alone
    assert [r["choices"][0]["message"]["content"] for r in replies] == alone
    assert transcript.result().json()["text"] == heard
    assert "omnivox_batch_size_bucket{le=\"4.0\"} 1.0" in metrics and "omnivox_batch_size_count 1.0" in metrics


def test_a_full_queue_answers_429_with_retry_after(greedy_dir):
    from omnivox.agent.assistant import Assistant

    assistant = Assistant.from_pretrained(greedy_dir)
    started, release, calls = _held(assistant)
    app = create_app(assistant, "q", limits=ServerLimits(max_queue=1, max_batch_size=1))
    with running(app) as url:
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(2))
            stack.callback(release.set)
            first = pool.submit(_chat, url, "one")
            assert started.wait(30)  # the first is being answered: the queue is empty
            second = pool.submit(_chat, url, "two")
            _until(lambda: app.state.batcher.depth == 1)
            refused = _chat(url, "three")
            error = _assert_error(refused, 429, "1 requests are waiting")
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert int(refused.headers["Retry-After"]) >= 1
            assert "omnivox_queue_depth 1.0" in httpx.get(url + "/metrics").text
            stock = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                stock.chat.completions.create(model="m", messages=[{"role": "user", "content": "four"}])
            release.set()
            assert first.result().status_code == second.result().status_code == 200
    assert calls == [1, 1]


def test_a_request_past_its_timeout_is_504_and_leaves_the_queue(greedy_dir):
    from omnivox.agent.assistant import Assistant

    assistant = Assistant.from_pretrained(greedy_dir)
    started, release, calls = _held(assistant)
    app = create_app(assistant, "t", limits=ServerLimits(request_timeout=1.0, max_batch_size=1))
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        try:
            running_one = pool.submit(_chat, url, "one")
            assert started.wait(30)
            queued = pool.submit(_chat, url, "two")
            for response in (running_one.result(), queued.result()):
                error = _assert_error(response, 504, "not answered within 1 s")
                assert error["type"] == "timeout_error"
            assert app.state.batcher.depth == 0  # the queued one was dropped, never run
        finally:
            release.set()
        _until(lambda: len(calls) == 1)
        del assistant.generate  # the model answers at once again
        assert _chat(url, "three").status_code == 200
    assert calls == [1]


def test_a_client_that_leaves_is_dropped_from_the_queue(greedy_dir):
    from omnivox.agent.assistant import Assistant

    assistant = Assistant.from_pretrained(greedy_dir)
    started, release, calls = _held(assistant)
    app = create_app(assistant, "d", limits=ServerLimits(max_batch_size=1))
    with running(app) as url, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(_chat, url, "one")
            assert started.wait(30)
            with pytest.raises(httpx.ReadTimeout):
                _chat(url, "two", timeout=0.5)  # the client gives up and closes the connection
            _until(lambda: app.state.batcher.depth == 0)
            assert 'omnivox_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in httpx.get(
                url + "/metrics"
            ).text
        finally:
            release.set()
        assert first.result().status_code == 200
    assert calls == [1]


def test_a_streaming_client_that_leaves_stops_the_generation(greedy_dir):
    from omnivox.agent.assistant import Assistant
    from omnivox.agent.generation import Generation

    assistant = Assistant.from_pretrained(greedy_dir)
    outcome: dict[str, object] = {}

    def endless(conversations, audio, settings=None, on_text=None, **kwargs):  # a scripted model, 20 s of text
        try:
            for _ in range(2000):
                on_text("word ")
                time.sleep(0.01)
        except Exception as err:
            outcome["stopped by"] = type(err).__name__
            raise
        outcome["stopped by"] = None
        return [Generation("word " * 2000, [5] * 2000, "length")]

    assistant.generate = endless
    with running(create_app(assistant, "s")) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "Go"}], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            while '"word ' not in next(lines):
                pass
        _until(lambda: "stopped by" in outcome, 5)
    assert outcome["stopped by"] == "Cancelled"


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_count_requests_latency_tokens_and_batches(client, server):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    httpx.get(server[0] + "/v1/no/such/path/../etc/passwd")
    response = httpx.get(server[0] + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}  # fmt: skip
    chat = (("endpoint", "/v1/chat/completions"), ("status", "200"))
    assert samples[("omnivox_requests_total", chat)] >= 1
    assert samples[("omnivox_request_duration_seconds_count", (("endpoint", "/v1/chat/completions"),))] >= 1
    assert samples[("omnivox_requests_total", (("endpoint", "other"), ("status", "404")))] >= 1
    assert samples[("omnivox_queue_depth", ())] == 0
    assert samples[("omnivox_generated_tokens_total", ())] >= 1
    assert samples[("omnivox_batch_size_count", ())] >= 1
    endpoints = {dict(labels).get("endpoint") for name, labels in samples if name == "omnivox_requests_total"}
    assert endpoints <= {"/v1/chat/completions", "/v1/audio/transcriptions", "/v1/models", "/health", "/metrics",
                         "/", "/static", "other"}  # fmt: skip


def test_each_app_has_its_own_metrics(greedy_dir):
    from omnivox.agent.assistant import Assistant

    a, b = (create_app(Assistant.from_pretrained(greedy_dir), "m") for _ in range(2))
    assert a.state.metrics.registry is not b.state.metrics.registry


# ---------------------------------------------------------------------------------------------
# Tools and response formats

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city over the next days.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}  # fmt: skip
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
TOOLS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])
    return [call.function.name for call in calls]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_validate_against_their_schema(client, choice):
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice,
                                           max_tokens=300)  # fmt: skip
    answer = reply.choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    names = _check_calls(answer.message.tool_calls)
    if isinstance(choice, dict):
        assert names == ["get_time"]


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls(client):
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, CLOCK], stream=True,
                                                 tool_choice="required", max_tokens=300))  # fmt: skip
    deltas = [call for c in chunks if c.choices and c.choices[0].delta.tool_calls for call in c.choices[0].delta.tool_calls]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _check_calls(deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_conversation_with_tool_results_reaches_the_model(client, server):
    from omnivox.agent.tools import Tool
    from omnivox.prompts import Message, calls_text, result_text

    arguments = {"city": "Paris", "days": 2}
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps(arguments)}}]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny, 21 C"}]  # fmt: skip
    reply = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], tool_choice="none")
    turns = [Message("user", ASK[0]["content"]), Message("assistant", calls_text([("get_weather", arguments)])),
             Message("tool", result_text("get_weather", "Sunny, 21 C"))]  # fmt: skip
    expected = server[2].generate([turns], [[]], server[2].settings(), tools=[Tool.from_openai(WEATHER).spec()],
                                  tool_choice="none")[0]  # fmt: skip
    assert reply.choices[0].message.content == expected.text


def test_response_format_json_schema_parses_and_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "score"], "additionalProperties": False}  # fmt: skip
    reply = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_response_format_json_object_and_text(client):
    reply = client.chat.completions.create(model="m", messages=ASK, max_tokens=300, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut short by max_tokens: still the start of an object
        assert reply.choices[0].message.content.startswith("{")
    plain = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "text"})
    assert plain.choices[0].message.content == client.chat.completions.create(model="m", messages=ASK).choices[0].message.content
