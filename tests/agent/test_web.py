"""The chat page at ``/``, driven in headless Chromium (Debian's package) against a real server.

The server runs the tiny random model on a loopback port; an ASGI wrapper keeps every chat request
body, so the tests check what reached the server, not only what the page shows. Every page runs
with a route that aborts and records any request to another host. Answers the server cannot give
yet (tool calls, spoken audio) are scripted by intercepting the request in the browser.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx2 as httpx
import numpy as np
import pytest
import soundfile as sf
import tiny

uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives the browser")

from omnivox.agent.server import create_app  # noqa: E402
from omnivox.agent.web import HERE, STATIC_FILES  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not at /usr/bin/chromium (apt-get install chromium; .ci/run installs it)",
)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # a fake microphone (a beeping tone) that is granted without asking, for the recording test
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]  # fmt: skip
KEY = "web-key-123"
WAIT_MS = 60_000  # the tiny model answers in well under a second; CI machines can be slow


class ChatRecorder:
    """ASGI wrapper that keeps the JSON body of every ``POST /v1/chat/completions`` that arrives."""

    def __init__(self, app) -> None:
        self.app = app
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        body = bytearray()

        async def tee():
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(body))
            return message

        await self.app(scope, tee, send)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(base URL, ChatRecorder): uvicorn in a thread over the tiny model, greedy, 8 new tokens, with a key."""
    from omnivox.agent.assistant import Assistant

    folder = tiny.greedy_copy(tiny_model_dir, tmp_path_factory.mktemp("web"), max_new_tokens=8)
    recorder = ChatRecorder(create_app(Assistant.from_pretrained(folder), folder.name, api_key=KEY))
    with tiny.serving(recorder) as url:
        yield url, recorder
    recorder.app.state.batcher.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """A page in a fresh browser context; ``foreign`` lists requests to any host but the server (aborted)."""

    def __init__(self, browser, base: str, width: int = 1000, height: int = 800) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(WAIT_MS)
        self.foreign: list[str] = []
        server_host = urlsplit(base).netloc
        self.context.route("**/*", lambda route: self._guard(route, server_host))
        self.page = self.context.new_page()
        self.page.goto(base + "/")

    def _guard(self, route, server_host: str) -> None:
        url = route.request.url
        if urlsplit(url).netloc != server_host:
            self.foreign.append(url)
            route.abort()
        else:
            route.continue_()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, server):
    opened: list[Tab] = []

    def open_tab(**kw) -> Tab:
        opened.append(Tab(browser, server[0], **kw))
        return opened[-1]

    yield open_tab
    for t in opened:
        t.close()


def _clip_file(path: Path, seconds: float = 1.0, rate: int = 22050) -> Path:
    """A stereo WAV at ``rate`` Hz, so the page has to mix it down and resample it."""
    mono = tiny.tone_clip(seconds, sample_rate=rate)
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1), rate)
    return path


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    if os.environ.get("OMNIVOX_SCREENSHOT_DIR"):
        out = Path(os.environ["OMNIVOX_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def _ask(page, question: str) -> None:
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Send").click()


def _answers(page, count: int):
    """The assistant messages once ``count`` of them have finished streaming."""
    done = page.locator(".msg.assistant:not(.streaming)")
    sync_api.expect(done).to_have_count(count, timeout=WAIT_MS)
    return done


def _no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_page_and_its_files_are_served_without_a_key(server):
    base = server[0]
    page = httpx.get(base + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text
    for name, media_type in STATIC_FILES.items():
        response = httpx.get(f"{base}/static/{name}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == media_type
        assert response.text == (HERE / name).read_text()
    hidden = httpx.get(base + "/static/__init__.py", timeout=10)  # only the listed files are served
    assert hidden.status_code == 404 and "app.js" in hidden.json()["error"]["message"]
    assert httpx.get(base + "/v1/models", timeout=10).status_code == 401  # the API keeps its key
    for name in ("index.html", *STATIC_FILES):  # nothing is loaded from other hosts
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", (HERE / name).read_text()), name


def test_upload_ask_and_follow_up_streams_the_models_answers(tab, server, tmp_path):
    base, recorder = server
    t = tab()
    page = t.page
    key = page.get_by_label("API key")
    sync_api.expect(key).to_be_visible()  # the server wants a key: the settings open by themselves
    key.fill(KEY)
    page.get_by_label("Upload audio file").set_input_files(str(_clip_file(tmp_path / "tone.wav")))
    sync_api.expect(page.locator("#clip-status")).to_contain_text("tone.wav: 1.0 s")
    sync_api.expect(page.get_by_label("The clip, as the model hears it")).to_be_visible()
    sync_api.expect(page.get_by_role("button", name="Remove clip")).to_be_visible()

    before = len(recorder.bodies)
    _ask(page, "What is said?")
    first = _answers(page, 1).nth(0).locator(".text").text_content()
    sync_api.expect(page.locator("#error")).to_be_hidden()
    assert len(recorder.bodies) == before + 1
    sent = recorder.bodies[-1]
    assert sent["stream"] is True
    (turn,) = sent["messages"]
    assert turn["role"] == "user"
    audio, text = turn["content"]
    assert text == {"type": "text", "text": "What is said?"}
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])))
    assert rate == 16000 and samples.ndim == 1 and abs(len(samples) - 16000) <= 16  # mono, resampled, 1 s
    # what the page shows is the whole answer: the same request, not streamed, gives the same text
    replay = httpx.post(base + "/v1/chat/completions", json={**sent, "stream": False},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
    assert replay.status_code == 200, replay.text
    assert first and first == replay.json()["choices"][0]["message"]["content"]

    page.get_by_label("Question").fill("And then?")
    page.get_by_label("Question").press("Enter")  # Enter sends
    _answers(page, 2)
    sync_api.expect(page.locator("#error")).to_be_hidden()
    follow_up = recorder.bodies[-1]["messages"]
    assert follow_up == [
        turn,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    users = page.locator(".msg.user")
    sync_api.expect(users).to_have_count(2)
    sync_api.expect(users.nth(0).locator(".attachment")).to_contain_text("tone.wav")
    assert page.evaluate("localStorage.getItem('omnivox.apiKey')") == KEY
    sync_api.expect(page.locator("#model")).to_have_text("model: tiny-greedy")
    _screenshot(page, tmp_path, "web_chat.png")

    page.get_by_role("button", name="New chat").click()  # the clip stays and opens the new conversation
    sync_api.expect(page.locator(".msg")).to_have_count(0)
    _ask(page, "Again?")
    _answers(page, 1)
    (again,) = recorder.bodies[-1]["messages"]
    assert again["content"][0] == audio and again["content"][1]["text"] == "Again?"
    assert t.foreign == []


def test_a_wrong_key_shows_the_servers_error_and_keeps_the_question(tab, tmp_path):
    t = tab()
    page = t.page
    page.get_by_role("textbox", name="API key").fill("not-the-key")
    with page.expect_response("**/v1/chat/completions") as response:
        _ask(page, "Hello?")
    assert response.value.status == 401
    banner = page.get_by_role("alert")
    sync_api.expect(banner).to_be_visible()
    sync_api.expect(banner).to_contain_text("401: invalid or missing API key")
    sync_api.expect(banner).to_contain_text("[invalid_api_key]")
    sync_api.expect(page.locator(".msg")).to_have_count(0)  # the failed turn is not kept...
    sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled()
    sync_api.expect(page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()
    sync_api.expect(page.get_by_role("button", name="Remove clip")).to_be_hidden()
    sync_api.expect(page.get_by_label("Question")).to_have_value("Hello?")  # ...its question is back
    _screenshot(page, tmp_path, "web_error.png")
    page.get_by_role("button", name="Dismiss the error").click()
    sync_api.expect(banner).to_be_hidden()
    assert t.foreign == []


def _sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def test_tool_calls_and_spoken_answers_render_at_a_narrow_width(tab, tmp_path):
    """Scripted answers (the server cannot call tools or speak yet): calls shown as they stream, audio played."""
    wav = io.BytesIO()
    sf.write(wav, tiny.tone_clip(0.5, sample_rate=16000), 16000, format="WAV")
    wav_bytes = wav.getvalue()
    half = len(wav_bytes) // 2
    call = {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "transcribe", "arguments": ""},
    }
    streamed_call = _sse(
        _chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"clip": "cl'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ip-1", "timestamps": false}'}}]}),
        _chunk({}, "tool_calls"),
    )
    streamed_speech = _sse(
        _chunk({"role": "assistant", "content": "Here it is."}),
        _chunk({"audio": {"id": "audio_1", "data": base64.b64encode(wav_bytes[:half]).decode()}}),
        _chunk({"audio": {"data": base64.b64encode(wav_bytes[half:]).decode(), "transcript": "Here it is."}}),
        _chunk({}, "stop"),
    )
    whole_speech = json.dumps({
        "id": "chatcmpl-y", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
            "role": "assistant", "content": None, "refusal": None,
            "audio": {"id": "audio_2", "data": base64.b64encode(wav_bytes).decode(), "transcript": "Said aloud.",
                      "expires_at": 0}}}],
    })  # fmt: skip
    scripted = [("text/event-stream", streamed_call), ("text/event-stream", streamed_speech),
                ("application/json", whole_speech)]  # fmt: skip
    requests: list[dict] = []

    def answer(route) -> None:
        requests.append(route.request.post_data_json)
        content_type, body = scripted[len(requests) - 1]
        route.fulfill(status=200, content_type=content_type, body=body)

    t = tab(width=360, height=740)
    page = t.page
    page.route("**/v1/chat/completions", answer)
    _ask(page, "Transcribe it with a tool.")
    answers = _answers(page, 1)
    block = answers.nth(0).get_by_role("group", name="Tool call: transcribe")
    sync_api.expect(block.locator(".tool-name")).to_have_text("transcribe")
    assert json.loads(block.locator(".tool-args").text_content()) == {"clip": "clip-1", "timestamps": False}
    sync_api.expect(answers.nth(0)).to_contain_text("does not run them")

    _ask(page, "Say it.")
    second = _answers(page, 2).nth(1)
    sync_api.expect(second.locator(".text")).to_have_text("Here it is.")
    # the call went back as the assistant's turn, answered by a tool turn saying it was not run
    history = requests[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "user"]
    assert history[1]["content"] is None
    assert history[1]["tool_calls"] == [{"id": "call_abc", "type": "function", "function": {
        "name": "transcribe", "arguments": '{"clip": "clip-1", "timestamps": false}'}}]  # fmt: skip
    assert history[2]["tool_call_id"] == "call_abc" and "not run" in history[2]["content"]

    _ask(page, "Once more, not streamed.")
    third = _answers(page, 3).nth(2)
    sync_api.expect(third.locator(".text")).to_have_text("Said aloud.")  # the transcript stands in for text
    for message in (second, third):  # both spoken answers play: pieces joined, whole decoded
        player = message.get_by_label("Spoken answer")
        sync_api.expect(player).to_have_attribute("src", re.compile(r"^blob:"))
        page.wait_for_function("(a) => a.readyState >= 1 && Math.abs(a.duration - 0.5) < 0.01",
                               arg=player.element_handle())  # fmt: skip
    assert requests[2]["messages"][-2] == {"role": "assistant", "content": "Here it is."}
    assert _no_horizontal_scroll(page)
    _screenshot(page, tmp_path, "web_tools_narrow.png")
    assert t.foreign == []


def test_recording_from_the_microphone_sends_a_16khz_wav(tab):
    """Chromium's fake microphone (a beep); the chat request is answered in the browser, to read what it carried."""
    sent: list[dict] = []

    def answer(route) -> None:
        sent.append(route.request.post_data_json)
        route.fulfill(
            status=200, content_type="text/event-stream", body=_sse(_chunk({"content": "A beep."}, "stop"))
        )

    t = tab()
    page = t.page
    page.route("**/v1/chat/completions", answer)
    page.get_by_role("button", name="Record").click()
    stop = page.get_by_role("button", name="Stop recording")
    sync_api.expect(stop).to_have_attribute("aria-pressed", "true")
    page.wait_for_timeout(1200)
    stop.click()
    sync_api.expect(page.locator("#clip-status")).to_contain_text("sent as 16 kHz WAV")
    _ask(page, "What is this?")
    sync_api.expect(_answers(page, 1).locator(".text")).to_have_text("A beep.")
    audio, _ = sent[0]["messages"][0]["content"]
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])))
    assert rate == 16000 and samples.ndim == 1 and 0.8 < len(samples) / rate < 5
    assert np.abs(samples).max() > 0.01  # the beep, not silence
    sync_api.expect(page.locator("#error")).to_be_hidden()
    assert t.foreign == []


def test_requests_to_other_hosts_are_caught_and_the_page_policy_refuses_them(tab):
    t = tab()
    page = t.page
    # the page's own policy refuses connections elsewhere before they leave the browser
    refused = page.evaluate("fetch('http://example.invalid/x').then(() => 'sent', () => 'refused')")
    assert refused == "refused"
    # and the guard every test relies on does see (and stop) a request to another host
    with pytest.raises(sync_api.Error):
        page.goto("http://example.invalid/")
    assert t.foreign == ["http://example.invalid/"]
