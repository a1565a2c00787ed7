"""`omnivox serve` with no --model, as a user starts it: the bundled nano answers curl and the stock openai client."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
JFK = ROOT / "assets" / "examples" / "jfk.flac"
TRIM = {
    "type": "function",
    "function": {
        "name": "trim",
        "description": "Cut a clip to the part from start to end (seconds).",
        "parameters": {
            "type": "object",
            "properties": {
                "clip": {"type": "string", "pattern": "^clip-[1-9]$"},
                "start": {"type": "number", "minimum": 0},
                "end": {"type": "number", "minimum": 0},
            },
            "required": ["clip", "start", "end"],
            "additionalProperties": False,
        },
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nano_server():
    if not (ROOT / "assets" / "nano" / "config.json").is_file():
        pytest.skip("the bundled model is not in this checkout")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "OMNIVOX_MODEL"}
    proc = subprocess.Popen([sys.executable, "-m", "omnivox.agent.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a first start folds the LoRA into the LLM and caches it
    try:
        while True:
            assert proc.poll() is None, f"omnivox serve ended: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "omnivox serve did not listen within 600 s"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_a_transcript_of_a_real_clip(nano_server):
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-F", f"file=@{JFK}", "-F", "model=nano",
                          f"{nano_server}/v1/audio/transcriptions"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = json.loads(out.stdout)["text"].lower()
    assert "ask not what your country can do for you" in text, text


def test_the_openai_client_gets_a_transcript_and_a_tool_call_that_validates(nano_server):
    client = openai.OpenAI(base_url=nano_server + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)
    assert client.models.list().data[0].id == "nano"
    wav = base64.b64encode(JFK.read_bytes()).decode()
    audio = {"type": "input_audio", "input_audio": {"data": wav, "format": "flac"}}
    reply = client.chat.completions.create(model="nano", temperature=0, messages=[
        {"role": "user", "content": [audio, {"type": "text", "text": "Transcribe the speech."}]}])  # fmt: skip
    assert "what you can do for your country" in reply.choices[0].message.content.lower()
    reply = client.chat.completions.create(model="nano", temperature=0, tools=[TRIM], tool_choice="required", messages=[
        {"role": "user", "content": [audio, {"type": "text", "text": "Cut clip-1 to its first 2.5 seconds."}]}])  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "trim"
    jsonschema.validate(json.loads(call.function.arguments), TRIM["function"]["parameters"])
