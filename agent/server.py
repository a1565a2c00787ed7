"""An OpenAI-compatible HTTP server over an :class:`~omnivox.agent.assistant.Assistant` (``omnivox serve``).

Endpoints:

- ``POST /v1/chat/completions``: text, ``input_audio`` and ``audio_url`` (data: URLs) content
  parts, multi-turn, ``n`` answers, tools (``tools``, ``tool_choice``, ``tool`` turns),
  ``response_format`` (``json_schema``, ``json_object``), streaming (SSE), spoken answers
  (``modalities: ["text", "audio"]`` with ``audio: {"voice", "format"}``, when the model folder
  can speak).
- ``POST /v1/audio/speech``: text in, audio out in one of the model's voices.
- ``POST /v1/audio/transcriptions``: multipart upload, answered by asking "Transcribe the speech."
  (so the assistant's transcription step answers it).
- ``GET /v1/models``: the one model, named after its folder.
- ``GET /health``: answers while a generation runs. ``GET /metrics``: Prometheus text format
  (requests by endpoint and status, latency, queue depth, tokens generated, batch sizes). Neither
  needs the API key; neither shows anything a request carried.

Every bad input is a 4xx in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.

How requests meet the model (:class:`Batcher`): the model is not thread-safe, so one worker thread
does all model work, speaking included. Requests queue for it; the worker takes the oldest, waits up
to ``batch_window_ms`` for others that decode alike (same settings; not streamed, not seeded) and
answers up to ``max_batch_size`` answers in one batch (``Assistant.generate`` takes a batch); a
speech request runs alone. A full queue answers 429 with ``Retry-After``; a request not answered
within ``request_timeout`` answers 504. A client that goes away is dropped from the queue, and a
streamed answer stops generating at its next token (or its next piece of audio); a batch already
running for others finishes.

Speech (the folder has a ``talker/``; otherwise asking for audio is a 400 that says the model cannot
speak). What OpenAI's API does and omnivox does differently, on purpose:

- voices are the model's own (``kokoro:jf_gongitsune``, or the part after ``engine:``, ``joe``);
  OpenAI's names (``alloy``, ...) are refused with the list, since no voice here sounds like them.
  ``{"id": name}`` is read like ``name``; no voice means the folder's default voice.
- ``/v1/audio/speech`` formats: ``mp3`` (the default, as OpenAI's), ``opus`` (Ogg Opus), ``flac``,
  ``wav`` (16-bit) and ``pcm`` (raw 16-bit little-endian mono at the codec's rate, which the
  ``Content-Type`` names, e.g. ``audio/pcm;rate=16000``; OpenAI's is 24 kHz). ``pcm`` streams as it
  is spoken; the other formats are sent once complete. ``aac``, ``stream_format: "sse"`` and
  non-empty ``instructions`` (the voices cannot be steered by text) are refused with a 400.
- chat answers with audio keep their text in ``content`` (OpenAI sets it null) and in
  ``audio.transcript``; ``audio.data`` is the answer in ``audio.format`` (wav, mp3, flac, opus,
  pcm16), base64. The server keeps no audio: ``expires_at`` is the time of the answer, and an
  assistant turn sent back with only ``audio: {"id"}`` is refused (send the transcript as
  content). Answers that are tool calls, or have nothing speakable in them, have no audio.
  Streamed, the audio is ``pcm16`` only (as OpenAI streams it): after the text, a ``delta.audio``
  chunk carries the ``id`` and ``transcript``, then chunks carry base64 ``data`` pieces as they
  are spoken, then one carries ``expires_at``; the finish reason follows.

Not supported, and refused with a 400 that says so rather than ignored: ``logprobs``, and
``audio_url`` parts that are not ``data:`` URLs (this server never fetches). The request's
``model`` is not checked: any name is answered by the one model, whose name the response carries.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import anyio.to_thread
import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnivox.agent.assistant import Assistant, offer_tools
from omnivox.agent.audio import base64_bytes, data_url_bytes, load_audio
from omnivox.agent.constrained import TOOL_CHOICES, AnswerFormat, answer_grammar
from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.streaming import StopText
from omnivox.agent.tools import Tool
from omnivox.agent.web import add_web_routes
from omnivox.agent.workspace import audio_bytes
from omnivox.decoders.speech import MAX_TEXT_CHARS, SpeechHead, SpokenAudio
from omnivox.errors import UserInputError
from omnivox.prompts import Message, ToolSpec, calls_text, result_text, tools_text

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 25 * 1024 * 1024  # OpenAI's limit for audio uploads
MAX_STOP_STRINGS = 4
MAX_TOOLS = 128  # OpenAI's limit
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
TRANSCRIBE_INSTRUCTION = "Transcribe the speech."
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# OpenAI's "developer" role is its newer name for the system role
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# the paths /metrics counts by name; any other path is counted as "other" (a scanner's guesses
# must not grow one time series per path)
METRIC_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
)
# Spoken audio out, by the name a request gives -> its Content-Type. Files are written by
# agent/workspace.py's audio_bytes; "pcm" is raw 16-bit little-endian mono PCM at the codec's rate.
SPEECH_FORMATS = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
CHAT_AUDIO_FORMATS = {
    "wav": "wav",
    "mp3": "mp3",
    "flac": "flac",
    "opus": "opus",
    "pcm16": "pcm",
}  # -> SPEECH_FORMATS
MODALITIES = ("text", "audio")
UNSPEAKABLE = "nothing speakable"  # how decoders/phonemes.py's error for such text begins
CANNOT_SPEAK = "this model cannot speak: its folder has no talker/ (speech head); it answers in text only"


@dataclass(frozen=True)
class ServerLimits:
    """How much the server takes on (``omnivox serve`` flags of the same names).

    Attributes:
        max_batch_size: most answers decoded in one batch (``n`` counts each answer).
        batch_window_ms: how long the oldest waiting request waits for company to batch with.
        max_queue: most requests waiting for the model; more are answered 429.
        request_timeout: seconds from arrival to the end of the answer; later is 504.
        max_audio_seconds: longest clip accepted (per clip).
        max_tokens: largest ``max_tokens`` a request may ask for.
        max_body_bytes: largest request body (413 above it).
    """

    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 64
    request_timeout: float = 300.0
    max_audio_seconds: float = 600.0
    max_tokens: int = 2048
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "batch_window_ms" else 1
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < low
            ):
                raise UserInputError(f"{f.name} must be a number >= {low}, got {value!r}")


class APIError(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer", **self.headers} if self.status == 401 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (error messages echo what a client sent)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------
# Reading requests


@dataclass
class ChatRequest:
    """A checked chat request: the conversation (clips still as samples) and how to answer."""

    messages: list[Message]
    audio: list[np.ndarray]  # [S] float32 16 kHz samples per clip, in order of appearance
    overrides: dict[str, Any]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    answer_format: AnswerFormat | None = None
    parallel_tool_calls: bool = True
    audio_out: AudioOut | None = None  # speak the answers (``modalities`` with "audio")


@dataclass(frozen=True)
class AudioOut:
    """How to speak: a voice the speech head has (its full name), a ``SPEECH_FORMATS`` key, the speed."""

    voice: str
    format: str
    speed: float = 1.0


@dataclass(frozen=True)
class SpeechRequest:
    """A checked ``/v1/audio/speech`` request: the text and how to speak it."""

    text: str
    out: AudioOut


def _parse_json_body(raw: bytes) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not a JSON value")

    try:
        body = json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, nesting, NaN
        reason = "it is nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number from {low} to {high}, got {_show(value)}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{key} must be an integer >= {low}, got {_show(value)}", param=key)
    if high is not None and value > high:
        raise APIError(400, f"{key} must be at most {high} on this server, got {value}", param=key)
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


def load_clip(raw: bytes, name: str, max_seconds: float, param: str) -> tuple[np.ndarray, float]:
    """Decode one uploaded clip: its [S] float32 16 kHz samples and duration; 400 if unusable or too long."""
    try:
        clip = load_audio(raw, name=name, max_seconds=max_seconds)
    except UserInputError as err:
        message = " ".join(str(err).split())
        if "over the limit of max_seconds" in message:  # say it in the server's terms
            message = f"{message.split(', over the limit')[0]}, over this server's limit of {max_seconds:g} s per clip"
            raise APIError(400, message, param=param, code="audio_too_long") from None
        raise APIError(400, message, param=param, code="invalid_audio") from None
    return clip.samples, clip.duration


def _audio_bytes(data: Any, param: str) -> bytes:
    """The file bytes of base64 text or a base64 ``data:`` URL; 400 naming ``param`` if unusable."""
    try:
        if isinstance(data, str) and data[:5].lower() == "data:":
            return data_url_bytes(data, param)[0]
        return base64_bytes(data, param)
    except UserInputError as err:
        raise APIError(400, str(err), param=param) from None


def _decode_audio_part(part: dict[str, Any], where: str, max_seconds: float) -> np.ndarray:
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise APIError(
            400, f"{where}.input_audio must be an object with data and format", param=f"{where}.input_audio"
        )
    fmt = audio.get("format")
    if fmt not in AUDIO_FORMATS:
        raise APIError(400, f"{where}.input_audio.format must be one of {list(AUDIO_FORMATS)}, got {_show(fmt)}",
                       param=f"{where}.input_audio.format")  # fmt: skip
    param = f"{where}.input_audio.data"  # base64, or a data URL
    return load_clip(_audio_bytes(audio.get("data"), param), f"{where}.input_audio", max_seconds, param)[0]


def _decode_audio_url_part(part: dict[str, Any], where: str, max_seconds: float) -> np.ndarray:
    """vLLM's ``{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}``."""
    param = f"{where}.audio_url.url"
    audio = part.get("audio_url")
    url = audio.get("url") if isinstance(audio, dict) else None
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}.audio_url must be an object with a url (a data: URL)", param=param)
    if url[:5].lower() != "data:":  # URL schemes are case-insensitive
        scheme = url.split(":", 1)[0] if ":" in url[:16] else "no scheme"
        raise APIError(400, f"{param}: only data URLs (data:audio/...;base64,...) are accepted; this server never "
                            f"fetches URLs, got one with {_show(scheme, 20)}", param=param, code="invalid_url")  # fmt: skip
    return load_clip(_audio_bytes(url, param), f"{where}.audio_url", max_seconds, param)[0]


def _read_content(
    content: Any, where: str, allow_audio: bool, max_seconds: float
) -> tuple[list[str], list[np.ndarray]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts, got {type(content).__name__}",
                       param=f"{where}.content")  # fmt: skip
    texts: list[str] = []
    clips: list[np.ndarray] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{at}.text must be a string", param=f"{at}.text")
            texts.append(part["text"])
        elif kind == "input_audio" and allow_audio:
            clips.append(_decode_audio_part(part, at, max_seconds))
        elif kind == "audio_url" and allow_audio:
            clips.append(_decode_audio_url_part(part, at, max_seconds))
        else:
            allowed = "text, input_audio and audio_url" if allow_audio else "text"
            raise APIError(400, f"{at}: unsupported content part {_show(kind, 40)}; this server reads {allowed} parts here",
                           param=f"{at}.type")  # fmt: skip
    return texts, clips


def _read_calls(value: Any, where: str, names: dict[str, str]) -> str:
    """An assistant turn's ``tool_calls`` as the model writes them; records each call's id -> name in ``names``."""
    if not isinstance(value, list) or not value:
        raise APIError(
            400, f"{where}.tool_calls must be a non-empty list of calls", param=f"{where}.tool_calls"
        )
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(function, dict)
        ):
            raise APIError(
                400,
                f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}',
                param=at,
            )
        call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        if not isinstance(call_id, str) or not call_id:
            raise APIError(400, f"{at}.id must be a non-empty string", param=f"{at}.id")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{at}.function.name must be a non-empty string", param=f"{at}.function.name")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            raise APIError(400, f"{at}.function.arguments must be a JSON object encoded as a string, got {_show(arguments)}",
                           param=f"{at}.function.arguments")  # fmt: skip
        names[call_id] = name
        calls.append((name, parsed))
    return calls_text(calls)


def _read_voice(value: Any, param: str, speech: SpeechHead) -> str:
    """The full name of the voice a request names (``name`` or ``{"id": name}``; None: the default)."""
    if value is None:
        return speech.default_voice
    name = value.get("id") if isinstance(value, dict) else value
    if not isinstance(name, str) or not name:
        raise APIError(400, f'{param} must be a voice name or {{"id": name}}, got {_show(value)}; this model speaks '
                            f"with {speech.voices_shown()}", param=param, code="invalid_voice")  # fmt: skip
    try:
        return speech.voices[speech.voice_id(name)]
    except UserInputError as err:  # names the voices there are
        raise APIError(400, f"{param}: {err}", param=param, code="invalid_voice") from None


def read_speech_request(body: dict[str, Any], speech: SpeechHead | None) -> SpeechRequest:
    """Check a ``/v1/audio/speech`` request; raises APIError (400) naming the first bad field."""
    if speech is None:
        raise APIError(400, CANNOT_SPEAK, param="model", code="model_cannot_speak")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError(400, "model must be a string", param="model")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise APIError(
            400, f"input must be a non-empty string (the text to speak), got {_show(text)}", param="input"
        )
    if len(text) > MAX_TEXT_CHARS:
        raise APIError(400, f"input is {len(text)} characters, over the limit of {MAX_TEXT_CHARS}", param="input",
                       code="string_above_max_length")  # fmt: skip
    fmt = body.get("response_format")
    fmt = "mp3" if fmt is None else fmt
    if fmt not in SPEECH_FORMATS:
        raise APIError(400, f"response_format must be one of {list(SPEECH_FORMATS)} (mp3 by default), got {_show(fmt)}",
                       param="response_format")  # fmt: skip
    stream_format = body.get("stream_format")
    if stream_format not in (None, "audio"):
        raise APIError(400, f"stream_format must be 'audio' on this server (pcm streams as it is spoken; 'sse' is not "
                            f"supported), got {_show(stream_format)}", param="stream_format")  # fmt: skip
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, f"instructions must be a string, got {_show(instructions)}", param="instructions")
    if instructions and instructions.strip():
        raise APIError(400, "instructions are not supported: this model's voices cannot be steered by text; choose "
                            f"voice and speed instead. Voices: {speech.voices_shown()}", param="instructions")  # fmt: skip
    speed = _number(body, "speed", 0.25, 4.0)
    voice = _read_voice(body.get("voice"), "voice", speech)
    return SpeechRequest(text, AudioOut(voice, fmt, 1.0 if speed is None else speed))


def _read_audio_out(body: dict[str, Any], speech: SpeechHead | None, stream: bool) -> AudioOut | None:
    """How a chat request wants its answers spoken (``modalities``, ``audio``), or None for text only."""
    modalities = body.get("modalities")
    if modalities is not None and (
        not isinstance(modalities, list) or not all(m in MODALITIES for m in modalities)
    ):
        raise APIError(400, f"modalities must be a list of {list(MODALITIES)}, got {_show(modalities)}",
                       param="modalities")  # fmt: skip
    audio = body.get("audio")
    if not modalities or "audio" not in modalities:
        if audio is not None:
            raise APIError(400, 'audio is given but modalities does not ask for "audio": send modalities ["text", "audio"]',
                           param="modalities")  # fmt: skip
        return None
    if speech is None:
        raise APIError(400, f'{CANNOT_SPEAK} (drop "audio" from modalities)', param="modalities",
                       code="model_cannot_speak")  # fmt: skip
    if not isinstance(audio, dict):
        raise APIError(400, f'modalities asks for "audio": audio must be {{"voice", "format"}}, got {_show(audio)}',
                       param="audio")  # fmt: skip
    fmt = audio.get("format")
    if fmt not in CHAT_AUDIO_FORMATS:
        raise APIError(400, f"audio.format must be one of {list(CHAT_AUDIO_FORMATS)}, got {_show(fmt)}",
                       param="audio.format")  # fmt: skip
    if stream and fmt != "pcm16":
        raise APIError(400, f"a streamed answer is spoken as pcm16 (raw 16-bit PCM at {speech.sample_rate} Hz, as "
                            f"OpenAI streams audio), got audio.format {_show(fmt)}", param="audio.format")  # fmt: skip
    return AudioOut(_read_voice(audio.get("voice"), "audio.voice", speech), CHAT_AUDIO_FORMATS[fmt])


def _read_messages(value: Any, max_seconds: float) -> tuple[list[Message], list[np.ndarray]]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list of message objects", param="messages")
    messages: list[Message] = []
    audio: list[np.ndarray] = []
    call_names: dict[str, str] = {}  # tool call id -> tool name, from the assistant turns so far
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object, got {type(item).__name__}", param=where)
        role = item.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}, got {_show(role, 40)}",
                           param=f"{where}.role")  # fmt: skip
        if item.get("function_call") is not None:
            raise APIError(400, f"{where}: function_call (the deprecated form) is not supported; send tool_calls",
                           param=f"{where}.function_call")  # fmt: skip
        if role == "assistant" and item.get("tool_calls") is not None:
            messages.append(Message("assistant", _read_calls(item["tool_calls"], where, call_names)))
            continue
        if role == "assistant" and item.get("content") is None and item.get("audio") is not None:
            raise APIError(400, f"{where}: this server keeps no spoken answers, so an assistant turn cannot be named by "
                                "its audio id; send the answer's transcript as content", param=f"{where}.audio")  # fmt: skip
        if role == "assistant" and item.get("content") is None:
            raise APIError(
                400, f"{where}: an assistant turn needs content or tool_calls", param=f"{where}.content"
            )
        texts, clips = _read_content(item.get("content"), where, role == "user", max_seconds)
        text = "\n".join(texts)
        if role == "tool":
            call_id = item.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_names:
                known = sorted(call_names)[:10]
                raise APIError(400, f"{where}.tool_call_id {_show(call_id, 60)} names no tool call of an earlier "
                                    f"assistant turn; the calls so far are {known}", param=f"{where}.tool_call_id")  # fmt: skip
            text = result_text(call_names[call_id], text)
        messages.append(Message(ROLES[role], text, num_audio=len(clips)))
        audio += clips
    if messages[-1].role not in ("user", "tool"):
        raise APIError(
            400, f"the last message must be a user or tool turn, got {messages[-1].role}", param="messages"
        )
    return messages, audio


def _read_tools(value: Any) -> list[ToolSpec]:
    if not isinstance(value, list):
        raise APIError(
            400, f"tools must be a list of function tools, got {type(value).__name__}", param="tools"
        )
    if len(value) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools may be offered, got {len(value)}", param="tools")
    specs: list[ToolSpec] = []
    for i, definition in enumerate(value):
        try:
            spec = Tool.from_openai(definition).spec()
            # the prompt's line for the tool reads the schema's types: a schema it cannot read is refused here
            tools_text([spec])
        except UserInputError as err:
            raise APIError(400, f"tools[{i}]: {err}", param=f"tools[{i}]") from None
        except Exception as err:  # a valid JSON schema the prompt cannot describe (e.g. boolean subschemas)
            raise APIError(400, f"tools[{i}]: this server cannot describe the parameters schema ({type(err).__name__})",
                           param=f"tools[{i}].function.parameters") from None  # fmt: skip
        specs.append(spec)
    return specs


def _read_tool_choice(value: Any, specs: Sequence[ToolSpec]) -> str:
    if value is None:
        return "auto"
    if isinstance(value, str) and value in TOOL_CHOICES:
        return value
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise APIError(400, f'tool_choice must be one of {list(TOOL_CHOICES)} or {{"type": "function", "function": '
                            f'{{"name": ...}}}}, got {_show(value)}', param="tool_choice")  # fmt: skip
    offered = [s.name for s in specs]
    if name not in offered:
        raise APIError(400, f"tool_choice names {_show(name, 70)}, which is not among the tools offered {offered[:20]}",
                       param="tool_choice")  # fmt: skip
    return name


def _read_response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema a text answer must follow, or None for plain text."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise APIError(400, f'response_format must be {{"type": "text" | "json_object" | "json_schema"}}, got {_show(value)}',
                       param="response_format")  # fmt: skip
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(400, 'response_format json_schema must be {"name", "schema", "strict"}',
                       param="response_format.json_schema")  # fmt: skip
    if schema is None:
        return {"type": "object"}
    if not isinstance(schema, dict):
        raise APIError(400, f"response_format.json_schema.schema must be a JSON schema object, got {type(schema).__name__}",
                       param="response_format.json_schema.schema")  # fmt: skip
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise APIError(400, f"response_format.json_schema.schema is not a valid JSON schema: {err.message[:200]}",
                       param="response_format.json_schema.schema") from None  # fmt: skip
    except Exception as err:  # unknown $schema dialects, unresolvable references, nesting
        raise APIError(400, f"response_format.json_schema.schema cannot be checked ({type(err).__name__})",
                       param="response_format.json_schema.schema") from None  # fmt: skip
    return schema


def _read_answer_format(body: dict[str, Any]) -> AnswerFormat | None:
    tools = body.get("tools")
    specs = _read_tools(tools) if tools is not None else []
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise APIError(
            400,
            "functions/function_call (the deprecated form) are not supported; send tools",
            param="functions",
        )
    tool_choice = _read_tool_choice(body.get("tool_choice"), specs)
    if tool_choice == "required" and not specs:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    schema = _read_response_format(body.get("response_format"))
    if not specs and schema is None:
        return None
    try:
        answer_grammar(specs, tool_choice, schema)  # duplicate names, and what the grammar writer refuses
        return AnswerFormat(tuple(specs), tool_choice, schema)
    except UserInputError as err:
        raise APIError(400, str(err), param="tools" if specs else "response_format") from None
    except Exception as err:
        raise APIError(400, f"cannot constrain the answer to these tools/schema ({type(err).__name__}: {str(err)[:200]})",
                       param="tools" if specs else "response_format") from None  # fmt: skip


def read_chat_request(
    body: dict[str, Any], limits: ServerLimits = ServerLimits(), speech: SpeechHead | None = None
) -> ChatRequest:
    """Check a chat completion request (and decode its audio); raises APIError (400) naming the first bad field.

    ``speech``: the model's speech head (None: it cannot speak, and asking for audio is refused).
    """
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise APIError(400, f"stream must be a boolean, got {_show(stream)}", param="stream")
    audio_out = _read_audio_out(body, speech, bool(stream))
    n = _integer(body, "n", 1, limits.max_batch_size) or 1
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool | None):
        raise APIError(
            400, f"parallel_tool_calls must be a boolean, got {_show(parallel)}", param="parallel_tool_calls"
        )
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
    max_tokens = _integer(body, "max_completion_tokens", 1, limits.max_tokens)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1, limits.max_tokens)
    seed = _integer(body, "seed", -(2**63))
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError(400, "model must be a string", param="model")
    answer_format = _read_answer_format(body)
    temperature = _number(body, "temperature", 0, 2)
    if n > 1 and temperature is None:
        temperature = 1.0  # OpenAI's default: n answers are n samples
    overrides = decoding_overrides(temperature, _number(body, "top_p", 0, 1), max_tokens)
    messages, audio = _read_messages(body.get("messages"), limits.max_audio_seconds)
    return ChatRequest(messages, audio, overrides, None if seed is None else seed % 2**63, stops, bool(stream),
                       bool(options.get("include_usage")), n, answer_format, parallel is not False, audio_out)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The model: one worker thread, requests batched


class Cancelled(Exception):
    """A job's client went away or its time ran out; raised in the worker to stop generating."""


class StreamCut(Exception):
    """A streamed response failed after it began: raised out of the response to cut the connection."""


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"{depth} requests waiting")
        self.depth = depth
        self.retry_after = retry_after


@dataclass
class JobResult:
    answers: list[Generation]  # one per copy (``n``)
    prompt_tokens: int
    audio_tokens: int


@dataclass(eq=False)
class Job:
    """One request's model work: ``n`` answers to one conversation.

    ``notify(kind, value)`` is called from the worker thread: ("ready", None) once the clips are
    encoded and the prompt checked, ("text", piece) for each streamed piece (``stream``),
    then ("done", JobResult) or ("error", exception). With ``speak``, the answers are then spoken:
    ("audio", (answer index, [n] float32 samples)) for each piece as it is made (``stream``),
    then ("spoken", [SpokenAudio or None per answer]) or ("error", exception).
    """

    messages: list[Message]
    audio: list[np.ndarray]
    settings: GenerationSettings
    notify: Callable[[str, Any], None]
    answer_format: AnswerFormat | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    fit_tokens: bool = False  # max_new_tokens is the folder's default: shorten it to fit the context
    speak: AudioOut | None = None  # speak each answer's text (as cut at ``stop``)
    stop: tuple[str, ...] = ()
    deadline: float = math.inf  # time.monotonic() by which the answer is due
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a batch; None: this job runs alone.

        A streamed answer is sent token by token, which the model does for a batch of one; a
        seeded one must draw the same numbers as when alone.
        """
        if (self.stream and self.n == 1) or self.seed is not None:
            return None
        return (self.settings,)


@dataclass(eq=False)
class SpeechJob:
    """One ``/v1/audio/speech`` request's model work: ``text`` spoken as ``out`` says (always alone).

    ``notify`` gets ("audio", (0, [n] float32 samples)) for each piece as it is made (``stream``),
    then ("done", SpokenAudio) or ("error", exception).
    """

    text: str
    out: AudioOut
    notify: Callable[[str, Any], None]
    stream: bool = False
    n: int = 1  # answers, as the queue counts them
    deadline: float = math.inf
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def batch_key(self) -> None:
        return None


@dataclass
class PreparedJob:
    job: Job
    clips: list[Any]  # EncodedClip per clip
    settings: GenerationSettings
    prompt_tokens: int
    audio_tokens: int


class Batcher:
    """The queue in front of the model and the one thread that works the model.

    Args:
        assistant: the model and its steps (used from the worker thread only).
        limits: batch size, batch window, queue bound.
        on_batch: called with each batch's size in answers and the tokens it generated (metrics).
    """

    def __init__(
        self, assistant: Assistant, limits: ServerLimits, on_batch: Callable[[int, int], None] | None = None
    ) -> None:
        self.assistant = assistant
        self.limits = limits
        self.on_batch = on_batch
        self._pending: collections.deque[Job | SpeechJob] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # how long a batch takes (running average): about when a full queue next has room (Retry-After)
        self._seconds_per_batch = 1.0
        llm_config = getattr(assistant.model.llm, "config", None)
        self.context = getattr(llm_config, "max_position_embeddings", None)

    @property
    def depth(self) -> int:
        """Requests waiting (not started)."""
        return len(self._pending)

    def check_room(self) -> None:
        """Raise QueueFull when ``max_queue`` requests already wait."""
        depth = len(self._pending)
        if depth >= self.limits.max_queue:
            raise QueueFull(depth, max(1, math.ceil(self._seconds_per_batch)))

    def submit(self, job: Job | SpeechJob) -> None:
        """Queue ``job``; raises QueueFull when ``max_queue`` requests already wait."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self.check_room()
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="omnivox-model", daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self, job: Job | SpeechJob) -> None:
        """Drop ``job`` from the queue, or stop its streamed answer at the next token or piece of audio
        (no-op once done)."""
        job.cancelled.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the worker thread
    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as err:  # a bug: every job of the batch hears of it, the worker lives on
                log.exception("model worker failed")
                for job in batch:
                    job.notify("error", err)

    def _take(self) -> list[Job | SpeechJob] | None:
        """The next batch: the oldest job and compatible ones that arrive within the window."""
        window = self.limits.batch_window_ms / 1000
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._pending[0]
                key = first.batch_key()
                if key is None:
                    self._pending.popleft()
                    return [first]
                while True:
                    mates = self._mates(first, key)
                    left = first.arrived + window - time.monotonic()
                    if (
                        sum(j.n for j in mates) >= self.limits.max_batch_size
                        or left <= 0
                        or first not in self._pending
                    ):
                        break
                    self._cond.wait(left)
                if first not in self._pending:  # cancelled while waiting
                    continue
                for job in mates:
                    self._pending.remove(job)
                return mates

    def _mates(self, first: Job, key: tuple) -> list[Job | SpeechJob]:
        mates, size = [first], first.n
        for job in self._pending:
            if job is not first and job.batch_key() == key and size + job.n <= self.limits.max_batch_size:
                mates.append(job)
                size += job.n
        return mates

    def _run(self, batch: list[Job | SpeechJob]) -> None:
        start = time.monotonic()
        if isinstance(batch[0], SpeechJob):  # its batch key is None: it comes alone
            self._say(batch[0])
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.monotonic() - start)
            return
        ready = []
        for job in batch:
            job.started = True
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                job.notify("error", Cancelled())
                continue
            try:
                ready.append(self._prepare(job))
            except Exception as err:
                if not isinstance(err, UserInputError):
                    log.exception("preparing a request failed")
                job.notify("error", err)
                continue
            job.notify("ready", None)
        groups: dict[GenerationSettings, list[PreparedJob]] = {}
        for item in ready:  # settings may differ after fitting max_new_tokens to the context
            groups.setdefault(item.settings, []).append(item)
        for items in groups.values():
            self._generate(items, isolate=len(items) > 1)
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.monotonic() - start)

    def _prepare(self, job: Job) -> PreparedJob:
        """Encode the job's clips and check its prompt against the context (in the worker thread)."""
        assistant = self.assistant
        clips = [assistant.encode_clip(samples) for samples in job.audio]
        fmt = job.answer_format
        seen = offer_tools(job.messages, fmt.tools) if fmt is not None and fmt.offers_tools else job.messages
        prompt = assistant.model.processor.tokenize(
            seen, [c.num_tokens for c in clips]
        )  # checks the turn order
        prompt_tokens = int(prompt.input_ids.shape[0])
        audio_tokens = sum(c.num_tokens for c in clips)
        settings = job.settings
        if self.context is not None:
            room = self.context - prompt_tokens
            if job.fit_tokens and 1 <= room < settings.max_new_tokens:
                settings = replace(settings, max_new_tokens=room)
            elif room < settings.max_new_tokens:
                prompt = f"the prompt is {prompt_tokens} tokens ({audio_tokens} of them audio)"
                if job.fit_tokens:
                    raise UserInputError(
                        f"{prompt}: no room is left in the model's context of {self.context} tokens"
                    )
                raise UserInputError(f"{prompt} and max_tokens is {settings.max_new_tokens}: "
                                     f"{prompt_tokens + settings.max_new_tokens} is over the model's context of "
                                     f"{self.context} tokens")  # fmt: skip
        if fmt is not None and fmt.constrained:
            # compiles (and caches) the grammar here: a schema it cannot take is the request's fault
            try:
                assistant.model.constraint([fmt])
            except UserInputError:
                raise
            except Exception as err:
                raise UserInputError(
                    f"cannot constrain the answer to these tools/schema: {str(err)[:300]}"
                ) from None
        return PreparedJob(job, clips, settings, prompt_tokens, audio_tokens)

    def _generate(self, items: list[PreparedJob], isolate: bool) -> None:
        """Answer ``items`` in one batch; if that fails and ``isolate``, each alone (one bad request fails alone)."""
        conversations, audio, formats = [], [], []
        for item in items:
            conversations += [item.job.messages] * item.job.n
            audio += [item.clips] * item.job.n
            formats += [item.job.answer_format] * item.job.n
        job = items[0].job
        on_text = self._streamer(job) if len(items) == 1 and job.stream and job.n == 1 else None
        settings = items[0].settings
        if on_text is not None and settings.num_beams != 1:
            on_text = None  # beam search cannot stream token by token: the answer goes out whole when done
        try:
            if job.seed is not None:
                torch.manual_seed(job.seed)
            answers = self.assistant.generate(conversations, audio, settings, on_text, formats=formats)
        except Exception as err:
            if isolate:
                for item in items:
                    self._generate([item], isolate=False)
                return
            if not isinstance(err, UserInputError | Cancelled):
                log.exception("generation failed")
            job.notify("error", err)
            return
        if self.on_batch is not None:
            self.on_batch(len(answers), sum(len(a.token_ids) for a in answers))
        shares, at = [], 0
        for item in items:
            shares.append((item.job, answers[at : at + item.job.n]))
            at += item.job.n
            item.job.notify("done", JobResult(shares[-1][1], item.prompt_tokens, item.audio_tokens))
        for job, own in shares:  # every text answer is out before any is spoken
            if job.speak is not None:
                self._speak_answers(job, own)

    def _speak_answers(self, job: Job, answers: list[Generation]) -> None:
        """Speak each answer of ``job`` that is text; notifies ("spoken", [SpokenAudio | None]) or an error.

        An answer with nothing speakable in it (only symbols, say) stays silent, like an empty one.
        """
        assert job.speak is not None
        spoken: list[SpokenAudio | None] = []
        for i, answer in enumerate(answers):
            text = spoken_text(answer, job.stop)
            try:
                spoken.append(None if text is None else self._spoken(job, i, text, job.speak))
            except UserInputError as err:
                message = " ".join(str(err).split())
                if message.startswith(UNSPEAKABLE):
                    spoken.append(None)
                    continue
                job.notify("error", APIError(400, f"choice {i}: cannot speak the answer ({len(text or '')} characters): "
                                                  f"{message}; ask for fewer max_tokens", param="max_tokens"))  # fmt: skip
                return
            except Exception as err:
                job.notify("error", err)
                return
        job.notify("spoken", spoken)

    def _say(self, job: SpeechJob) -> None:
        job.started = True
        if job.cancelled.is_set() or time.monotonic() > job.deadline:
            job.notify("error", Cancelled())
            return
        try:
            job.notify("done", self._spoken(job, 0, job.text, job.out))
        except UserInputError as err:  # nothing speakable, or too long for the talker
            message = " ".join(str(err).split())
            job.notify("error", APIError(400, f"cannot speak the input ({len(job.text)} characters): {message}",
                                         param="input"))  # fmt: skip
        except Exception as err:
            job.notify("error", err)

    def _spoken(self, job: Job | SpeechJob, index: int, text: str, out: AudioOut) -> SpokenAudio:
        """``text`` spoken; each piece goes out as ("audio", (index, samples)) when ``job.stream``.

        Raises Cancelled when the job is cancelled or past its deadline (checked at every piece),
        UserInputError when the text cannot be spoken (nothing speakable in it, or too long).
        """

        def on_audio(samples: np.ndarray) -> None:
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                raise Cancelled()
            if job.stream:
                job.notify("audio", (index, samples))

        try:
            audio = self.assistant.say(text, out.voice, on_audio=on_audio, speed=out.speed).audio
        except (UserInputError, Cancelled):
            raise
        except Exception:
            log.exception("speaking failed")
            raise
        assert audio is not None
        return audio

    @staticmethod
    def _streamer(job: Job) -> Callable[[str], None]:
        def on_text(piece: str) -> None:
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                raise Cancelled()
            job.notify("text", piece)

        return on_text


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process do not mix)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("omnivox_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("omnivox_request_duration_seconds", "Time from request to the end of the response",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))  # fmt: skip
        self.queue = Gauge("omnivox_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.tokens = Counter(
            "omnivox_generated_tokens", "Tokens the model generated", registry=self.registry
        )
        self.batch = Histogram("omnivox_batch_size", "Answers decoded per batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))  # fmt: skip

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth()`` at each scrape."""
        self.queue.set_function(depth)

    def on_batch(self, size: int, tokens: int) -> None:
        self.batch.observe(size)
        self.tokens.inc(tokens)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware: counts each response by endpoint and status, and times it to its last byte."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in METRIC_ENDPOINTS else "/static" if path.startswith("/static/") else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Writing responses


def _usage(result: JobResult) -> dict[str, Any]:
    completion = sum(len(a.token_ids) for a in result.answers)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
        "prompt_tokens_details": {"audio_tokens": result.audio_tokens, "cached_tokens": 0},
    }


def _tool_calls(answer: Generation, parallel: bool) -> list[dict[str, Any]]:
    calls = answer.tool_calls if parallel else answer.tool_calls[:1]
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json()}}
            for c in calls]  # fmt: skip


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was met."""
    cut = StopText(list(stop))
    return cut.feed(text) + cut.flush(), cut.stopped


def spoken_text(answer: Generation, stop: Sequence[str]) -> str | None:
    """What of ``answer`` is spoken: its text cut at ``stop``; None for calls or no text (silent)."""
    if answer.tool_calls:
        return None
    text = _cut(answer.text, stop)[0]
    return text if text.strip() else None


def pcm16(samples: np.ndarray) -> bytes:
    """``samples`` [S] float in [-1, 1] as raw 16-bit little-endian PCM, quantised as libsndfile writes
    16-bit WAV and FLAC (``floor(x * 32768)``), so every format carries the same samples."""
    scaled = np.floor(np.asarray(samples, dtype=np.float32) * np.float32(32768))
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """``samples`` [S] float32 mono in ``fmt`` (a ``SPEECH_FORMATS`` key): a file's bytes, or raw PCM."""
    return pcm16(samples) if fmt == "pcm" else audio_bytes(samples, sample_rate, fmt)


def _media_type(fmt: str, sample_rate: int) -> str:
    """The Content-Type of audio in ``fmt``; raw PCM names its rate (``audio/pcm;rate=16000``)."""
    media = SPEECH_FORMATS[fmt]
    return f"{media};rate={sample_rate}" if fmt == "pcm" else media


def _message_audio(spoken: SpokenAudio, fmt: str) -> dict[str, Any]:
    """A chat message's ``audio``: ``spoken`` in ``fmt``, base64 (the server keeps no copy: it expires now)."""
    data = base64.b64encode(encode_audio(spoken.waveform, spoken.sample_rate, fmt)).decode()
    return {"id": f"audio_{uuid.uuid4().hex}", "data": data, "expires_at": int(time.time()),
            "transcript": spoken.transcript}  # fmt: skip


def _choice(
    index: int, answer: Generation, request: ChatRequest, audio: dict[str, Any] | None = None
) -> dict[str, Any]:
    if answer.tool_calls:
        message = {"role": "assistant", "content": None, "refusal": None,
                   "tool_calls": _tool_calls(answer, request.parallel_tool_calls)}  # fmt: skip
        return {"index": index, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
    text, stopped = _cut(answer.text, request.stop)
    message = {"role": "assistant", "content": text, "refusal": None}
    if audio is not None:
        message["audio"] = audio
    finish = "stop" if stopped else answer.finish_reason
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def _chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None, index: int = 0
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
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


class PendingJob:
    """The event-loop side of a job: its events as they come, with the deadline and the client watched."""

    def __init__(self, batcher: Batcher, request: Request, timeout: float) -> None:
        self.batcher = batcher
        self.request = request
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.deadline = time.monotonic() + timeout
        self.job: Job | SpeechJob | None = None

    def notify(self, kind: str, value: Any) -> None:  # from the worker thread
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server has stopped
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def check_room(self) -> None:
        """A 429 now if the queue is full: before the body is read and its audio decoded (a client
        retrying after Retry-After must cost little); :meth:`submit` checks again."""
        self._refuse_if_full(self.batcher.check_room)

    def submit(self, job: Job | SpeechJob) -> None:
        job.deadline = self.deadline
        self.job = job
        self._refuse_if_full(lambda: self.batcher.submit(job))

    @staticmethod
    def _refuse_if_full(step: Callable[[], None]) -> None:
        try:
            step()
        except QueueFull as full:
            raise APIError(429, f"the server is busy: {full.depth} requests are waiting, its limit (--max-queue); "
                                f"retry after {full.retry_after} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None  # fmt: skip

    def timeout_error(self) -> APIError:
        return APIError(504, f"the request was not answered within {self.timeout:g} s (the server's --request-timeout)",
                        type="timeout_error", code="request_timeout")  # fmt: skip

    async def until(self, *kinds: str, watch_client: bool = True) -> tuple[str, Any]:
        """The next event of ``kinds`` or an "error" (earlier events of other kinds are passed over).

        Raises APIError 504 past the deadline, and 499 when ``watch_client`` and the client went
        away; either cancels the job.
        """
        assert self.job is not None
        watcher = asyncio.ensure_future(self._client_gone()) if watch_client else None
        try:
            while True:
                getter = asyncio.ensure_future(self.events.get())
                waiting = {getter} if watcher is None else {getter, watcher}
                left = max(self.deadline - time.monotonic(), 0)
                done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self.batcher.cancel(self.job)
                    if watcher is not None and watcher in done:
                        raise APIError(499, "the client closed the request", code="client_closed")
                    raise self.timeout_error()
                kind, value = getter.result()
                if kind in kinds or kind == "error":
                    return kind, value
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _client_gone(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                return


def _raise_job_error(err: Exception) -> None:
    if isinstance(err, APIError):
        raise err
    if isinstance(err, UserInputError):
        raise APIError(400, " ".join(str(err).split()))
    if isinstance(err, Cancelled):
        raise APIError(504, "the request was cancelled before it was answered", type="timeout_error",
                       code="request_timeout")  # fmt: skip
    raise APIError(500, "internal server error", type="server_error")


def create_app(
    assistant: Assistant, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None
) -> FastAPI:
    """The server's ASGI app answering with ``assistant`` as model ``model_name``.

    Args:
        assistant: the model and its steps.
        model_name: the model's id in ``/v1/models`` and in responses (the folder's name).
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        limits: batching, queue, timeout and size limits.

    The app's ``state.batcher`` holds the model queue (``close()`` it to end the worker thread). A
    folder that can speak has its speech head loaded here, before the first request.
    """
    limits = limits or ServerLimits()
    speech = assistant.speech if assistant.can_speak else None
    metrics = Metrics()
    batcher = Batcher(assistant, limits, on_batch=metrics.on_batch)
    metrics.watch_queue(lambda: batcher.depth)
    created_at = int(time.time())
    app = FastAPI(title="omnivox", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

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
        if isinstance(err, StreamCut):  # not a bug; the response began, so nothing more can be sent
            log.warning("%s: %s", request.url.path, err)
        else:
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

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created_at, "owned_by": "omnivox"}
        return {"object": "list", "data": [card]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        pending = PendingJob(batcher, request, limits.request_timeout)
        pending.check_room()
        raw = await request.body()
        # decoding audio is CPU work: off the event loop, beside (not in) the model thread
        chat = await anyio.to_thread.run_sync(
            lambda: read_chat_request(_parse_json_body(raw), limits, speech)
        )
        settings = assistant.settings(**chat.overrides)
        if chat.answer_format is not None and chat.answer_format.constrained and settings.num_beams != 1:
            settings = replace(settings, num_beams=1)  # a grammar follows one row per answer
        pending.submit(Job(chat.messages, chat.audio, settings, pending.notify, chat.answer_format, chat.n,
                           chat.seed, chat.stream, fit_tokens="max_new_tokens" not in chat.overrides,
                           speak=chat.audio_out, stop=tuple(chat.stop)))  # fmt: skip
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            kind, value = await pending.until("ready")
            if kind == "error":
                _raise_job_error(value)
            events = _stream(pending, chat, cid, created, model_name)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        kind, value = await pending.until("done")
        if kind == "error":
            _raise_job_error(value)
        audio: list[dict[str, Any] | None] = [None] * len(value.answers)
        if chat.audio_out is not None:
            kind, spoken = await pending.until("spoken")
            if kind == "error":
                _raise_job_error(spoken)
            fmt = chat.audio_out.format
            audio = await anyio.to_thread.run_sync(lambda: [s and _message_audio(s, fmt) for s in spoken])
        choices = [_choice(i, answer, chat, audio[i]) for i, answer in enumerate(value.answers)]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": choices, "usage": _usage(value)})  # fmt: skip

    @v1.post("/audio/speech")
    async def audio_speech(request: Request) -> Response:
        pending = PendingJob(batcher, request, limits.request_timeout)
        pending.check_room()
        raw = await request.body()
        order = await anyio.to_thread.run_sync(lambda: read_speech_request(_parse_json_body(raw), speech))
        assert speech is not None  # read_speech_request refuses otherwise
        media = _media_type(order.out.format, speech.sample_rate)
        headers = {"X-Voice": order.out.voice, "X-Sample-Rate": str(speech.sample_rate)}
        if order.out.format == "pcm":  # raw PCM goes out piece by piece as it is spoken
            pending.submit(SpeechJob(order.text, order.out, pending.notify, stream=True))
            kind, value = await pending.until("audio", "done")  # an error before the first piece is a 4xx
            if kind == "error":
                _raise_job_error(value)
            return StreamingResponse(_pcm_stream(pending, kind, value), media_type=media, headers=headers)
        pending.submit(SpeechJob(order.text, order.out, pending.notify))
        kind, value = await pending.until("done")
        if kind == "error":
            _raise_job_error(value)
        data = await anyio.to_thread.run_sync(
            encode_audio, value.waveform, value.sample_rate, order.out.format
        )
        return Response(data, media_type=media, headers=headers)

    @v1.post("/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        pending = PendingJob(batcher, request, limits.request_timeout)
        pending.check_room()
        try:
            form = await request.form(max_files=1, max_fields=20)
        except APIError:
            raise
        except Exception as err:  # malformed multipart bodies
            raise APIError(400, f"the request body is not a valid multipart form: {str(err)[:200]}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "a multipart 'file' part with the audio is required", param="file")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        response_format = fields.get("response_format", "json")
        if response_format not in TRANSCRIPTION_FORMATS:
            raise APIError(400, f"response_format must be one of {list(TRANSCRIPTION_FORMATS)}, got {_show(response_format)}",
                           param="response_format")  # fmt: skip
        if fields.get("stream", "false").lower() == "true":
            raise APIError(400, "streamed transcriptions are not supported by this server", param="stream")
        try:
            temperature = float(fields.get("temperature", 0))
        except ValueError:
            raise APIError(
                400, f"temperature must be a number, got {_show(fields['temperature'])}", param="temperature"
            ) from None
        if not 0 <= temperature <= 1:
            raise APIError(400, f"temperature must be from 0 to 1, got {temperature}", param="temperature")
        raw = await upload.read()
        samples, duration = await anyio.to_thread.run_sync(
            load_clip, raw, upload.filename or "file", limits.max_audio_seconds, "file"
        )
        settings = assistant.settings(**decoding_overrides(temperature, None, None))
        message = Message("user", TRANSCRIBE_INSTRUCTION, num_audio=1)
        pending.submit(Job([message], [samples], settings, pending.notify, fit_tokens=True))
        kind, value = await pending.until("done")
        if kind == "error":
            _raise_job_error(value)
        text = value.answers[0].text.strip()
        return transcription_response(text, duration, response_format, fields.get("language"))

    app.include_router(v1)
    add_web_routes(app)
    return app


async def _stream(
    pending: PendingJob, request: ChatRequest, cid: str, created: int, model: str
) -> AsyncIterator[bytes]:
    """SSE chunks: the role, the text as it is decoded, tool calls, the finish reason, (usage), ``[DONE]``.

    ``n`` > 1 answers (decoded as one batch) and calls are sent whole when they are complete. A
    failure or timeout after the response began ends the stream with an error event. A client that
    goes away cancels the job: its generation stops at the next token.
    """
    try:
        for i in range(request.n):
            yield _sse(_chunk(cid, created, model, {"role": "assistant", "content": ""}, None, i))
        cut = StopText(request.stop)
        streamed = False  # text came piece by piece (else it comes whole with "done")
        while True:
            try:
                kind, value = await pending.until("text", "done", watch_client=False)
            except APIError as err:
                yield _sse(err.body())
                break
            if kind == "text":
                streamed = True
                piece = cut.feed(value)
                if piece:
                    yield _sse(_chunk(cid, created, model, {"content": piece}, None))
                continue
            if kind == "error":
                try:
                    _raise_job_error(value)
                except APIError as err:
                    if err.status >= 500:
                        log.error("generation failed", exc_info=value)
                    yield _sse(err.body())
                break
            finishes: dict[int, str] = {}  # held back while the answers are spoken
            for i, answer in enumerate(value.answers):
                if answer.tool_calls:
                    calls = [
                        {"index": k, **c}
                        for k, c in enumerate(_tool_calls(answer, request.parallel_tool_calls))
                    ]
                    yield _sse(_chunk(cid, created, model, {"tool_calls": calls}, None, i))
                    yield _sse(_chunk(cid, created, model, {}, "tool_calls", i))
                    continue
                own = cut if streamed else StopText(request.stop)
                rest = own.flush() if streamed else own.feed(answer.text) + own.flush()
                if rest:
                    yield _sse(_chunk(cid, created, model, {"content": rest}, None, i))
                finishes[i] = "stop" if own.stopped else answer.finish_reason
                if request.audio_out is None:
                    yield _sse(_chunk(cid, created, model, {}, finishes.pop(i), i))
            if request.audio_out is not None:
                try:
                    async for piece in _spoken_deltas(pending, value, request, cid, created, model):
                        yield piece
                except APIError as err:  # a failure is logged where it happened (the worker)
                    yield _sse(err.body())
                    break
                for i, finish in finishes.items():
                    yield _sse(_chunk(cid, created, model, {}, finish, i))
            if request.include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(value)})  # fmt: skip
            break
        yield _sse("[DONE]")
    finally:
        assert pending.job is not None
        pending.batcher.cancel(pending.job)  # the client left (or the answer is done: then a no-op)


async def _spoken_deltas(
    pending: PendingJob, result: JobResult, request: ChatRequest, cid: str, created: int, model: str
) -> AsyncIterator[bytes]:
    """The ``delta.audio`` chunks of a streamed chat answer (the openai client's ``ChoiceDeltaAudio``):
    per spoken choice one with its ``id`` and ``transcript`` (with its first piece), then base64
    pcm16 ``data`` as it is spoken, then one with only ``expires_at``. Raises APIError."""
    ids: dict[int, str] = {}
    while True:
        kind, value = await pending.until("audio", "spoken", watch_client=False)
        if kind == "error":
            _raise_job_error(value)
        if kind == "spoken":
            break
        i, samples = value
        if i not in ids:
            ids[i] = f"audio_{uuid.uuid4().hex}"
            transcript = spoken_text(result.answers[i], request.stop)
            yield _sse(
                _chunk(cid, created, model, {"audio": {"id": ids[i], "transcript": transcript}}, None, i)
            )
        data = base64.b64encode(pcm16(samples)).decode()
        yield _sse(_chunk(cid, created, model, {"audio": {"data": data}}, None, i))
    expires = int(time.time())  # the server keeps no audio
    for i in ids:
        yield _sse(_chunk(cid, created, model, {"audio": {"expires_at": expires}}, None, i))


async def _pcm_stream(pending: PendingJob, kind: str, value: Any) -> AsyncIterator[bytes]:
    """Raw PCM pieces of a speech request as they are spoken, from the first event (``kind``, ``value``) on.

    A failure after the first piece cannot change the status any more: the connection is cut (the
    client sees an incomplete body, not a short file). A client that goes away stops the speaking.
    """
    try:
        while kind == "audio":
            yield pcm16(value[1])
            try:
                kind, value = await pending.until("audio", "done", watch_client=False)
            except APIError as err:
                kind, value = "error", err
        if kind == "error":
            try:
                _raise_job_error(value)
            except APIError as err:
                raise StreamCut(f"the audio stream was cut after it began: {err.message}") from None
    finally:
        assert pending.job is not None
        pending.batcher.cancel(pending.job)


@contextlib.contextmanager
def serve_in_thread(app: Any, **uvicorn_options: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a daemon thread on a free loopback port; yields its base URL.

    For tests, benchmarks and notebooks. ``uvicorn_options`` go to ``uvicorn.Config`` (e.g.
    ``timeout_keep_alive``). On exit the server stops and, for an app of :func:`create_app`, its
    model thread too.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        batcher = getattr(getattr(app, "state", None), "batcher", None)
        if batcher is not None:
            batcher.close()


def serve(
    assistant: Assistant,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(assistant, model_name, api_key=api_key, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
