// omnivox chat page: one clip, a conversation about it, answers streamed from /v1/chat/completions.
//
// The clip (recorded with MediaRecorder or uploaded) is decoded by the browser, mixed to mono,
// resampled to 16 kHz and encoded as 16-bit WAV, so the server always gets a format it reads and
// the upload stays small. It goes as an input_audio part in the conversation's first user turn.
// Everything is sent to this page's own server; nothing else is contacted.
"use strict";

const SAMPLE_RATE = 16000; // what the model hears
const KEY_STORAGE = "omnivox.apiKey";
const TOOL_NOT_RUN = "This tool was not run: the omnivox web page cannot run tools.";

const $ = (id) => document.getElementById(id);

const state = {
  clip: null, // {name, seconds, data (base64 WAV), url (blob: URL of the WAV)}
  messages: [], // the conversation so far, as OpenAI chat messages
  model: null, // the server's model id, from /v1/models
  inFlight: null, // AbortController of the answer being streamed
  recorder: null, // {recorder, stream, timer, started} while recording
};

// ---------------------------------------------------------------------------------------------
// Errors

class ServerError extends Error {
  /** An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}. */
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.type = error.type || null;
  }
}

function errorText(err) {
  if (err instanceof ServerError) {
    const status = err.status ? `The server answered ${err.status}: ` : "The server reported an error: ";
    const code = err.code ? ` [${err.code}]` : "";
    const hint = err.status === 401 ? "\nSet the server's API key under Settings." : "";
    return status + err.message + code + hint;
  }
  if (err instanceof TypeError) return `Could not reach the server (${err.message}).`;
  return String(err.message || err);
}

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

async function readError(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "object" && body.error) return new ServerError(response.status, body.error);
  } catch {
    // not JSON: use the text as it came
  }
  return new ServerError(response.status, { message: text.trim() || response.statusText || "no details" });
}

// ---------------------------------------------------------------------------------------------
// Requests

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) {
      $("model").textContent = response.status === 401 ? "API key needed (Settings)" : "";
      if (response.status === 401) $("settings").open = true; // where the key goes
      return;
    }
    const body = await response.json();
    state.model = body.data && body.data[0] ? body.data[0].id : null;
    $("model").textContent = state.model ? `model: ${state.model}` : "";
  } catch {
    $("model").textContent = "";
  }
}

/** The data of each server-sent event in the stream `body` (a ReadableStream of bytes). */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const dataOf = (block) =>
    block
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer))) {
      const data = dataOf(buffer.slice(0, match.index));
      buffer = buffer.slice(match.index + match[0].length);
      if (data) yield data;
    }
  }
  const rest = dataOf(buffer);
  if (rest) yield rest;
}

async function readStream(body, answer) {
  for await (const data of sseData(body)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ServerError(0, chunk.error);
    if (chunk.usage) answer.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.delta) applyDelta(answer, choice.delta);
      if (choice.finish_reason) answer.finish = choice.finish_reason;
    }
  }
}

/** A whole (not streamed) chat.completion: the same parts as a stream, in one piece. */
function applyCompletion(body, answer) {
  if (body.error) throw new ServerError(0, body.error);
  const choice = (body.choices || [])[0];
  if (!choice) throw new ServerError(0, { message: "the answer has no choices" });
  const message = choice.message || {};
  const calls = (message.tool_calls || []).map((call, index) => ({ index, ...call }));
  applyDelta(answer, { content: message.content, tool_calls: calls, audio: message.audio });
  answer.finish = choice.finish_reason;
  answer.usage = body.usage || null;
}

async function send(question) {
  clearError();
  const history = state.messages; // "New chat" replaces the array: a late answer lands in the old one
  const first = history.length === 0;
  const clip = first ? state.clip : null;
  const content = clip
    ? [
        { type: "input_audio", input_audio: { data: clip.data, format: "wav" } },
        { type: "text", text: question },
      ]
    : question;
  const userMessage = { role: "user", content };
  const body = {
    model: state.model || "omnivox",
    messages: [...history, userMessage],
    stream: true,
    stream_options: { include_usage: true },
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;

  const userEl = renderUser(question, clip);
  const answer = startAnswer();
  const controller = new AbortController();
  setBusy(controller);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await readError(response);
    if ((response.headers.get("Content-Type") || "").includes("text/event-stream")) {
      await readStream(response.body, answer);
    } else {
      applyCompletion(await response.json(), answer);
    }
    finishAnswer(answer, null);
    history.push(userMessage, ...historyOf(answer));
  } catch (err) {
    if (err.name === "AbortError") {
      finishAnswer(answer, "Stopped.");
      history.push(userMessage, ...historyOf(answer));
    } else {
      // nothing of this turn is kept: the question goes back into the box to be sent again
      userEl.remove();
      answer.el.remove();
      $("question").value = question;
      showError(errorText(err));
    }
  } finally {
    setBusy(null);
    updateEmpty();
  }
}

/** The assistant's turn as it goes back to the server in the next request. */
function historyOf(answer) {
  const text = answer.content || answer.transcript || "";
  if (answer.finish !== "tool_calls" || answer.toolCalls.length === 0) return [{ role: "assistant", content: text }];
  // the model expects a result for every call it made; this page runs no tools, and says so
  const calls = answer.toolCalls.map((call) => ({
    id: call.id,
    type: "function",
    function: { name: call.function.name, arguments: call.function.arguments },
  }));
  return [
    { role: "assistant", content: text || null, tool_calls: calls },
    ...calls.map((call) => ({ role: "tool", tool_call_id: call.id, content: TOOL_NOT_RUN })),
  ];
}

// ---------------------------------------------------------------------------------------------
// The conversation on screen

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function renderUser(question, clip) {
  const li = element("li", "msg user");
  li.append(element("div", "role", "You"));
  if (clip) li.append(element("div", "attachment", `Clip: ${clip.name} (${clip.seconds.toFixed(1)} s)`));
  li.append(element("p", "text", question));
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function startAnswer() {
  const li = element("li", "msg assistant streaming");
  li.setAttribute("aria-busy", "true");
  const parts = element("div", "parts");
  li.append(element("div", "role", "omnivox"), parts);
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
  return {
    el: li,
    parts,
    textEl: null, // the text block receiving content (a new one after each tool call)
    content: "",
    transcript: "",
    toolCalls: [], // by index: {id, type, function: {name, arguments}, el}
    audio: [], // base64 pieces of the spoken answer
    finish: null,
    usage: null,
    started: performance.now(),
  };
}

function applyDelta(answer, delta) {
  if (typeof delta.content === "string" && delta.content) {
    if (!answer.textEl) {
      answer.textEl = element("p", "text");
      answer.parts.append(answer.textEl);
    }
    answer.content += delta.content;
    answer.textEl.textContent += delta.content;
  }
  for (const part of delta.tool_calls || []) {
    const index = Number.isInteger(part.index) ? part.index : answer.toolCalls.length;
    let call = answer.toolCalls[index];
    if (!call) {
      call = { id: "", type: "function", function: { name: "", arguments: "" }, el: renderToolCall() };
      answer.toolCalls[index] = call;
      answer.parts.append(call.el.root);
      answer.textEl = null; // text after a call goes below it
    }
    if (part.id) call.id = part.id;
    if (part.function && part.function.name) call.function.name = part.function.name;
    if (part.function && typeof part.function.arguments === "string") call.function.arguments += part.function.arguments;
    call.el.name.textContent = call.function.name || "…";
    call.el.root.setAttribute("aria-label", `Tool call: ${call.function.name}`);
    call.el.args.textContent = call.function.arguments;
  }
  if (delta.audio) {
    if (delta.audio.data) answer.audio.push(delta.audio.data);
    if (delta.audio.transcript) answer.transcript += delta.audio.transcript;
  }
  answer.el.scrollIntoView({ block: "nearest" });
}

function renderToolCall() {
  const root = element("div", "tool-call");
  root.setAttribute("role", "group");
  const head = element("div", "tool-head");
  const name = element("code", "tool-name");
  head.append(element("span", "badge", "Tool call"), name);
  const args = element("code", "tool-args");
  const pre = element("pre");
  pre.append(args);
  root.append(head, pre);
  return { root, name, args };
}

function finishAnswer(answer, note) {
  const li = answer.el;
  li.classList.remove("streaming");
  li.removeAttribute("aria-busy");
  for (const call of answer.toolCalls.filter(Boolean)) {
    try {
      call.el.args.textContent = JSON.stringify(JSON.parse(call.function.arguments), null, 2);
    } catch {
      // not (yet) JSON: shown as it came
    }
  }
  if (!answer.content && answer.transcript) answer.parts.append(element("p", "text", answer.transcript));
  if (answer.audio.length) {
    const audio = element("audio");
    audio.controls = true;
    audio.src = URL.createObjectURL(new Blob([base64Bytes(answer.audio)], { type: "audio/wav" }));
    audio.setAttribute("aria-label", "Spoken answer");
    answer.parts.append(audio);
  }
  const empty = !answer.content && !answer.transcript && !answer.audio.length && !answer.toolCalls.length;
  if (empty && !note) answer.parts.append(element("p", "note", "(The model gave an empty answer.)"));
  const notes = [];
  if (note) notes.push(note);
  if (answer.finish === "length") notes.push("Cut at the token limit.");
  if (answer.finish === "tool_calls") notes.push("The model asked for tools; this page does not run them.");
  const seconds = ((performance.now() - answer.started) / 1000).toFixed(1);
  const tokens = answer.usage ? `${answer.usage.completion_tokens} tokens, ` : "";
  notes.push(`${tokens}${seconds} s`);
  li.append(element("p", "note", notes.join(" ")));
}

function setBusy(controller) {
  state.inFlight = controller;
  $("send").disabled = Boolean(controller);
  $("stop").hidden = !controller;
  $("messages").setAttribute("aria-busy", controller ? "true" : "false");
}

function updateEmpty() {
  $("empty-chat").hidden = $("messages").children.length > 0;
}

function newChat() {
  if (state.inFlight) state.inFlight.abort();
  state.messages = [];
  $("messages").replaceChildren();
  clearError();
  updateEmpty();
}

// ---------------------------------------------------------------------------------------------
// Audio

/** The bytes of base64 `pieces` joined (each piece is encoded on its own). */
function base64Bytes(pieces) {
  const parts = pieces.map((piece) => Uint8Array.from(atob(piece), (c) => c.charCodeAt(0)));
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** 16-bit PCM WAV of mono `samples` (floats in [-1, 1]) at `rate` Hz. */
function encodeWav(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const ascii = (at, text) => [...text].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // one channel
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return view.buffer;
}

/** Any audio the browser can decode, as 16 kHz mono WAV: {wav: ArrayBuffer, seconds}. */
async function toWav(encoded) {
  // decoding through an offline context at 16 kHz resamples too, and needs no sound device
  const context = new OfflineAudioContext(1, 1, SAMPLE_RATE);
  const audio = await context.decodeAudioData(encoded);
  if (audio.length === 0) throw new Error("it holds no audio");
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const channel = audio.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / audio.numberOfChannels;
  }
  return { wav: encodeWav(mono, audio.sampleRate), seconds: audio.duration };
}

function blobBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function useClip(blob, name) {
  clearError();
  $("clip-status").textContent = `Reading ${name}…`;
  let decoded;
  try {
    decoded = await toWav(await blob.arrayBuffer());
  } catch (err) {
    showError(`${name} could not be read as audio by this browser: ${err.message || err.name}.`);
    describeClip();
    return;
  }
  const wav = new Blob([decoded.wav], { type: "audio/wav" });
  if (state.clip) URL.revokeObjectURL(state.clip.url);
  state.clip = { name, seconds: decoded.seconds, data: await blobBase64(wav), url: URL.createObjectURL(wav) };
  newChat(); // a new clip starts a new conversation about it
  describeClip();
}

function removeClip() {
  if (state.clip) URL.revokeObjectURL(state.clip.url);
  state.clip = null;
  newChat();
  describeClip();
}

function describeClip() {
  const clip = state.clip;
  const player = $("clip-player");
  player.hidden = !clip;
  $("clip-remove").hidden = !clip;
  if (!clip) {
    player.removeAttribute("src");
    $("clip-status").textContent = "No clip yet: record one or upload (or drop) a file. You can also chat without one.";
    return;
  }
  if (player.src !== clip.url) player.src = clip.url;
  $("clip-status").textContent =
    `${clip.name}: ${clip.seconds.toFixed(1)} s, sent as 16 kHz WAV with the first question.`;
}

async function toggleRecording() {
  if (state.recorder) {
    state.recorder.recorder.stop();
    return;
  }
  clearError();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof MediaRecorder === "undefined") {
    showError(
      "This browser cannot record here: the microphone needs a secure page (https, or the server on localhost). " +
        "Upload a file instead.",
    );
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    showError(`The microphone could not be opened: ${err.message || err.name}.`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const started = performance.now();
  recorder.ondataavailable = (event) => {
    if (event.data.size) chunks.push(event.data);
  };
  recorder.onstop = async () => {
    clearInterval(state.recorder.timer);
    stream.getTracks().forEach((track) => track.stop());
    state.recorder = null;
    setRecording(false);
    const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    await useClip(blob, `recording at ${new Date().toLocaleTimeString()}`);
  };
  const tick = () => {
    const seconds = ((performance.now() - started) / 1000).toFixed(0);
    $("clip-status").textContent = `Recording… ${seconds} s. Press Stop when done.`;
  };
  recorder.start();
  state.recorder = { recorder, timer: setInterval(tick, 500) };
  tick();
  setRecording(true);
}

function setRecording(on) {
  const button = $("record");
  button.setAttribute("aria-pressed", on ? "true" : "false");
  button.textContent = on ? "Stop recording" : "Record";
}

// ---------------------------------------------------------------------------------------------
// Wiring

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, key.value.trim()));
  key.addEventListener("change", loadModel);

  $("record").addEventListener("click", toggleRecording);
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = ""; // the same file chosen again is a new choice
    if (file) useClip(file, file.name);
  });
  $("clip-remove").addEventListener("click", removeClip);

  const drop = $("clip");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) useClip(file, file.name);
  });

  const question = $("question");
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (!text || state.inFlight) return;
    question.value = "";
    send(text);
  });
  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.inFlight && state.inFlight.abort());
  $("new-chat").addEventListener("click", newChat);
  $("error-close").addEventListener("click", clearError);

  updateEmpty();
  loadModel();
}

init();
