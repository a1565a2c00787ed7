"""An OpenAI-compatible HTTP server over an :class:`~omnivox.agent.assistant.Assistant` (``omnivox serve``).

Endpoints:

- ``POST /v1/chat/completions``: text and ``input_audio`` content parts, multi-turn, streaming (SSE).
- ``POST /v1/audio/transcriptions``: multipart upload, answered by asking "Transcribe the speech."
  (so the assistant's transcription step answers it).
- ``GET /v1/models``: the one model, named after its folder.
- ``GET /health``: answers while a generation runs (the model works in a worker thread).

Every bad input is a 4xx in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.
The model is not thread-safe: all model work runs in worker threads under one lock, one request at
a time; the event loop stays free for other requests meanwhile.

Not supported, and refused with a 400 that says so rather than ignored: tool calls (``tools``),
spoken answers (``modalities`` with "audio", ``audio``), ``n`` other than 1, ``logprobs``, and
response formats other than text. The request's ``model`` is not checked: any name is answered by
the one model, whose name the response carries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnivox.agent.assistant import Assistant
from omnivox.agent.audio import load_audio
from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.model import EncodedClip
from omnivox.errors import UserInputError
from omnivox.prompts import Message

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 25 * 1024 * 1024  # OpenAI's limit for audio uploads
MAX_STOP_STRINGS = 4
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
TRANSCRIBE_INSTRUCTION = "Transcribe the speech."
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# OpenAI's "developer" role is its newer name for the system role
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

T = TypeVar("T")


class APIError(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---------------------------------------------------------------------------------------------
# The model, one request at a time


class ModelWorker:
    """Runs model work in worker threads under one lock (the model is not thread-safe)."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._lock:
                return fn(*args)

        return await anyio.to_thread.run_sync(locked)


@dataclass
class ChatRequest:
    """A checked chat request: the conversation (clips still as samples) and how to answer."""

    messages: list[Message]
    audio: list[Any]  # [S] float32 16 kHz samples per clip, in order of appearance
    overrides: dict[str, Any]
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


@dataclass
class PreparedChat:
    """A conversation whose clips are encoded, and its prompt length in tokens."""

    messages: list[Message]
    clips: list[EncodedClip]
    settings: GenerationSettings
    prompt_tokens: int


def prepare(assistant: Assistant, request: ChatRequest) -> PreparedChat:
    """Encode the clips and tokenize the prompt (which checks the turn order); in a worker thread."""
    settings = assistant.settings(**request.overrides)
    clips = [assistant.encode_clip(samples) for samples in request.audio]
    prompt = assistant.model.processor.tokenize(request.messages, [c.num_tokens for c in clips])
    return PreparedChat(request.messages, clips, settings, int(prompt.input_ids.shape[0]))


def generate(
    assistant: Assistant, chat: PreparedChat, seed: int | None, on_text: Callable[[str], None] | None = None
) -> Generation:
    """One answer; in a worker thread holding the lock (``seed`` seeds torch's global generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    if on_text is not None and chat.settings.num_beams != 1:
        # beam search cannot stream token by token: the answer goes out whole when it is done
        answer = assistant.generate([chat.messages], [chat.clips], chat.settings)[0]
        on_text(answer.text)
        return answer
    return assistant.generate([chat.messages], [chat.clips], chat.settings, on_text)[0]


class StopText:
    """Cuts text at the first of the ``stop`` strings, also when it arrives in pieces.

    :meth:`feed` returns what is safe to send: text that might be the start of a stop string is
    held back until the next piece shows whether it is.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = list(stop)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
            return out
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return "" if self.stopped else out


# ---------------------------------------------------------------------------------------------
# Reading requests


def _parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number from {low} to {high}, got {value!r}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{key} must be an integer >= {low}, got {value!r}", param=key)
    return value


def decoding_overrides(
    temperature: float | None, top_p: float | None, max_tokens: int | None
) -> dict[str, Any]:
    """GenerationSettings overrides: temperature 0 or None keeps the model's default decoding, > 0 samples."""
    overrides: dict[str, Any] = {}
    if max_tokens is not None:
        overrides["max_new_tokens"] = max_tokens
    if temperature:
        overrides.update(num_beams=1, do_sample=True, temperature=temperature)
    if top_p is not None:
        if top_p <= 0:
            raise APIError(400, f"top_p must be > 0, got {top_p}", param="top_p")
        overrides["top_p"] = top_p
    return overrides


def _decode_audio_part(part: dict[str, Any], where: str) -> Any:
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise APIError(
            400, f"{where}.input_audio must be an object with data and format", param=f"{where}.input_audio"
        )
    fmt, data = audio.get("format"), audio.get("data")
    if fmt not in AUDIO_FORMATS:
        raise APIError(400, f"{where}.input_audio.format must be one of {list(AUDIO_FORMATS)}, got {fmt!r}",
                       param=f"{where}.input_audio.format")  # fmt: skip
    if not isinstance(data, str) or not data:
        raise APIError(
            400,
            f"{where}.input_audio.data must be a non-empty base64 string",
            param=f"{where}.input_audio.data",
        )
    if data.startswith("data:") and "," in data:  # a data URL
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{where}.input_audio.data is not valid base64", param=f"{where}.input_audio.data"
        ) from None
    try:
        return load_audio(raw, name=f"{where}.input_audio").samples
    except UserInputError as err:
        raise APIError(400, str(err), param=f"{where}.input_audio.data", code="invalid_audio") from None


def _read_messages(value: Any) -> tuple[list[Message], list[Any]]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list of message objects", param="messages")
    messages: list[Message] = []
    audio: list[Any] = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object, got {type(item).__name__}", param=where)
        role = item.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}, got {role!r}"
                           + (" (tool calls are not supported by this server yet)" if role in ("tool", "function") else ""),
                           param=f"{where}.role")  # fmt: skip
        if item.get("tool_calls") or item.get("function_call"):
            raise APIError(
                400, f"{where}: tool calls are not supported by this server yet", param=f"{where}.tool_calls"
            )
        texts, clips = _read_content(item.get("content"), where, allow_audio=role == "user")
        messages.append(Message(ROLES[role], "\n".join(texts), num_audio=len(clips)))
        audio += clips
    if messages[-1].role != "user":
        raise APIError(
            400, f"the last message must be a user turn, got {messages[-1].role}", param="messages"
        )
    return messages, audio


def _read_content(content: Any, where: str, allow_audio: bool) -> tuple[list[str], list[Any]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts, got {type(content).__name__}",
                       param=f"{where}.content")  # fmt: skip
    texts: list[str] = []
    clips: list[Any] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{at}.text must be a string", param=f"{at}.text")
            texts.append(part["text"])
        elif kind == "input_audio" and allow_audio:
            clips.append(_decode_audio_part(part, at))
        else:
            allowed = "text and input_audio" if allow_audio else "text"
            raise APIError(400, f"{at}: unsupported content part {kind!r}; this server reads {allowed} parts here",
                           param=f"{at}.type")  # fmt: skip
    return texts, clips


def read_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Check a chat completion request; raises APIError (400) naming the first bad field."""
    if body.get("tools"):
        raise APIError(400, "tool calls are not supported by this server yet; send the request without tools",
                       param="tools")  # fmt: skip
    modalities = body.get("modalities")
    if modalities is not None and (
        not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)
    ):
        raise APIError(400, "modalities must be a list of strings", param="modalities")
    if (modalities and "audio" in modalities) or body.get("audio") is not None:
        raise APIError(
            400, 'this model cannot speak: only the "text" output modality is supported', param="modalities"
        )
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise APIError(400, f"n must be 1 on this server (one answer per request), got {n}", param="n")
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise APIError(
            400, 'only response_format {"type": "text"} is supported by this server', param="response_format"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise APIError(400, f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise APIError(
            400,
            f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
            param="stop",
        )
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed", -(2**63))
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError(400, "model must be a string", param="model")
    messages, audio = _read_messages(body.get("messages"))
    overrides = decoding_overrides(
        _number(body, "temperature", 0, 2), _number(body, "top_p", 0, 1), max_tokens
    )
    return ChatRequest(messages, audio, overrides, None if seed is None else seed % 2**63, stops, bool(stream),
                       bool(options.get("include_usage")))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _timestamp(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def transcription_response(
    text: str, duration: float, response_format: str, language: str | None
) -> Response:
    """The transcript in ``response_format``.

    omnivox has no timestamps yet: ``verbose_json``, ``srt`` and ``vtt`` hold one segment covering
    the whole clip (0 to its duration). The segment's scores that Whisper reports and omnivox does
    not compute (``avg_logprob``, ``compression_ratio``, ``no_speech_prob``) are 0.0, and ``tokens``
    is empty; ``language`` is the request's, or "unknown" (omnivox does not detect it).
    """
    if response_format == "json":
        return JSONResponse({"text": text})
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "srt":
        return PlainTextResponse(f"1\n{_timestamp(0, ',')} --> {_timestamp(duration, ',')}\n{text}\n\n")
    if response_format == "vtt":
        return PlainTextResponse(f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(duration, '.')}\n{text}\n\n",
                                 media_type="text/vtt")  # fmt: skip
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": [], "temperature": 0.0,
               "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}  # fmt: skip
    return JSONResponse({"task": "transcribe", "language": language or "unknown", "duration": duration,
                         "text": text, "segments": [segment]})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The app


class BodyLimit:
    """ASGI middleware: refuses request bodies over ``max_bytes`` with a 413 (declared or streamed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await too_large.response()(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large  # answered by the app's APIError handler
            return message

        await self.app(scope, limited, send)


def create_app(
    assistant: Assistant, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The server's ASGI app answering with ``assistant`` as model ``model_name``.

    Args:
        assistant: the model and its steps.
        model_name: the model's id in ``/v1/models`` and in responses (the folder's name).
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_body_bytes: largest request body accepted (413 above it).
    """
    worker = ModelWorker(assistant)
    created_at = int(time.time())
    app = FastAPI(title="omnivox", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(UserInputError)
    async def _user_error(request: Request, err: UserInputError) -> JSONResponse:
        return APIError(400, " ".join(str(err).split())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return APIError(400, f"invalid request: {err.errors()}").response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error answering %s", request.url.path)
        return APIError(500, "internal server error", type="server_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created_at, "owned_by": "omnivox"}
        return {"object": "list", "data": [card]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = read_chat_request(_parse_json_body(await request.body()))
        prepared = await worker.run(prepare, assistant, chat)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            events = _stream(worker, prepared, chat, cid, created, model_name)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        answer = await worker.run(generate, assistant, prepared, chat.seed)
        cut = StopText(chat.stop)
        text = cut.feed(answer.text) + cut.flush()
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "stop" if cut.stopped else answer.finish_reason,
        }
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": [choice], "usage": _usage(prepared.prompt_tokens, len(answer.token_ids))})  # fmt: skip

    @v1.post("/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=20)
        except APIError:
            raise
        except Exception as err:  # malformed multipart bodies
            raise APIError(400, f"the request body is not a valid multipart form: {err}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "a multipart 'file' part with the audio is required", param="file")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        response_format = fields.get("response_format", "json")
        if response_format not in TRANSCRIPTION_FORMATS:
            raise APIError(400, f"response_format must be one of {list(TRANSCRIPTION_FORMATS)}, got {response_format!r}",
                           param="response_format")  # fmt: skip
        if fields.get("stream", "false").lower() == "true":
            raise APIError(400, "streamed transcriptions are not supported by this server", param="stream")
        try:
            temperature = float(fields.get("temperature", 0))
        except ValueError:
            raise APIError(
                400, f"temperature must be a number, got {fields['temperature']!r}", param="temperature"
            ) from None
        if not 0 <= temperature <= 1:
            raise APIError(400, f"temperature must be from 0 to 1, got {temperature}", param="temperature")
        try:
            clip = load_audio(await upload.read(), name=upload.filename or "file")
        except UserInputError as err:
            raise APIError(400, str(err), param="file", code="invalid_audio") from None
        message = Message("user", TRANSCRIBE_INSTRUCTION, num_audio=1)
        chat = ChatRequest(
            [message], [clip.samples], decoding_overrides(temperature, None, None), None, [], False, False
        )
        prepared = await worker.run(prepare, assistant, chat)
        answer = await worker.run(generate, assistant, prepared, None)
        return transcription_response(
            answer.text.strip(), clip.duration, response_format, fields.get("language")
        )

    app.include_router(v1)
    return app


async def _stream(
    worker: ModelWorker, chat: PreparedChat, request: ChatRequest, cid: str, created: int, model: str
) -> AsyncIterator[bytes]:
    """SSE chunks: the role, the text as it is decoded, the finish reason, (usage), ``[DONE]``.

    A generation that fails after the response began ends the stream with an error event. A client
    that goes away does not stop the generation already running (it finishes in its thread).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def job() -> None:
        try:
            put("done", generate(worker.assistant, chat, request.seed, lambda piece: put("text", piece)))
        except Exception as err:  # reported to the client below
            put("error", err)

    task = asyncio.ensure_future(worker.run(job))
    yield _sse(_chunk(cid, created, model, {"role": "assistant", "content": ""}, None))
    cut = StopText(request.stop)
    while True:
        kind, value = await queue.get()
        if kind == "text":
            piece = cut.feed(value)
            if piece:
                yield _sse(_chunk(cid, created, model, {"content": piece}, None))
            continue
        if kind == "error":
            if not isinstance(value, UserInputError):
                log.error("generation failed", exc_info=value)
            err = (
                APIError(400, str(value))
                if isinstance(value, UserInputError)
                else APIError(500, "internal server error", type="server_error")
            )
            yield _sse(err.body())
            break
        rest = cut.flush()
        if rest:
            yield _sse(_chunk(cid, created, model, {"content": rest}, None))
        finish = "stop" if cut.stopped else value.finish_reason
        yield _sse(_chunk(cid, created, model, {}, finish))
        if request.include_usage:
            usage = _usage(chat.prompt_tokens, len(value.token_ids))
            yield _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        break
    yield _sse("[DONE]")
    await task


def serve(
    assistant: Assistant,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(assistant, model_name, api_key=api_key), host=host, port=port, log_level="info")
