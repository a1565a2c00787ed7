"""Reliability benchmark of ``omnivox serve``: bad requests, a crowd of requests, batching.

Three parts, each against the real app served by uvicorn on a loopback port (in this process,
the model loaded once):

(a) **fuzz**: ``--fuzz`` bad requests (default 600) across ``/v1/chat/completions``,
    ``/v1/audio/transcriptions``, ``/v1/models`` and ``/metrics``: malformed JSON and base64,
    wrong types, unknown fields, corrupt/empty/long/NaN/odd-rate audio, bad data URLs, invalid
    tool schemas and tool-call arguments, path-like strings, oversized bodies, bad keys. Counted:
    client-side crashes (no HTTP answer), 5xx (must be 0), 4xx not in OpenAI's error shape
    (must be 0); then a good chat and a good transcription must still succeed.
(b) **load**: ``--load`` requests at once (default 200: text chat, chat about a clip,
    transcription, streamed chat, a quarter each) against a queue bound of ``--max-queue``
    (default 64). A 429 is retried after its ``Retry-After``; every request must end answered
    (0 lost), and every 429 must report a full queue. Reported: p50/p95 latency (arrival to
    answer, retries included), throughput, and throughput of the same mix sent one at a time
    (``--sequential`` of them) as a ratio.
(c) **batching**: N requests about a 10 s clip at once, for N in ``--clips`` (default 1, 4, 16),
    answered by a server batching up to 16 vs one batching 1 (one by one); the ratio of times.

Usage::

    .venv/bin/python benchmarks/serve_reliability.py [--model DIR] [--out F.json] [--fuzz 600] [--load 200]

Prints a markdown table and writes the figures as JSON. The tests use :func:`fuzz_cases`,
:func:`run_fuzz` and :func:`serving` with the tiny model (``tests/agent/test_server_reliability.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import platform
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"
QUESTION = "What do you hear in this clip?"
ERROR_KEYS = {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------------------------
# Serving


def serving(app: Any) -> contextlib.AbstractContextManager[str]:
    """``app`` served on a free loopback port; yields its base URL."""
    from omnivox.agent.server import serve_in_thread

    # keep-alive longer than any Retry-After: a client that waits and reuses its connection must not
    # race the server closing it (uvicorn's default is 5 s)
    return serve_in_thread(app, limit_concurrency=2000, timeout_keep_alive=300)


# ---------------------------------------------------------------------------------------------
# Audio


def wav_bytes(samples: np.ndarray, rate: int, subtype: str | None = None, fmt: str = "WAV") -> bytes:
    """``samples`` ([S] or [S, C]) written as a file in memory."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate), dtype=np.float32) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speech_clip(seconds: float) -> bytes:
    """The first ``seconds`` of the bundled JFK clip (looped if shorter) as 16 kHz WAV; a tone if absent."""
    source = ROOT / "assets" / "examples" / "jfk.flac"
    if not source.is_file():
        return wav_bytes(tone(seconds), 16000)
    from omnivox.agent.audio import load_audio

    samples = load_audio(source).samples
    needed = round(seconds * 16000)
    samples = np.tile(samples, needed // samples.shape[0] + 1)[:needed]
    return wav_bytes(samples, 16000)


# ---------------------------------------------------------------------------------------------
# (a) Fuzz


@dataclass
class Case:
    """One request: ``json`` (a body to serialize), ``content`` (raw bytes), or multipart ``files``/``data``."""

    category: str
    path: str = "/v1/chat/completions"
    method: str = "POST"
    json: Any = None
    content: bytes | None = None
    files: Any = None
    data: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = True


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _audio_part(raw: bytes | str, fmt: str = "wav") -> dict:
    data = raw if isinstance(raw, str) else _b64(raw)
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def _chat(content: Any, **extra: Any) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


WEIRD = [None, True, False, 0, -1, 1.5, 2**70, -(2**70), 1e308, "", "x", "NaN", "../../etc/passwd", "/dev/zero",
         "C:\\Windows\\system.ini", "file:///etc/shadow", "\x00", "\u202e\ufeff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "x" * 5000, [], {},
         [None], {"a": None}, [[[]]], {"$ref": "#"}]  # fmt: skip
TOP_FIELDS = ["messages", "model", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stream",
              "stop", "seed", "tools", "tool_choice", "response_format", "stream_options", "modalities",
              "parallel_tool_calls", "logprobs", "audio", "user", "metadata"]  # fmt: skip
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string", "enum": ["a", "b"]}},
                       "required": ["word"], "additionalProperties": False}}}  # fmt: skip


class Fuzzer:
    """Makes bad requests, category by category (each a method ``_<category>``), from one seed."""

    def __init__(self, seed: int = 0, max_body_bytes: int = 4 << 20) -> None:
        self.rng = random.Random(seed)
        self.max_body_bytes = max_body_bytes
        good = tone(1.0, 22050)
        self.good_wav = wav_bytes(good, 22050)
        self.audio: dict[str, bytes] = {
            "empty": b"",
            "random bytes": self.rng.randbytes(4000),
            "truncated header": self.good_wav[:30],
            "header only": self.good_wav[:44],
            "cut short": self.good_wav[: len(self.good_wav) // 3],
            "RIFF garbage": b"RIFF" + (10**6).to_bytes(4, "little") + b"WAVEfmt " + self.rng.randbytes(64),
            "NaN samples": wav_bytes(np.full(16000, np.nan, dtype=np.float32), 16000, "FLOAT"),
            "inf samples": wav_bytes(np.full(16000, np.inf, dtype=np.float32), 16000, "FLOAT"),
            "1 Hz rate": wav_bytes(np.zeros(4, dtype=np.float32), 1),
            "100 Hz rate": wav_bytes(tone(1.0, 100, 10), 100),
            "384 kHz rate": wav_bytes(tone(0.5, 384000), 384000),
            "one sample": wav_bytes(np.zeros(1, dtype=np.float32), 16000),
            "silence": wav_bytes(np.zeros(16000, dtype=np.float32), 16000),
            "8 channels": wav_bytes(np.zeros((16000, 8), dtype=np.float32), 16000),
            "8-bit": wav_bytes(tone(1.0), 16000, "PCM_U8"),
            "too long": wav_bytes(np.zeros(8000 * 40, dtype=np.int16), 8000, "PCM_16"),
            "flac": wav_bytes(tone(1.0), 16000, fmt="FLAC"),
            "text file": b"hello, this is not audio at all\n" * 20,
            "json file": b'{"not": "audio"}',
            "html": b"<html><script>alert(1)</script></html>",
            "zip": b"PK\x03\x04" + self.rng.randbytes(200),
        }
        self.categories: list[Callable[[], Case]] = [
            self._json_syntax, self._wrong_types, self._messages, self._content_parts, self._audio_input,
            self._base64, self._data_urls, self._tools, self._tool_history, self._response_format,
            self._unknown_fields, self._transcription, self._other_endpoints, self._oversized, self._auth,
        ]  # fmt: skip

    def cases(self, count: int) -> list[Case]:
        """``count`` requests, the categories in turn."""
        return [self.categories[i % len(self.categories)]() for i in range(count)]

    def pick(self, options: list) -> Any:
        return options[self.rng.randrange(len(options))]

    def _json_syntax(self) -> Case:
        body = json.dumps(_chat("Hello"))
        options = [
            body[: self.rng.randrange(1, len(body))].encode(),  # cut anywhere
            b"",
            b"null", b"[]", b'"text"', b"42", b"true",
            b"\xff\xfe\x00{", b"\xef\xbb\xbf" + body.encode(),  # invalid UTF-8; a BOM
            b"[" * 50000 + b"]" * 50000,
            b'{"a":' * 20000 + b"1" + b"}" * 20000,
            body.replace('"max_tokens": 4', '"max_tokens": NaN').encode(),
            body.replace('"max_tokens": 4', '"temperature": Infinity').encode(),
            body.replace('"max_tokens": 4', '"max_tokens": 1e400').encode(),
            body.replace('"max_tokens": 4', '"seed": ' + "9" * 5000).encode(),
            body.replace("{", "{{", 1).encode(),
            b"{'messages': []}",
            body.encode() + b"trailing",
        ]  # fmt: skip
        return Case("json syntax", content=self.pick(options), headers={"Content-Type": "application/json"})

    def _wrong_types(self) -> Case:
        body = _chat("Hello")
        body[self.pick(TOP_FIELDS)] = self.pick(WEIRD)
        return Case("wrong types", json=body)

    def _messages(self) -> Case:
        message = {"role": self.pick(["user", "assistant", "system", "tool", "function", "developer", "robot", None, 7]),
                   "content": self.pick(["Hi", None, 3, [], {}, ["Hi"], [{"type": "text"}], "x" * 200_000])}  # fmt: skip
        if self.rng.random() < 0.3:
            message.pop(self.pick(["role", "content"]))
        if self.rng.random() < 0.3:
            message[self.pick(["tool_calls", "tool_call_id", "name", "function_call"])] = self.pick(WEIRD)
        shape = self.rng.randrange(5)
        messages: Any = [message]
        if shape == 1:  # many turns (short ones: the body stays under the size limit)
            messages = [{**message, "content": "Hi"} if "content" in message else message] * self.rng.randrange(2, 2000)
        elif shape == 2:
            messages = [{"role": "assistant", "content": "Hi"}, message]
        elif shape == 3:
            messages = self.pick(WEIRD)
        elif shape == 4:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, message]
        return Case("messages", json={"model": "m", "messages": messages, "max_tokens": 4})

    def _content_parts(self) -> Case:
        part = self.pick([
            {"type": "text"}, {"type": "text", "text": 5}, {"type": "image_url", "image_url": {"url": "data:,x"}},
            {"type": "input_audio"}, {"type": "input_audio", "input_audio": "abc"}, {"type": None}, {},
            {"type": "audio_url"}, {"type": "audio_url", "audio_url": "data:audio/wav;base64,AAAA"},
            {"type": "file", "file": {"file_id": "../../etc/passwd"}}, {"type": "refusal", "refusal": "no"},
            "just a string", 17, None, [],
        ])  # fmt: skip
        return Case("content parts", json=_chat([part, {"type": "text", "text": "What is it?"}]))

    def _audio_input(self) -> Case:
        name = self.pick(sorted(self.audio))
        fmt = "wav" if self.rng.random() < 0.75 else self.pick(["mp3", "flac", "ogg", "pcm16", "", None, "../wav"])
        return Case(f"audio: {name}", json=_chat([_audio_part(self.audio[name], fmt), {"type": "text", "text": "Hm?"}]))

    def _base64(self) -> Case:
        good = _b64(self.good_wav)
        data = self.pick([
            "@@@not base64@@@", good[:-3], good + "=", good.replace("A", "-"), good[:100] + " " + good[100:],
            good[:101], "====", "", "data:audio/wav;base64,", "data:audio/wav;base64,@@", base64.urlsafe_b64encode(
                self.rng.randbytes(300)).decode(), _b64(self.rng.randbytes(3000)), "\u00e9" * 40,
        ])  # fmt: skip
        return Case("base64", json=_chat([_audio_part(data)]))

    def _data_urls(self) -> Case:
        good = _b64(self.good_wav)
        url = self.pick([
            "http://127.0.0.1:1/a.wav", "https://example.com/clip.wav", "file:///etc/passwd", "ftp://x/y.wav",
            "javascript:alert(1)", "/etc/passwd", "../../../etc/passwd", "data:audio/wav," + good,
            "data:;base64," + good[:10], "data:audio/wav;base64," + good[:-2], "data:audio/wav;base64",
            "data:text/html;base64," + _b64(b"<b>hi</b>"), "DATA:audio/wav;base64," + good, "", None, 12,
            "data:audio/wav;base64," + _b64(self.audio[self.pick(sorted(self.audio))]),
        ])  # fmt: skip
        return Case("data URLs", json=_chat([{"type": "audio_url", "audio_url": {"url": url}}]))

    def _tools(self) -> Case:
        params = self.pick([
            {"type": "string"}, [], "object", {"type": "object", "properties": []},
            {"type": "object", "properties": {"a": True}}, {"type": "object", "properties": {"a": {"type": 12}}},
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/schema.json"}}},
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
            {"type": "object", "$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}},
             "properties": {"n": {"$ref": "#/$defs/n"}}},
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}},
            {"type": "object", "properties": {"a": {"enum": list(range(5000))}}},
            {"type": "object", "properties": {"a": {"type": "string", "minLength": 10, "maxLength": 2}}},
            {"type": "object", "required": ["missing"], "additionalProperties": False},
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}},
            {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object"}}}}},
            {"type": "object", "not": {}},
        ])  # fmt: skip
        name = self.pick(["lookup", "has space", "../../etc/passwd", "", "x" * 100, "ünï", None, 5])
        tool = {"type": "function", "function": {"name": name, "parameters": params}}
        tools: Any = self.pick([[tool], [TOOL, TOOL], [tool] * 200, tool, "lookup", [{"type": "function"}],
                                [{"type": "retrieval"}], [{"function": TOOL["function"]}]])  # fmt: skip
        choice = self.pick([None, "auto", "required", "none", "any", {"type": "function", "function": {"name": "nope"}},
                            {"type": "function"}, {"function": {"name": "lookup"}}, 3])  # fmt: skip
        return Case("tool schemas", json=_chat("Look up a word", tools=tools, tool_choice=choice, max_tokens=48))

    def _tool_history(self) -> Case:
        arguments = self.pick(['{"word": "a"}', "{not json", "[1, 2]", '"a"', {"word": "a"}, None, "", "null",
                               "{" * 5000, '{"word": NaN}'])  # fmt: skip
        call = {"id": self.pick(["call_1", "", None, 7]), "type": self.pick(["function", "code", None]),
                "function": {"name": self.pick(["lookup", None, ""]), "arguments": arguments}}  # fmt: skip
        calls = [call] if self.rng.random() < 0.7 else self.pick([call, [], "x", [call, call]])
        answer = {"role": "tool", "tool_call_id": self.pick(["call_1", "call_2", None, ["call_1"]]), "content": "a: first"}
        messages = [{"role": "user", "content": "Look up a"},
                    {"role": "assistant", "content": self.pick([None, "", "ok"]), "tool_calls": calls},
                    answer]  # fmt: skip
        return Case("tool history", json={"model": "m", "messages": messages, "tools": [TOOL], "max_tokens": 8})

    def _response_format(self) -> Case:
        value = self.pick([
            {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://example.com/s"}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "string", "pattern": "[z-a]"}}}}},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 3}}},
            {"type": "json_object"}, {"type": "text"}, {"type": "xml"}, "json", None, {},
        ])  # fmt: skip
        return Case("response format", json=_chat("Answer in JSON", response_format=value, max_tokens=24))

    def _unknown_fields(self) -> Case:
        body = _chat("Hello")
        for _ in range(self.rng.randrange(1, 5)):
            key = self.pick(["frequency_penalty", "logit_bias", "service_tier", "store", "../x", "__proto__",
                             "x" * 300, "prediction", "reasoning_effort", "web_search_options"])  # fmt: skip
            body[key] = self.pick(WEIRD)
        body["messages"][0][self.pick(["name", "extra", "audio", "refusal"])] = self.pick(WEIRD)
        return Case("unknown fields", json=body)

    def _transcription(self) -> Case:
        name = self.pick(sorted(self.audio))
        filename = self.pick(["clip.wav", "../../etc/passwd", "/dev/zero", "", "x" * 500, "clip.mp3", "nul\x00.wav"])
        data = {"model": "whisper-1"}
        extra = self.pick([{}, {"response_format": "xml"}, {"response_format": "srt"}, {"temperature": "hot"},
                           {"temperature": "nan"}, {"temperature": "inf"}, {"temperature": "-1"}, {"stream": "true"},
                           {"language": "../../x"}, {"timestamp_granularities[]": "word"}])  # fmt: skip
        data.update(extra)
        shape = self.rng.randrange(6)
        if shape == 0:
            return Case("transcription", "/v1/audio/transcriptions", data=data)  # no file
        if shape == 1:  # a JSON body where a form is expected
            return Case("transcription", "/v1/audio/transcriptions", json={"file": _b64(self.audio[name])})
        if shape == 2:  # a broken multipart body
            return Case("transcription", "/v1/audio/transcriptions", content=b"--zz\r\nContent-Disposition: form-data; "
                        b'name="file"; filename="a.wav"\r\n\r\n' + self.audio[name][:200],
                        headers={"Content-Type": "multipart/form-data; boundary=zz"})  # fmt: skip
        if shape == 3:  # two files
            return Case("transcription", "/v1/audio/transcriptions", data=data,
                        files=[("file", ("a.wav", self.good_wav)), ("file", ("b.wav", self.good_wav))])  # fmt: skip
        return Case(f"transcription: {name}", "/v1/audio/transcriptions", data=data,
                    files={"file": (filename, self.audio[name], "audio/wav")})  # fmt: skip

    def _other_endpoints(self) -> Case:
        method, path = self.pick([
            ("GET", "/v1/models"), ("POST", "/v1/models"), ("DELETE", "/v1/models"), ("GET", "/v1/models/../../etc"),
            ("GET", "/v1/models?limit=-1&after=../../x"), ("GET", "/metrics"), ("POST", "/metrics"),
            ("GET", "/metrics?name[]=x"), ("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
            ("GET", "/static/../server.py"), ("GET", "/static/%2e%2e/server.py"), ("GET", "/v1/%00"),
            ("GET", "/../../etc/passwd"), ("GET", "/v1/audio/speech"), ("POST", "/v1/embeddings"),
        ])  # fmt: skip
        return Case("other endpoints", path, method=method)

    def _oversized(self) -> Case:
        big = self.pick(["declared", "chunked"])
        payload = b"x" * (self.max_body_bytes + 1 + self.rng.randrange(1 << 20))
        if big == "chunked":
            return Case("oversized: chunked", content=payload, headers={"Transfer-Encoding": "chunked"})
        return Case("oversized", content=payload, headers={"Content-Type": "application/json"})

    def _auth(self) -> Case:
        header = self.pick(["", "Bearer", "Bearer wrong", "Basic " + _b64(b"user:pass"), "bearer " + "k" * 10000,
                            "Bearer " + KEY + "x", "Token " + KEY])  # fmt: skip
        headers = {"Authorization": header} if header else {}
        return Case("auth", path=self.pick(["/v1/chat/completions", "/v1/models"]), json=_chat("Hi"), headers=headers,
                    auth=False, method=self.pick(["POST", "GET"]))  # fmt: skip


def fuzz_cases(count: int, seed: int = 0, max_body_bytes: int = 4 << 20) -> list[Case]:
    """``count`` bad requests; the oversized ones are just over ``max_body_bytes`` (the server's limit)."""
    return Fuzzer(seed, max_body_bytes).cases(count)


def _send(client: Any, base: str, case: Case, key: str | None) -> Any:
    headers = dict(case.headers)
    if case.auth and key:
        headers["Authorization"] = f"Bearer {key}"
    kwargs: dict[str, Any] = {"headers": headers}
    if case.json is not None:
        kwargs["content"] = json.dumps(case.json).encode()
        headers.setdefault("Content-Type", "application/json")
    elif case.content is not None:
        content = case.content
        if headers.pop("Transfer-Encoding", None):  # an iterator body goes out chunked, without a length
            step = 1 << 20
            kwargs["content"] = iter([content[i : i + step] for i in range(0, len(content), step)])
        else:
            kwargs["content"] = content
    if case.files is not None:
        kwargs["files"] = case.files
    if case.data is not None:
        kwargs["data"] = case.data
    return client.request(case.method, base + case.path, **kwargs)


def run_fuzz(base: str, cases: list[Case], key: str | None = KEY, timeout: float = 120) -> dict[str, Any]:
    """Send ``cases`` one by one; count statuses, crashes, 5xx and 4xx not in OpenAI's shape."""
    import httpx2 as httpx

    statuses: Counter[int] = Counter()
    problems: list[dict[str, Any]] = []
    by_category: dict[str, Counter[str]] = {}
    start = time.perf_counter()
    with httpx.Client(timeout=timeout) as client:
        for i, case in enumerate(cases):
            family = case.category.split(":")[0]
            tally = by_category.setdefault(family, Counter())
            try:
                response = _send(client, base, case, key)
            except Exception as err:  # no HTTP answer at all
                problems.append({"case": i, "category": case.category, "problem": f"no answer: {err!r}"[:300]})
                tally["crash"] += 1
                continue
            statuses[response.status_code] += 1
            tally[f"{response.status_code // 100}xx"] += 1
            if response.status_code >= 500:
                problems.append({"case": i, "category": case.category, "problem": f"{response.status_code}: "
                                 f"{response.text[:300]}"})  # fmt: skip
            elif response.status_code >= 400 and not _openai_error(response):
                problems.append({"case": i, "category": case.category, "problem": f"not OpenAI's error shape: "
                                 f"{response.status_code} {response.text[:300]}"})  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "cases": len(cases),
        "seconds": round(seconds, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "crashes": sum(1 for p in problems if p["problem"].startswith("no answer")),
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "bad_error_shape": sum(1 for p in problems if p["problem"].startswith("not OpenAI")),
        "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
        "problems": problems[:50],
    }


def _openai_error(response: Any) -> bool:
    try:
        error = response.json()["error"]
    except Exception:
        return False
    return isinstance(error, dict) and set(error) == ERROR_KEYS and isinstance(error["message"], str)


def still_answers(base: str, key: str | None = KEY) -> dict[str, bool]:
    """A good chat, a good transcription and /health, after the fuzz."""
    import httpx2 as httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wav = wav_bytes(tone(1.0), 16000)
    chat = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=120,
                      json=_chat([_audio_part(wav), {"type": "text", "text": "What is it?"}]))  # fmt: skip
    heard = httpx.post(base + "/v1/audio/transcriptions", headers=headers, timeout=120,
                       files={"file": ("a.wav", wav, "audio/wav")}, data={"model": "m"})  # fmt: skip
    health = httpx.get(base + "/health", timeout=30)
    return {
        "chat": chat.status_code == 200 and isinstance(chat.json()["choices"][0]["message"]["content"], str),
        "transcription": heard.status_code == 200 and isinstance(heard.json().get("text"), str),
        "health": health.status_code == 200,
    }


# ---------------------------------------------------------------------------------------------
# (b) Load and (c) batching


@dataclass
class Outcome:
    kind: str
    status: int | None
    seconds: float
    attempts: int
    refusals: list[int]  # the queue depth each 429 reported
    ok: bool
    error: str = ""


def _requests(kind: str, clip: bytes, max_tokens: int) -> dict[str, Any]:
    """httpx keyword arguments for one request of ``kind``."""
    if kind == "transcription":
        return {"url": "/v1/audio/transcriptions", "files": {"file": ("clip.wav", clip, "audio/wav")},
                "data": {"model": "m"}}  # fmt: skip
    if kind == "audio chat":
        body = _chat([_audio_part(clip), {"type": "text", "text": QUESTION}], max_tokens=max_tokens)
    else:
        body = _chat("Tell me about the sea.", max_tokens=max_tokens, stream=kind == "stream")
    return {"url": "/v1/chat/completions", "json": body}


async def _one(client: Any, kind: str, clip: bytes, max_tokens: int) -> Outcome:
    request = _requests(kind, clip, max_tokens)
    start, attempts, refusals = time.perf_counter(), 0, []
    while True:
        attempts += 1
        try:
            if kind == "stream":
                async with client.stream("POST", **request) as response:
                    lines = [line async for line in response.aiter_lines() if line]
                    status = response.status_code
                    body = "\n".join(lines)
                    ok = status == 200 and lines[-1] == "data: [DONE]" and '"error"' not in body
            else:
                response = await client.post(**request)
                status, body = response.status_code, response.text
                ok = status == 200 and ("text" in response.json() if kind == "transcription"
                                        else isinstance(response.json()["choices"][0]["message"]["content"], str))  # fmt: skip
        except Exception as err:
            return Outcome(kind, None, time.perf_counter() - start, attempts, refusals, False, repr(err)[:300])
        if status == 429:
            depth = re.search(r"(\d+) requests are waiting", body)
            refusals.append(int(depth.group(1)) if depth else -1)
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        return Outcome(kind, status, time.perf_counter() - start, attempts, refusals, ok, "" if ok else body[:300])


async def _crowd(base: str, kinds: list[str], clip: bytes, max_tokens: int, at_once: bool) -> tuple[list[Outcome], float]:
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=len(kinds) + 10, max_keepalive_connections=len(kinds) + 10)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=900, limits=limits) as client:
        start = time.perf_counter()
        if at_once:
            outcomes = await asyncio.gather(*(_one(client, k, clip, max_tokens) for k in kinds))
        else:
            outcomes = [await _one(client, k, clip, max_tokens) for k in kinds]
        return list(outcomes), time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(base: str, count: int, sequential: int, max_queue: int, clip: bytes, max_tokens: int) -> dict[str, Any]:
    """(b): ``count`` mixed requests at once, then ``sequential`` of the same mix one at a time."""
    mix = ["chat", "audio chat", "transcription", "stream"]
    kinds = [mix[i % len(mix)] for i in range(count)]
    outcomes, seconds = asyncio.run(_crowd(base, kinds, clip, max_tokens, at_once=True))
    alone, alone_seconds = asyncio.run(_crowd(base, kinds[:sequential], clip, max_tokens, at_once=False))
    latencies = [o.seconds for o in outcomes if o.ok]
    refusals = [d for o in outcomes for d in o.refusals]
    throughput, alone_throughput = count / seconds, sequential / alone_seconds
    return {
        "requests": count,
        "mix": dict(Counter(kinds)),
        "answered": sum(o.ok for o in outcomes),
        "lost": sum(not o.ok for o in outcomes),
        "responses_429": len(refusals),
        "429_below_bound": sum(1 for d in refusals if d < max_queue),
        "max_queue": max_queue,
        "seconds": round(seconds, 2),
        "p50_s": round(_percentile(latencies, 50), 3),
        "p95_s": round(_percentile(latencies, 95), 3),
        "per_kind_p50_s": {k: round(_percentile([o.seconds for o in outcomes if o.kind == k and o.ok], 50), 3)
                           for k in mix},  # fmt: skip
        "throughput_rps": round(throughput, 3),
        "one_at_a_time": {"requests": sequential, "seconds": round(alone_seconds, 2),
                          "throughput_rps": round(alone_throughput, 3), "lost": sum(not o.ok for o in alone)},  # fmt: skip
        "throughput_ratio": round(throughput / alone_throughput, 2),
        "failures": [asdict(o) for o in outcomes if not o.ok][:10],
    }


def run_batching(make_app: Callable[[int], Any], clip: bytes, sizes: list[int], max_tokens: int) -> list[dict]:
    """(c): N questions about a clip at once, batched (up to 16) vs one by one (batch 1)."""
    rows = []
    for n in sizes:
        times = {}
        for label, batch in (("batched", max(sizes)), ("one_by_one", 1)):
            with serving(make_app(batch)) as base:
                outcomes, seconds = asyncio.run(_crowd(base, ["audio chat"] * n, clip, max_tokens, at_once=True))
            if not all(o.ok for o in outcomes):
                raise RuntimeError(f"batching run N={n} {label}: {[o.error for o in outcomes if not o.ok][:3]}")
            times[label] = seconds
        rows.append({"n": n, "batched_s": round(times["batched"], 2), "one_by_one_s": round(times["one_by_one"], 2),
                     "ratio": round(times["one_by_one"] / times["batched"], 2),
                     "batched_clips_per_s": round(n / times["batched"], 3)})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def markdown(result: dict[str, Any]) -> str:
    lines = ["| part | figure | value |", "|---|---|---|"]
    fuzz = result.get("fuzz")
    if fuzz:
        lines += [
            f"| (a) fuzz | bad requests sent | {fuzz['cases']} ({fuzz['seconds']} s) |",
            f"| (a) fuzz | statuses | {', '.join(f'{k}: {v}' for k, v in fuzz['statuses'].items())} |",
            f"| (a) fuzz | crashes / 5xx / 4xx not in OpenAI shape | {fuzz['crashes']} / {fuzz['server_errors']} / "
            f"{fuzz['bad_error_shape']} |",
            f"| (a) fuzz | good requests afterwards | {result['after_fuzz']} |",
        ]
    load = result.get("load")
    if load:
        alone = load["one_at_a_time"]
        lines += [
            f"| (b) load | requests at once (mix) | {load['requests']} ({', '.join(f'{k} {v}' for k, v in load['mix'].items())}) |",
            f"| (b) load | answered / lost | {load['answered']} / {load['lost']} |",
            f"| (b) load | 429s (below the bound of {load['max_queue']}) | {load['responses_429']} ({load['429_below_bound']}) |",
            f"| (b) load | latency p50 / p95 | {load['p50_s']} s / {load['p95_s']} s |",
            f"| (b) load | throughput at once / one at a time | {load['throughput_rps']} / {alone['throughput_rps']} req/s "
            f"(ratio {load['throughput_ratio']}) |",
        ]  # fmt: skip
    for row in result.get("batching", []):
        lines.append(f"| (c) batching | N={row['n']} 10 s clips: batched / one by one | {row['batched_s']} s / "
                     f"{row['one_by_one_s']} s (ratio {row['ratio']}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "nano")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fuzz", type=int, default=600, help="bad requests to send (0: skip)")
    parser.add_argument("--load", type=int, default=200, help="requests at once (0: skip)")
    parser.add_argument("--sequential", type=int, default=20, help="requests of the same mix sent one at a time")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the load and batching chats")
    parser.add_argument("--clips", default="1,4,16", help="N for (c); empty: skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from omnivox.agent.assistant import Assistant
    from omnivox.agent.server import ServerLimits, create_app

    began = time.perf_counter()
    assistant = Assistant.from_pretrained(args.model)
    name = args.model.resolve().name
    result: dict[str, Any] = {
        "model": str(args.model),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "threads": args.threads, "load_average_before": os.getloadavg()},
    }  # fmt: skip
    if args.fuzz:
        limits = ServerLimits(max_audio_seconds=30, max_body_bytes=4 << 20)
        with serving(create_app(assistant, name, api_key=KEY, limits=limits)) as base:
            result["fuzz"] = run_fuzz(base, fuzz_cases(args.fuzz, args.seed, limits.max_body_bytes))
            result["after_fuzz"] = still_answers(base)
        print(f"fuzz done in {result['fuzz']['seconds']} s", file=sys.stderr)
    if args.load:
        limits = ServerLimits(max_queue=args.max_queue, max_batch_size=16)
        with serving(create_app(assistant, name, api_key=KEY, limits=limits)) as base:
            result["load"] = run_load(base, args.load, args.sequential, args.max_queue, speech_clip(3.0), args.max_tokens)
        print(f"load done in {result['load']['seconds']} s", file=sys.stderr)
    sizes = [int(n) for n in args.clips.split(",") if n.strip()]
    if sizes:
        def make_app(batch: int) -> Any:
            limits = ServerLimits(max_batch_size=batch, max_queue=max(64, max(sizes)))
            return create_app(assistant, name, api_key=KEY, limits=limits)

        result["batching"] = run_batching(make_app, speech_clip(10.0), sizes, args.max_tokens)
    result["total_seconds"] = round(time.perf_counter() - began, 1)
    result["machine"]["load_average_after"] = os.getloadavg()  # other work on the machine skews every figure
    print(markdown(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    fuzz_ok = "fuzz" not in result or (result["fuzz"]["server_errors"] == result["fuzz"]["crashes"] == 0
                                       and all(result["after_fuzz"].values()))  # fmt: skip
    load_ok = "load" not in result or (result["load"]["lost"] == 0 and result["load"]["429_below_bound"] == 0)
    return 0 if fuzz_ok and load_ok else 1


if __name__ == "__main__":
    sys.exit(main())
