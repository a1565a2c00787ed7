"""Speech out through the OpenAI-compatible server: ``/v1/audio/speech`` and chat answers with audio,
driven by the stock ``openai`` client over real HTTP on loopback against a tiny speaking model."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import numpy as np
import pytest
import soundfile as sf
import tiny

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from omnivox.agent.server import ServerLimits, create_app  # noqa: E402

KEY = "speech-key"
PCM = 1.5 / 32768  # 16-bit quantisation (and rounding) between a float waveform and its PCM
LONG = "The quick brown fox jumps over the lazy dog. Birds sing at dawn, and rain falls on the roof. " * 2
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def speaking_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model, greedy with 6 new tokens, with a tiny speech head (voices kokoro:jf_tiny, piper:joe)."""
    return tiny.add_speech_head(
        tiny.greedy_copy(tiny_model_dir, tmp_path_factory.mktemp("speech"), 6, "speaks")
    )


@pytest.fixture(scope="module")
def server(speaking_dir):
    """(base URL, model name, the server's assistant)."""
    from omnivox.agent.assistant import Assistant

    assistant = Assistant.from_pretrained(speaking_dir)
    with tiny.serving(
        create_app(assistant, speaking_dir.name, api_key=KEY, limits=ServerLimits(max_tokens=300))
    ) as url:
        yield url, speaking_dir.name, assistant


@pytest.fixture(scope="module")
def reference(speaking_dir):
    """The same folder loaded apart from the server: what ``Assistant.say`` gives."""
    from omnivox.agent.assistant import Assistant

    return Assistant.from_pretrained(speaking_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server[0] + "/v1", api_key=KEY, _strict_response_validation=True, max_retries=0
    )


def _post(server, path: str, body, key: str = KEY) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server[0] + path, content=content, headers=headers, timeout=60)


def _assert_error(response: httpx.Response, status: int, param: str | None, words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    return error


def _pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


# ---------------------------------------------------------------------------------------------
# /v1/audio/speech


def test_speech_wav_is_what_assistant_say_gives(client, reference):
    response = client.audio.speech.create(
        model="tts-1", voice="joe", input="Hello there.", response_format="wav"
    )
    assert response.response.headers["content-type"] == "audio/wav"
    assert response.response.headers["x-voice"] == "piper:joe"
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    expected = reference.say("Hello there.", "joe").audio
    assert rate == expected.sample_rate == 16000 and audio.shape == expected.waveform.shape
    np.testing.assert_allclose(audio, expected.waveform, atol=PCM)
    # the full name and OpenAI's {"id": ...} form name the same voice; speed changes the length
    same = client.audio.speech.create(
        model="m", voice={"id": "piper:joe"}, input="Hello there.", response_format="wav"
    )
    assert same.content == response.content
    slow = client.audio.speech.create(
        model="m", voice="joe", input="Hello there.", response_format="wav", speed=0.5
    )
    assert sf.info(io.BytesIO(slow.content)).frames > 1.5 * len(audio)


@pytest.mark.parametrize(
    ("fmt", "media", "container"),
    [
        (None, "audio/mpeg", "MP3"),
        ("mp3", "audio/mpeg", "MP3"),
        ("opus", "audio/ogg", "OGG"),
        ("flac", "audio/flac", "FLAC"),
    ],
)
def test_speech_file_formats(client, reference, fmt, media, container):
    options = {} if fmt is None else {"response_format": fmt}  # no response_format: mp3, as OpenAI's default
    response = client.audio.speech.create(
        model="m", voice="kokoro:jf_tiny", input="Rain falls on the roof.", **options
    )
    assert response.response.headers["content-type"] == media
    info = sf.info(io.BytesIO(response.content))
    expected = reference.say("Rain falls on the roof.").audio  # the default voice
    assert info.format == container and info.samplerate == expected.sample_rate and info.channels == 1
    assert abs(info.duration - expected.seconds) < 0.05, (info.duration, expected.seconds)
    if fmt == "flac":  # lossless: the samples themselves
        np.testing.assert_allclose(
            sf.read(io.BytesIO(response.content), dtype="float32")[0], expected.waveform, atol=PCM
        )


def test_pcm_streams_in_pieces_equal_to_the_wav(client, reference):
    with client.audio.speech.with_streaming_response.create(
        model="m", voice="joe", input=LONG, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm;rate=16000"
        chunks = [c for c in response.iter_bytes() if c]
    assert len(chunks) > 1, "the PCM came in one piece"
    data = b"".join(chunks)
    expected = reference.say(LONG, "joe").audio
    assert len(data) == 2 * expected.waveform.size
    np.testing.assert_allclose(_pcm(data), expected.waveform, atol=PCM)
    wav = client.audio.speech.create(model="m", voice="joe", input=LONG, response_format="wav").content
    assert (
        sf.read(io.BytesIO(wav), dtype="int16")[0].astype("<i2").tobytes() == data
    )  # the same 16-bit samples


def test_speech_requests_are_checked(client, server):
    path = "/v1/audio/speech"
    ok = {"model": "m", "input": "Hello.", "voice": "joe"}
    cases = [
        (
            {**ok, "voice": "alloy"},
            "voice",
            "unknown voice 'alloy'; this model speaks with kokoro:jf_tiny, piper:joe",
        ),
        ({**ok, "voice": {"id": "nova"}}, "voice", "unknown voice 'nova'"),
        ({**ok, "voice": 12}, "voice", "voice must be a voice name"),
        ({"model": "m", "voice": "joe"}, "input", "input must be a non-empty string"),
        ({**ok, "input": "   "}, "input", "input must be a non-empty string"),
        ({**ok, "input": "a" * 4097}, "input", "input is 4097 characters, over the limit of 4096"),
        (
            {**ok, "input": "Hello there. " * 300},
            "input",
            "3900 characters): 3599 phonemes is more than the talker's 512",
        ),
        (
            {**ok, "input": "#)("},
            "input",
            "cannot speak the input (3 characters): nothing speakable in '#)('",
        ),
        ({**ok, "response_format": "aac"}, "response_format", "['mp3', 'opus', 'flac', 'wav', 'pcm']"),
        ({**ok, "speed": 0.1}, "speed", "speed must be a number from 0.25 to 4.0, got 0.1"),
        ({**ok, "speed": "fast"}, "speed", "speed must be a number"),
        ({**ok, "instructions": "Speak cheerfully."}, "instructions", "cannot be steered by text"),
        ({**ok, "stream_format": "sse"}, "stream_format", "'sse' is not supported"),
        ({**ok, "model": 5}, "model", "model must be a string"),
    ]
    for body, param, words in cases:
        _assert_error(_post(server, path, body), 400, param, words)
    _assert_error(_post(server, path, b"{not json"), 400, None, "not valid JSON")
    assert _post(server, path, ok, key="wrong").status_code == 401
    # the stock client raises them with status and param
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="m", voice="alloy", input="Hello.")
    assert refused.value.status_code == 400 and refused.value.param == "voice"
    assert (
        _post(server, path, {**ok, "instructions": ""}).status_code == 200
    )  # empty instructions ask nothing


def test_a_model_that_cannot_speak_says_so(tiny_model_dir):
    from omnivox.agent.assistant import Assistant

    with tiny.serving(create_app(Assistant.from_pretrained(tiny_model_dir), "mute")) as url:
        speech = httpx.post(
            url + "/v1/audio/speech", json={"model": "m", "input": "Hi.", "voice": "joe"}, timeout=30
        )
        chat = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Hi"}], "modalities": ["text", "audio"],
            "audio": {"voice": "joe", "format": "wav"}})  # fmt: skip
    error = _assert_error(speech, 400, "model", "this model cannot speak: its folder has no talker/")
    assert error["code"] == "model_cannot_speak"
    assert _assert_error(chat, 400, "modalities", "cannot speak")["code"] == "model_cannot_speak"


# ---------------------------------------------------------------------------------------------
# Chat completions with audio


def test_chat_answer_with_audio(client, reference):
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model="m", messages=messages, modalities=["text", "audio"],
                                           audio={"voice": "joe", "format": "wav"})  # fmt: skip
    text = client.chat.completions.create(model="m", messages=messages).choices[0].message
    message = reply.choices[0].message
    assert message.content == text.content and message.content.strip(), message  # the same answer, spoken
    assert message.audio.transcript == message.content and message.audio.id.startswith("audio_")
    assert abs(message.audio.expires_at - time.time()) < 120
    audio, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    expected = reference.say(message.content, "joe").audio
    assert rate == 16000 and audio.shape == expected.waveform.shape
    np.testing.assert_allclose(audio, expected.waveform, atol=PCM)
    # pcm16: the raw samples, base64
    raw = client.chat.completions.create(model="m", messages=messages, modalities=["text", "audio"],
                                         audio={"voice": "joe", "format": "pcm16"}).choices[0].message  # fmt: skip
    np.testing.assert_allclose(_pcm(base64.b64decode(raw.audio.data)), expected.waveform, atol=PCM)


def test_each_of_n_answers_is_spoken(client, reference):
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say anything"}], n=2,
                                           seed=3, modalities=["text", "audio"], audio={"voice": "jf_tiny", "format": "flac"})  # fmt: skip
    from omnivox.decoders.phonemes import phonemize
    from omnivox.errors import UserInputError

    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        message = choice.message
        if message.audio is None:  # only an answer with nothing speakable in it stays silent
            with pytest.raises(UserInputError, match="no text to speak|nothing speakable"):
                phonemize(message.content)
            continue
        assert message.audio.transcript == message.content
        audio = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")[0]
        np.testing.assert_allclose(audio, reference.say(message.content, "jf_tiny").audio.waveform, atol=PCM)
    assert any(c.message.audio is not None for c in reply.choices)


def test_streamed_chat_audio_comes_after_the_text(client, reference):
    messages = [{"role": "user", "content": "Hello there"}]
    chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True, modalities=["text", "audio"],
                                                 audio={"voice": "joe", "format": "pcm16"}))  # fmt: skip
    deltas = [c.choices[0] for c in chunks if c.choices]
    text = "".join(d.delta.content or "" for d in deltas)
    audio = [d.delta.audio for d in deltas if d.delta.audio is not None]
    assert audio[0].id.startswith("audio_") and audio[0].transcript == text and audio[0].data is None
    assert len(audio) >= 3 and all(a.data and a.id is None for a in audio[1:-1])
    assert audio[-1].expires_at is not None and audio[-1].data is None
    pcm = b"".join(base64.b64decode(a.data) for a in audio[1:-1])
    np.testing.assert_allclose(_pcm(pcm), reference.say(text, "joe").audio.waveform, atol=PCM)
    finishes = [i for i, d in enumerate(deltas) if d.finish_reason]
    last_audio = max(i for i, d in enumerate(deltas) if d.delta.audio is not None)
    assert len(finishes) == 1 and finishes[0] > last_audio  # the finish reason follows the audio


def test_tool_call_answers_have_no_audio(client):
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", max_tokens=300, modalities=["text", "audio"], audio={"voice": "joe", "format": "wav"},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls and choice.message.audio is None


def test_chat_audio_requests_are_checked(server):
    path = "/v1/chat/completions"
    user = {"role": "user", "content": "Hi"}
    audio = {"modalities": ["text", "audio"], "audio": {"voice": "joe", "format": "wav"}}
    cases = [
        ({"messages": [user], "modalities": ["text", "audio"]}, "audio", 'audio must be {"voice", "format"}'),
        ({"messages": [user], **audio, "audio": {"voice": "joe", "format": "aac"}}, "audio.format",
         "audio.format must be one of ['wav', 'mp3', 'flac', 'opus', 'pcm16'], got 'aac'"),
        ({"messages": [user], **audio, "audio": {"voice": "alloy", "format": "wav"}}, "audio.voice",
         "unknown voice 'alloy'; this model speaks with kokoro:jf_tiny, piper:joe"),
        ({"messages": [user], "audio": {"voice": "joe", "format": "wav"}}, "modalities", 'does not ask for "audio"'),
        ({"messages": [user], "modalities": ["text", "video"]}, "modalities", "modalities must be a list of ['text', 'audio']"),
        ({"messages": [user], **audio, "stream": True}, "audio.format", "a streamed answer is spoken as pcm16"),
        ({"messages": [user, {"role": "assistant", "audio": {"id": "audio_1"}}, user], **audio}, "messages[1].audio",
         "send the answer's transcript as content"),
    ]  # fmt: skip
    for body, param, words in cases:
        _assert_error(_post(server, path, body), 400, param, words)
    # an earlier spoken answer sent back whole (content and audio id) is read by its content
    turns = [user, {"role": "assistant", "content": "Hello.", "audio": {"id": "audio_1"}}, user]
    assert _post(server, path, {"messages": turns, **audio}).status_code == 200


# ---------------------------------------------------------------------------------------------
# The model thread


def test_speech_and_chat_never_run_the_model_at_once(client, server, monkeypatch):
    assistant = server[2]
    active, most = [0], [0]
    lock = threading.Lock()

    def counted(real):
        def run(*args, **kwargs):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.2)
            try:
                return real(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1

        return run

    monkeypatch.setattr(assistant, "say", counted(assistant.say))
    monkeypatch.setattr(assistant, "generate", counted(assistant.generate))

    def speech(_: int) -> int:
        return len(
            client.audio.speech.create(model="m", voice="joe", input="Hello.", response_format="wav").content
        )

    def chat(_: int) -> str:
        return (
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(f, i) for i in range(3) for f in (speech, chat)]
        results = [a.result(timeout=120) for a in answers]
    assert len(results) == 6 and all(r is not None for r in results)
    assert most[0] == 1  # one worker thread: never two model calls at once


def test_a_pcm_client_that_leaves_stops_the_speaking(server, monkeypatch):
    from omnivox.agent.server import Cancelled

    assistant = server[2]
    outcome: list[str] = []
    real_say = assistant.say

    def slow_say(text, voice=None, on_audio=None, **options):
        def piece(samples):
            time.sleep(0.05)  # slower than the client, so it is still speaking when the client leaves
            on_audio(samples)

        try:
            result = real_say(text, voice, on_audio=piece, **options)
        except Cancelled:
            outcome.append("cancelled")
            raise
        outcome.append("finished")
        return result

    monkeypatch.setattr(assistant, "say", slow_say)
    body = {"model": "m", "input": LONG, "voice": "joe", "response_format": "pcm"}
    with httpx.stream("POST", server[0] + "/v1/audio/speech", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
        assert response.status_code == 200
        next(response.iter_raw())  # the first piece, then the client hangs up
    deadline = time.monotonic() + 10
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome == ["cancelled"]


def test_a_pcm_stream_past_its_timeout_is_cut_not_ended(reference, monkeypatch):
    real_say = reference.say

    def slow_say(text, voice=None, on_audio=None, **options):
        def piece(samples):
            time.sleep(0.1)
            on_audio(samples)

        return real_say(text, voice, on_audio=piece, **options)

    monkeypatch.setattr(reference, "say", slow_say)
    body = {"model": "m", "input": LONG, "voice": "joe", "response_format": "pcm"}
    received = []
    with tiny.serving(create_app(reference, "slow", limits=ServerLimits(request_timeout=1))) as url:
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=30) as response,
        ):
            assert response.status_code == 200  # the first piece came in time
            for chunk in response.iter_bytes():
                received.append(chunk)
        after = httpx.post(
            url + "/v1/audio/speech", json={**body, "input": "Hi.", "response_format": "wav"}, timeout=30
        )
    assert received and after.status_code == 200  # part of the audio came, then the cut; the server goes on
