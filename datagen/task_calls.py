"""Tool-call items (issue 11): the model is offered tools in its system turn and answers a request
about clip-1 with the right call(s), or in words when no offered tool fits.

Every item is a whole episode, written as role turns::

    system     tools_text(offered tools)             2-6 tools, shuffled, the needed ones among them
    user       the request (clip-1 is the clip)
    assistant  calls_text([...])                     one call, or two independent ones
    tool       result_text(name, content)            one per call, as the tool would answer
    (assistant calls / tool results again: chains)
    assistant  a short answer built from the results

or ``user -> assistant (words)`` when no call is right. ``metadata["expected"]`` lists each assistant
turn's calls (``[]`` for a text turn) for scoring; ``metadata["tools"]`` the offered tool specs.

Families (``metadata["family"]``), each with its own source for the arguments:

=========== ==============================================================================
request     the request names the action and its numbers/words ("keep only the first 2.5 seconds")
speech      the clip is a spoken command ("make this recording six decibels quieter"); the
            request only says to do what the speaker asks
transcript  an argument is what the speaker says (``save_note(text=<transcript>)``)
sound       an argument describes the sound heard (``generate_sound(description=<caption>)``)
ask         ``ask(clip, question)`` with the question copied from the request
chain       two calls in sequence: the second uses the first's output (``audio-1``, a transcript)
parallel    two independent calls in one turn
no_call     a question about the clip (the other tasks' builders) with only unrelated tools offered
unavailable an action whose tool is not offered: "None of the available tools can do that."
=========== ==============================================================================

Held out: the tools of :data:`HELD_OUT_TOOLS` are offered only in the test split, and each tool's
request wordings come in two lists, ``train`` (train split) and ``test`` (validation and test splits).
The clip is 1-8 s; voices and sentences come from the split's pools, as for every task.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnivox.agent.builtin_tools import measure_audio  # the same numbers the real tool reports
from omnivox.datagen.sounds import COUNTABLE, SR, SoundEvent, make_sound
from omnivox.datagen.tasks import (
    LABEL_PHRASE,
    Item,
    Resources,
    Speech,
    _non_silent_labels,
    _speech_meta,
    add_background,
    build_captioning,
    build_classification,
    build_counting,
    build_event_list,
    build_loudness,
    build_order,
    build_presence,
    build_speaker,
    build_spoken_qa,
    build_transcription,
    content_question,
    degrade,
    finish,
    sequence,
    speak,
)
from omnivox.datagen.text import (
    ANIMALS,
    CITIES,
    COLOURS,
    DAYS,
    NAMES,
    OBJECTS,
    VEHICLES,
    Sentence,
    normalise_for_tts,
)
from omnivox.decoders.speech import MAX_TEXT_CHARS
from omnivox.prompts.tools import ToolSpec, calls_text, result_text, tools_text

VERSION = "1"
TASK = "task_calls"
CLIP = "clip-1"
MIN_SECONDS, MAX_SECONDS = 1.0, 8.0
NO_TOOL_ANSWER = "None of the available tools can do that."

Args = dict[str, Any]

# --------------------------------------------------------------------------------------
# The tools, as data: name, description, and the JSON schema pydantic derives from the signature


_TYPES = {str: "string", float: "number", int: "integer", bool: "boolean"}
CLIP_ID = {"description": "the clip's id.", "pattern": "^(clip|audio)-[1-9][0-9]{0,3}$", "type": "string"}


def _schema(*params: tuple[Any, ...]) -> dict[str, Any]:
    """The arguments' JSON schema as ``omnivox.agent.tools.tool`` writes it (pydantic, titles dropped).

    Each param is ``(name, type)`` or ``(name, type, default)``; the type is a Python type, a tuple of
    strings (an enum: a ``Literal``) or a whole property schema (a dict).
    """
    properties: dict[str, Any] = {}
    required = []
    for name, kind, *default in params:
        if isinstance(kind, dict):
            prop = dict(kind)
        elif isinstance(kind, tuple):
            prop = {"enum": list(kind), "type": "string"}
        else:
            prop = {"type": _TYPES[kind]}
        if default:
            prop = {"default": default[0], **prop}
        else:
            required.append(name)
        properties[name] = prop
    return {"additionalProperties": False, "properties": properties, "required": required, "type": "object"}


def _described(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "description": description}


AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
ROOMS = ("small", "medium", "large")


@dataclass(frozen=True)
class ToolDef:
    """One tool: its ``spec`` and its ``kind``: ``edit`` (a clip in, a new clip out), ``listen`` (a clip in,
    text out), ``make`` (a new clip from words) or ``info`` (no audio)."""

    spec: ToolSpec
    kind: str


def _tool(name: str, kind: str, description: str, *params: tuple[Any, ...]) -> ToolDef:
    return ToolDef(ToolSpec(name, description, _schema(*params)), kind)


_C = ("clip", CLIP_ID)
_SECONDS = {"maximum": 3600, "minimum": 0, "type": "number"}
# The agent's built-ins as agent/builtin_tools.py declares them (descriptions and schemas copied, so a
# training prompt offers them exactly as the agent does; tests/datagen/test_task_calls.py compares).
BUILTIN_DEFS: tuple[ToolDef, ...] = (
    _tool("transcribe", "listen", "Transcribe the speech in a clip.",
          ("clip", _described("the clip's id, e.g. clip-1 or audio-2.", CLIP_ID)),
          ("timestamps", _described("give each stretch of speech with its start and end in seconds.", {"type": "boolean"}), False)),
    _tool("ask", "listen", "Ask a question about what can be heard in a clip.", _C,
          ("question", {"description": "the question, in words.", "maxLength": 300, "minLength": 1, "type": "string"})),
    _tool("detect_speech", "listen", "Find the stretches of a clip where someone speaks, with start and end in seconds.", _C),
    _tool("measure", "listen", "Measure a clip: duration, sample rate, loudness (LUFS), peak and RMS level (dBFS).", _C),
    _tool("trim", "edit", "Cut a clip to the part from start to end (seconds); makes a new audio id.", _C,
          ("start", _described("where the kept part starts, in seconds.", _SECONDS)),
          ("end", _described("where it ends, in seconds.", _SECONDS))),
    _tool("mix", "edit", "Mix another clip into a clip, starting at an offset; makes a new audio id.",
          ("clip", _described("the clip mixed into (its sample rate is kept).", CLIP_ID)),
          ("other", _described("the clip added.", CLIP_ID)),
          ("other_gain_db", {"description": "gain applied to the other clip, in dB.", "maximum": 24, "minimum": -60,
                             "type": "number"}, 0.0),
          ("offset", _described("where the other clip starts, in seconds from the start of the first.", _SECONDS), 0.0)),
    _tool("convert", "edit", "Resample a clip and write it in another format; makes a new audio id.", _C,
          ("sample_rate", {"description": "the new sample rate in Hz (8000 to 48000).", "maximum": 48000, "minimum": 8000,
                           "type": "integer"}, 16000),
          ("format", {"description": "the file format.", "enum": list(AUDIO_FORMATS), "type": "string"}, "wav")),
    _tool("speak", "make", "Say a text aloud with a synthetic voice; makes a new audio id.",
          ("text", {"description": "the words to say.", "maxLength": MAX_TEXT_CHARS, "minLength": 1, "type": "string"}),
          ("voice", {"description": "a voice of the model's, or default.", "maxLength": 64, "minLength": 1,
                     "type": "string"}, "default")),
    _tool("remove_noise", "edit", "Remove steady background noise from a clip; makes a new audio id.", _C),
    # named in the issue with these signatures; not (yet) in agent/builtin_tools.py
    _tool("generate_sound", "make", "Generate a sound from a description; makes a new audio id.",
          ("description", str), ("seconds", float, 5.0)),
)
TOOL_DEFS: tuple[ToolDef, ...] = BUILTIN_DEFS + (
    # other audio tools
    _tool("set_volume", "edit", "Make a clip louder or quieter by gain_db decibels (negative is quieter); makes a new audio id.",
          _C, ("gain_db", float)),
    _tool("reverse", "edit", "Reverse a clip so it plays backwards; makes a new audio id.", _C),
    _tool("fade", "edit", "Fade a clip in at the start and out at the end over the given seconds; makes a new audio id.",
          _C, ("seconds", float)),
    _tool("normalize", "edit", "Set a clip's loudness to a target in LUFS; makes a new audio id.", _C, ("lufs", float, -23.0)),
    _tool("add_reverb", "edit", "Add room reverberation to a clip; makes a new audio id.", _C, ("room", ROOMS, "medium")),
    _tool("change_speed", "edit", "Play a clip faster or slower by a factor (2.0 is twice as fast); makes a new audio id.",
          _C, ("factor", float)),
    _tool("count_events", "listen", "Count how many times a sound (beeps, clicks, knocks) occurs in a clip.", _C, ("sound", str)),
    _tool("find_word", "listen", "Check whether a word is spoken in a clip.", _C, ("word", str)),
    _tool("pitch_shift", "edit", "Shift the pitch of a clip by a number of semitones (negative is lower); makes a new audio id.",
          _C, ("semitones", float)),
    _tool("loop", "edit", "Repeat a clip a number of times in a row; makes a new audio id.", _C, ("times", int)),
    _tool("classify_sound", "listen", "Name the kind of sound in a clip.", _C),
    # tools without audio
    _tool("translate", "info", "Translate a short text into another language.", ("text", str), ("language", str)),
    _tool("send_email", "info", "Send an email to a contact.", ("to", str), ("subject", str)),
    _tool("send_message", "info", "Send a text message to a contact.", ("to", str), ("text", str)),
    _tool("search_web", "info", "Search the web and return the number of results.", ("query", str)),
    _tool("get_weather", "info", "Get the current weather in a city.", ("city", str)),
    _tool("get_time", "info", "Get the local time in a city.", ("city", str)),
    _tool("set_timer", "info", "Start a countdown timer.", ("minutes", int)),
    _tool("set_reminder", "info", "Set a reminder for a time of day.", ("text", str), ("time", str)),
    _tool("play_music", "info", "Play music of a genre.", ("genre", str)),
    _tool("save_note", "info", "Save a text as a note.", ("text", str)),
    _tool("calculate", "info", "Evaluate an arithmetic expression such as 12 * 7.", ("expression", str)),
    _tool("call_phone", "info", "Start a phone call to a contact.", ("name", str)),
)
TOOLS: dict[str, ToolDef] = {t.spec.name: t for t in TOOL_DEFS}
BUILTIN_TOOLS = tuple(t.spec.name for t in BUILTIN_DEFS)
# Offered (as targets and as distractors) only in the test split: does the model read a new tool's line?
HELD_OUT_TOOLS = frozenset({"pitch_shift", "loop", "classify_sound", "send_message", "get_time"})
# Tools that could also do each other's job: never offered together when one is the answer (or missing).
OVERLAPS: dict[str, frozenset[str]] = {
    "ask": frozenset({"transcribe", "detect_speech", "measure", "count_events", "find_word", "classify_sound"}),
    "transcribe": frozenset({"find_word", "detect_speech"}),
    "send_email": frozenset({"send_message"}),
}


def _overlaps(name: str) -> set[str]:
    out = set(OVERLAPS.get(name, ()))
    out |= {other for other, group in OVERLAPS.items() if name in group}
    return out


def tools_for_split(split: str) -> list[str]:
    """The tools a split may offer: held-out ones only in test."""
    return [n for n in TOOLS if split == "test" or n not in HELD_OUT_TOOLS]


def spec_dict(spec: ToolSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "parameters": dict(spec.parameters)}


def spec_of(data: dict[str, Any]) -> ToolSpec:
    """The inverse of :func:`spec_dict` (a manifest's ``metadata["tools"]`` entry)."""
    return ToolSpec(data["name"], data["description"], data["parameters"])


# --------------------------------------------------------------------------------------
# Clips: what is in them (for the tools' results) and how they are rendered


@dataclass
class Audio:
    """A clip of the conversation (``clip-1``) or one a tool made (``audio-N``): its ``duration`` (s),
    ``segments`` (label, onset, offset; speech with ``text``, events with ``caption``/``count``), and
    ``samples`` ``[T]`` where known (for ``measure``)."""

    id: str
    duration: float
    segments: list[dict[str, Any]] = field(default_factory=list)
    samples: np.ndarray | None = None
    sample_rate: int = 16000

    def speech(self) -> list[dict[str, Any]]:
        return [s for s in self.segments if s["label"] == "speech" and s.get("text")]

    def countable(self) -> dict[str, Any] | None:
        found = [s for s in self.segments if s["label"] in COUNTABLE]
        return found[0] if len(found) == 1 else None

    def single_event(self) -> dict[str, Any] | None:
        return self.segments[0] if len(self.segments) == 1 and self.segments[0]["label"] != "speech" else None


def satisfies(clip: Audio, need: str | None) -> bool:
    """Whether ``clip`` holds what a phrasing ``need``s: speech, exactly one countable event, or a single sound."""
    if need == "speech":
        return bool(clip.speech())
    if need == "countable":
        return clip.countable() is not None
    if need == "event":
        return clip.single_event() is not None
    return True


@dataclass
class Rendered:
    """Clip-1 as rendered: samples ``[T]``, metadata, and what a tool would find in it."""

    x: np.ndarray
    meta: dict[str, Any]
    clip: Audio


def _sounds(rng: np.random.Generator, n: int) -> list[SoundEvent]:
    return [make_sound(str(lb), rng) for lb in rng.choice(_non_silent_labels(), n, replace=False)]


def _finish_clip(rng: np.random.Generator, res: Resources, things: Sequence[SoundEvent | Speech], noise: float) -> Rendered:
    tl = sequence(rng, things)
    x = tl.audio()
    meta: dict[str, Any] = {"segments": tl.segments, "sounds": [s["label"] for s in tl.segments if s["label"] != "speech"]}
    speech = [t for t in things if isinstance(t, Speech)]
    if speech:
        meta.update(_speech_meta(speech[0]))
    if rng.random() < noise:
        x, bg = add_background(x, rng, (15.0, 30.0))
        meta["background"], meta["snr"] = bg, bg["snr"]
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng)
    return Rendered(x, meta, Audio(CLIP, x.size / SR, [dict(s) for s in tl.segments], x))


def render_clip(rng: np.random.Generator, split: str, res: Resources, need: str | None = None) -> Rendered:
    """A 1-8 s clip-1 that satisfies ``need``: speech (a short sentence of the split), one countable
    event, a single sound, or (None) one or two sounds or speech."""
    needs = {need} - {None}
    for _ in range(20):
        things: list[SoundEvent | Speech] = []
        if "countable" in needs:
            label = str(rng.choice(list(COUNTABLE)))
            things.append(COUNTABLE[label](rng, count=int(rng.integers(1, 7))))
        if "event" in needs:
            things.append(make_sound(str(rng.choice(_non_silent_labels())), rng))
        if "speech" in needs or (not needs and rng.random() < 0.4):
            things.insert(int(rng.integers(len(things) + 1)), _short_speech(rng, split, res))
        if not things:
            things = list(_sounds(rng, int(rng.integers(1, 3))))
        out = _finish_clip(rng, res, things, noise=0.0 if "countable" in needs else 0.3)
        if MIN_SECONDS <= out.clip.duration <= MAX_SECONDS:
            return out
    raise RuntimeError(f"no clip with {sorted(needs)} within {MIN_SECONDS}-{MAX_SECONDS} s in 20 tries")


def _short_speech(rng: np.random.Generator, split: str, res: Resources, max_words: int = 12) -> Speech:
    for _ in range(50):
        sentence = res.corpus.templated(split, rng) if rng.random() < 0.4 else res.corpus.sentence(split, rng)
        if len(sentence.written.split()) <= max_words:
            return speak(rng, split, res, sentence=sentence)
    raise RuntimeError(f"no sentence of at most {max_words} words in split {split!r} in 50 tries")


# --------------------------------------------------------------------------------------
# Phrasings: how a request for a tool is worded, and where its arguments come from


def _num(x: float) -> str:
    """A number as a request writes it: ``2.5``, ``3``."""
    return f"{x:g}"


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _grid(rng: np.random.Generator, lo: float, hi: float, step: float = 0.5) -> float:
    """A multiple of ``step`` in [lo, hi] (lo itself when the range holds none)."""
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return round(step * int(rng.integers(first, last + 1)), 3) if last >= first else round(lo, 3)


Draw = Callable[[np.random.Generator, Audio], tuple[Args, dict[str, str]]]


@dataclass(frozen=True)
class Phrasing:
    """Ways to ask for one use of ``tool``: clause templates per split (imperative, lower case, ``{clip}``
    where a clip is meant) and ``draw(rng, clip) -> (arguments, slots)``.

    ``needs``: what the clip must hold (see :func:`satisfies`); ``spoken``: a speaker may say it (the
    speech family).
    """

    tool: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    draw: Draw
    needs: str | None = None
    spoken: bool = True

    def templates(self, split: str) -> tuple[str, ...]:
        if self.tool in HELD_OUT_TOOLS:
            return self.train + self.test
        return self.train if split == "train" else self.test


def _on(clip: Audio, **args: Any) -> Args:
    return {"clip": clip.id, **args}


def _d_trim_first(rng, clip):
    end = _grid(rng, 0.5, clip.duration - 0.1)
    if end == 1.0:  # "the first 1 seconds"
        end = 1.5 if clip.duration - 0.1 >= 1.5 else 0.5
    return _on(clip, start=0.0, end=end), {"end": _num(end)}


def _d_trim_span(rng, clip):
    start = _grid(rng, 0.5, clip.duration - 0.7)
    end = _grid(rng, start + 0.5, clip.duration - 0.05)
    return _on(clip, start=start, end=end), {"start": _num(start), "end": _num(end)}


def _d_gain(sign: float) -> Draw:
    def draw(rng, clip):
        n = float(_pick(rng, (2, 3, 4, 5, 6, 8, 10, 12, 1.5, 2.5)))
        return _on(clip, gain_db=sign * n), {"n": _num(n)}
    return draw


RATES = (8000, 16000, 22050, 44100, 48000)
KHZ = {8000: "8", 16000: "16", 22050: "22.05", 44100: "44.1", 48000: "48"}


def _d_convert(rate: bool, fmt: bool, khz: bool = False) -> Draw:
    def draw(rng, clip):
        args, slots = _on(clip), {}
        if rate:
            args["sample_rate"] = int(_pick(rng, RATES))
            slots["rate"] = KHZ[args["sample_rate"]] if khz else str(args["sample_rate"])
        if fmt:
            args["format"] = slots["fmt"] = str(_pick(rng, AUDIO_FORMATS))
        return args, slots
    return draw


def _d_clip(rng, clip):
    return _on(clip), {}


def _d_fade(rng, clip):
    s = float(_pick(rng, (0.5, 1.0, 1.5, 2.0)))
    return _on(clip, seconds=s), {"s": _num(s)}


def _d_normalize(rng, clip):
    lufs = float(_pick(rng, (-14, -16, -18, -20, -23, -24, -30)))
    return _on(clip, lufs=lufs), {"lufs": _num(lufs)}


def _d_reverb(rng, clip):
    room = str(_pick(rng, ROOMS))
    return _on(clip, room=room), {"room": room}


def _d_speed(up: bool) -> Draw:
    def draw(rng, clip):
        f = float(_pick(rng, (1.25, 1.5, 2.0)) if up else _pick(rng, (0.5, 0.75, 0.8)))
        return _on(clip, factor=f), {"f": _num(f)}
    return draw


def _d_semitones(sign: float) -> Draw:
    def draw(rng, clip):
        n = float(_pick(rng, (2, 3, 4, 5, 7, 12)))
        return _on(clip, semitones=sign * n), {"n": _num(n)}
    return draw


def _d_loop(rng, clip):
    n = int(rng.integers(2, 6))
    return _on(clip, times=n), {"n": str(n)}


def _d_timestamps(rng, clip):
    return _on(clip, timestamps=True), {}


def _d_count(rng, clip):
    seg = clip.countable()
    assert seg is not None, "count_events drawn on a clip without one countable sound"
    return _on(clip, sound=seg["label"]), {"sound": seg["label"]}


def _d_word(rng, clip):
    words = [w.strip(".,;:!?'\"").lower() for w in clip.speech()[0]["text"].split()]
    words = [w for w in words if len(w) >= 4 and w.isalpha()]
    if not words or rng.random() < 0.4:
        word = str(_pick(rng, ("window", "garden", "yellow", "Tuesday", "umbrella", "coffee", "mountain"))).lower()
    else:
        word = str(_pick(rng, words))
    return _on(clip, word=word), {"word": word}


GREETINGS = ("good morning", "happy birthday", "welcome home", "good night", "congratulations", "see you soon")
VOICES = ("narrator", "child", "robot", "calm")


def _d_speak_quote(voice: bool) -> Draw:
    def draw(rng, clip):
        text = _pick(rng, GREETINGS).capitalize() + ", " + _pick(rng, NAMES) + "!"
        args: Args = {"text": text}
        if voice:
            args["voice"] = str(_pick(rng, VOICES))
        return args, {"text": text, **({"voice": args["voice"]} if voice else {})}
    return draw


def _d_speak_greet(rng, clip):
    greeting, name = str(_pick(rng, GREETINGS)), str(_pick(rng, NAMES))
    return {"text": f"{greeting.capitalize()}, {name}!"}, {"greeting": greeting, "name": name}


SOUND_DESCRIPTIONS = ("rain on a tin roof", "a dog barking", "birds singing", "a doorbell ringing", "waves on a beach",
                      "a crowd cheering", "a car horn", "distant thunder", "a ticking clock", "footsteps on gravel")


def _d_generate(with_seconds: bool) -> Draw:
    def draw(rng, clip):
        desc = str(_pick(rng, SOUND_DESCRIPTIONS))
        if not with_seconds:
            return {"description": desc}, {"desc": desc}
        s = float(_pick(rng, (2, 3, 4, 5, 8, 10)))
        return {"description": desc, "seconds": s}, {"desc": desc, "s": _num(s)}
    return draw


TRANSLATIONS: dict[str, dict[str, str]] = {
    "good morning": {"French": "bonjour", "Spanish": "buenos días", "German": "guten Morgen", "Italian": "buongiorno"},
    "thank you very much": {"French": "merci beaucoup", "Spanish": "muchas gracias", "German": "vielen Dank",
                            "Italian": "grazie mille"},
    "where is the station": {"French": "où est la gare", "Spanish": "dónde está la estación",
                             "German": "wo ist der Bahnhof", "Italian": "dov'è la stazione"},
    "see you tomorrow": {"French": "à demain", "Spanish": "hasta mañana", "German": "bis morgen", "Italian": "a domani"},
    "good night": {"French": "bonne nuit", "Spanish": "buenas noches", "German": "gute Nacht", "Italian": "buona notte"},
    "how much does it cost": {"French": "combien ça coûte", "Spanish": "cuánto cuesta", "German": "wie viel kostet das",
                              "Italian": "quanto costa"},
    "I am hungry": {"French": "j'ai faim", "Spanish": "tengo hambre", "German": "ich habe Hunger", "Italian": "ho fame"},
    "happy birthday": {"French": "joyeux anniversaire", "Spanish": "feliz cumpleaños",
                       "German": "alles Gute zum Geburtstag", "Italian": "buon compleanno"},
}


def _d_translate(rng, clip):
    text = str(_pick(rng, list(TRANSLATIONS)))
    language = str(_pick(rng, list(TRANSLATIONS[text])))
    return {"text": text, "language": language}, {"text": text, "language": language}


def _d_email(rng, clip):
    to = str(_pick(rng, NAMES))
    subject = str(_pick(rng, (f"the meeting on {_pick(rng, DAYS)}", f"the {_pick(rng, OBJECTS)}",
                              f"dinner in {_pick(rng, CITIES)}", f"the trip to {_pick(rng, CITIES)}")))
    return {"to": to, "subject": subject}, {"to": to, "subject": subject}


MESSAGES = ("I am running late", "dinner is ready", "the meeting is cancelled", "I will call back soon",
            "the keys are in the kitchen")


def _d_message(rng, clip):
    to, text = str(_pick(rng, NAMES)), str(_pick(rng, MESSAGES))
    return {"to": to, "text": text}, {"to": to, "msg": text}


def _d_query(rng, clip):
    query = str(_pick(rng, (f"trains to {_pick(rng, CITIES)}", f"how to care for a {_pick(rng, ANIMALS)}",
                            f"cheap {_pick(rng, OBJECTS)}", f"{_pick(rng, COLOURS)} {_pick(rng, VEHICLES)} prices")))
    return {"query": query}, {"query": query}


def _d_city(rng, clip):
    city = str(_pick(rng, CITIES))
    return {"city": city}, {"city": city}


def _d_timer(rng, clip):
    m = int(_pick(rng, (2, 3, 5, 10, 15, 20, 25, 30, 45, 60)))
    return {"minutes": m}, {"m": str(m)}


def _time_of_day(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(1, 13))}:{int(_pick(rng, (0, 15, 30, 45))):02d} {_pick(rng, ('am', 'pm'))}"


def _d_reminder(rng, clip):
    text = str(_pick(rng, (f"call {_pick(rng, NAMES)}", f"buy {_pick(rng, OBJECTS)}", f"feed the {_pick(rng, ANIMALS)}",
                           "water the plants", "take the bins out")))
    time = _time_of_day(rng)
    return {"text": text, "time": time}, {"text": text, "time": time}


GENRES = ("jazz", "rock", "classical", "pop", "reggae", "folk", "blues")


def _d_genre(rng, clip):
    genre = str(_pick(rng, GENRES))
    return {"genre": genre}, {"genre": genre}


def _d_note(rng, clip):
    text = str(_pick(rng, (f"buy {int(rng.integers(2, 10))} {_pick(rng, OBJECTS)}", f"call {_pick(rng, NAMES)} on {_pick(rng, DAYS)}",
                           f"book a trip to {_pick(rng, CITIES)}")))
    return {"text": text}, {"text": text}


OPERATORS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}


def _d_calc(rng, clip):
    word = str(_pick(rng, list(OPERATORS)))
    b = int(rng.integers(2, 13))
    a = b * int(rng.integers(2, 13)) if word == "divided by" else int(rng.integers(2, 100))
    return {"expression": f"{a} {OPERATORS[word]} {b}"}, {"a": str(a), "op": word, "b": str(b)}


def _d_name(rng, clip):
    name = str(_pick(rng, NAMES))
    return {"name": name}, {"name": name}


PHRASINGS: tuple[Phrasing, ...] = (
    Phrasing("trim", ("keep only the first {end} seconds of {clip}", "trim {clip} to its first {end} seconds"),
             ("cut everything after {end} seconds from {clip}",), _d_trim_first),
    Phrasing("trim", ("keep seconds {start} to {end} of {clip}", "trim {clip} to the part from {start} to {end} seconds"),
             ("cut {clip} down to the stretch between {start} and {end} seconds",), _d_trim_span),
    Phrasing("set_volume", ("make {clip} {n} decibels quieter", "lower the volume of {clip} by {n} decibels"),
             ("turn {clip} down by {n} decibels",), _d_gain(-1.0)),
    Phrasing("set_volume", ("make {clip} {n} decibels louder", "raise the volume of {clip} by {n} decibels"),
             ("turn {clip} up by {n} decibels",), _d_gain(1.0)),
    Phrasing("convert", ("convert {clip} to {rate} hertz {fmt}", "save {clip} as {fmt} at {rate} hertz"),
             ("turn {clip} into a {fmt} file at {rate} hertz",), _d_convert(True, True)),
    Phrasing("convert", ("convert {clip} to {rate} kilohertz {fmt}",), ("make {clip} a {rate} kilohertz {fmt} file",),
             _d_convert(True, True, khz=True)),
    Phrasing("convert", ("convert {clip} to {fmt}", "save {clip} as {fmt}"), ("give me {clip} as a {fmt} file",),
             _d_convert(False, True)),
    Phrasing("convert", ("resample {clip} to {rate} hertz",), ("change the sample rate of {clip} to {rate} hertz",),
             _d_convert(True, False)),
    Phrasing("reverse", ("reverse {clip}", "play {clip} backwards"), ("flip {clip} so it runs backwards",), _d_clip),
    Phrasing("fade", ("fade {clip} in and out over {s} seconds", "add {s} second fades to {clip}"),
             ("give {clip} a {s} second fade at both ends",), _d_fade),
    Phrasing("normalize", ("normalize {clip} to {lufs} LUFS", "set the loudness of {clip} to {lufs} LUFS"),
             ("bring {clip} to a loudness of {lufs} LUFS",), _d_normalize, spoken=False),
    Phrasing("add_reverb", ("add {room} room reverb to {clip}", "make {clip} sound like it is in a {room} room"),
             ("put {clip} in a {room} echoing room",), _d_reverb),
    Phrasing("add_reverb", ("add reverb to {clip}",), ("make {clip} sound more spacious",), _d_clip),
    Phrasing("change_speed", ("speed {clip} up to {f} times", "play {clip} at {f} times the speed"),
             ("make {clip} {f} times faster",), _d_speed(True)),
    Phrasing("change_speed", ("slow {clip} down to {f} times its speed",), ("play {clip} slower, at {f} times the speed",),
             _d_speed(False)),
    Phrasing("remove_noise", ("remove the background noise from {clip}", "clean up the noise in {clip}"),
             ("get rid of the hiss in {clip}",), _d_clip),
    Phrasing("pitch_shift", ("shift the pitch of {clip} up by {n} semitones",), ("raise {clip} by {n} semitones",),
             _d_semitones(1.0)),
    Phrasing("pitch_shift", ("shift the pitch of {clip} down by {n} semitones",), ("lower {clip} by {n} semitones",),
             _d_semitones(-1.0)),
    Phrasing("loop", ("repeat {clip} {n} times",), ("loop {clip} {n} times in a row",), _d_loop),
    Phrasing("transcribe", ("transcribe {clip}", "write down what is said in {clip}"), ("get me a transcript of {clip}",),
             _d_clip, needs="speech", spoken=False),
    Phrasing("transcribe", ("transcribe {clip} with timestamps",), ("transcribe {clip} and include the times",),
             _d_timestamps, needs="speech", spoken=False),
    Phrasing("detect_speech", ("find the parts of {clip} with speech", "detect speech in {clip}"),
             ("tell me where someone talks in {clip}",), _d_clip, spoken=False),
    Phrasing("measure", ("measure {clip}", "measure the loudness of {clip}"), ("check how long and how loud {clip} is",),
             _d_clip, spoken=False),
    Phrasing("count_events", ("count the {sound} in {clip}", "find out how many {sound} there are in {clip}"),
             ("tell me the number of {sound} in {clip}",), _d_count, needs="countable", spoken=False),
    Phrasing("find_word", ("find the word '{word}' in {clip}", "check whether {clip} contains the word '{word}'"),
             ("look for the word '{word}' in {clip}",), _d_word, needs="speech", spoken=False),
    Phrasing("classify_sound", ("classify the sound in {clip}",), ("tell me what kind of sound is in {clip}",),
             _d_clip, needs="event", spoken=False),
    Phrasing("speak", ("say '{text}'", "read '{text}' aloud"), ("speak the words '{text}'",), _d_speak_quote(False), spoken=False),
    Phrasing("speak", ("say '{text}' in a {voice} voice",), ("read out '{text}' with the {voice} voice",),
             _d_speak_quote(True), spoken=False),
    Phrasing("speak", ("say {greeting} to {name}",), ("greet {name} with {greeting}",), _d_speak_greet),
    Phrasing("generate_sound", ("generate {s} seconds of {desc}", "make a sound of {desc} lasting {s} seconds"),
             ("create {s} seconds of audio of {desc}",), _d_generate(True)),
    Phrasing("generate_sound", ("generate the sound of {desc}",), ("make me a sound like {desc}",), _d_generate(False)),
    Phrasing("translate", ("translate '{text}' into {language}", "tell me how to say '{text}' in {language}"),
             ("give me the {language} for '{text}'",), _d_translate, spoken=False),
    Phrasing("translate", ("translate {text} into {language}",), ("put {text} into {language}",), _d_translate),
    Phrasing("send_email", ("email {to} about {subject}", "send an email to {to} about {subject}"),
             ("write to {to} by email about {subject}",), _d_email),
    Phrasing("send_message", ("text {to} that {msg}",), ("send {to} a message saying {msg}",), _d_message),
    Phrasing("search_web", ("search the web for {query}", "look up {query} online"), ("find {query} on the internet",), _d_query),
    Phrasing("get_weather", ("check the weather in {city}", "get the weather forecast for {city}"),
             ("find out what the weather is like in {city}",), _d_city),
    Phrasing("get_time", ("check the time in {city}",), ("find out what time it is in {city}",), _d_city),
    Phrasing("set_timer", ("set a timer for {m} minutes", "start a {m} minute timer"), ("time {m} minutes for me",), _d_timer),
    Phrasing("set_reminder", ("remind me to {text} at {time}", "set a reminder to {text} at {time}"),
             ("make sure I remember to {text} at {time}",), _d_reminder),
    Phrasing("play_music", ("play some {genre}", "put on some {genre} music"), ("start playing {genre}",), _d_genre),
    Phrasing("save_note", ("save a note saying '{text}'", "make a note: {text}"), ("write down '{text}' as a note",),
             _d_note, spoken=False),
    Phrasing("calculate", ("calculate {a} {op} {b}", "work out {a} {op} {b}"), ("compute {a} {op} {b}",), _d_calc),
    Phrasing("call_phone", ("call {name}", "phone {name}"), ("ring {name}",), _d_name),
)

# Sentence frames around a clause, per split.
WRAPS = {"train": ("{C}.", "Please {c}.", "Can you {c}?"), "test": ("Could you {c}, please?", "I'd like you to {c}.")}
CONNECT = {"train": (", then ", " and then "), "test": (", and after that ", "; next, ")}
PARALLEL = {"train": (" and ", ", and also "), "test": (", and at the same time ",)}
SPEECH_REQUESTS = {"train": ("Do what the speaker asks.", "Carry out the request in clip-1.", "Follow the spoken instruction."),
                   "test": ("The speaker in clip-1 wants something; do it.", "Act on what is said in the recording.")}
CLIP_REFS = ("clip-1", "clip-1", "this clip", "the recording")
SPOKEN_REFS = ("this recording", "this")


def _phrasing_split(split: str) -> str:
    return "train" if split == "train" else "test"


def _frame(rng: np.random.Generator, split: str, clause: str) -> str:
    wrap = _pick(rng, WRAPS[_phrasing_split(split)])
    return wrap.format(C=clause[:1].upper() + clause[1:], c=clause)


def _phrasings(split: str, *, kinds: Sequence[str] | None = None, spoken: bool = False,
               tools: Sequence[str] | None = None) -> list[Phrasing]:
    usable = set(tools_for_split(split))
    return [p for p in PHRASINGS if p.tool in usable and p.tool != "ask"
            and (kinds is None or TOOLS[p.tool].kind in kinds)
            and (not spoken or p.spoken)
            and (tools is None or p.tool in tools)]


def _pick_phrasing(rng: np.random.Generator, options: Sequence[Phrasing]) -> Phrasing:
    """Uniform over tools, then over that tool's phrasings."""
    tools = sorted({p.tool for p in options})
    tool = _pick(rng, tools)
    return _pick(rng, [p for p in options if p.tool == tool])


def _clause(rng: np.random.Generator, split: str, phrasing: Phrasing, slots: dict[str, str], ref: str) -> str:
    return _pick(rng, phrasing.templates(_phrasing_split(split))).format(clip=ref, **slots)


def _ordered(name: str, args: Args) -> Args:
    """The arguments in signature order (as the model writes them)."""
    order = list(TOOLS[name].spec.parameters["properties"])
    return {k: args[k] for k in sorted(args, key=order.index)}


# --------------------------------------------------------------------------------------
# What the tools answer (in agent/builtin_tools.py's words), and the closing answers


@dataclass
class World:
    """The clips of one episode by id, and the next ``audio-N`` number."""

    clips: dict[str, Audio]
    made: int = 0

    def new_audio(self, duration: float, segments: list[dict[str, Any]] | None = None, samples: np.ndarray | None = None,
                  sample_rate: int = 16000) -> Audio:
        self.made += 1
        audio = Audio(f"audio-{self.made}", duration, segments or [], samples, sample_rate)
        self.clips[audio.id] = audio
        return audio


@dataclass(frozen=True)
class Output:
    """A tool's answer: ``text`` (what the model reads) and ``data`` (what the closing answer uses)."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)


def _window(clip: Audio, start: float, end: float) -> list[dict[str, Any]]:
    """Segments wholly inside [start, end], moved to the new clip's time."""
    return [{**s, "onset": round(s["onset"] - start, 3), "offset": round(s["offset"] - start, 3)}
            for s in clip.segments if s["onset"] >= start and s["offset"] <= end]


def _made(audio: Audio) -> Output:
    """A new clip, described as the workspace does: ``audio-1: 2.50 s, 16000 Hz``."""
    return Output(f"{audio.id}: {audio.duration:.2f} s, {audio.sample_rate} Hz", {"id": audio.id})


def _scaled(samples: np.ndarray | None, gain_db: float) -> np.ndarray | None:
    return None if samples is None else (samples * np.float32(10 ** (gain_db / 20))).astype(np.float32)


def run_tool(world: World, name: str, args: Args, answers: dict[str, str] | None = None) -> Output:
    """What tool ``name`` answers to ``args`` in ``world`` (a clip it makes joins the world).

    ``answers``: for ``ask``, the answer per question (the audio model's, known from the rendering).
    """
    src = world.clips.get(args.get("clip", ""))
    new = world.new_audio
    if name == "trim":
        a, b = args["start"], min(args["end"], src.duration)
        samples = None if src.samples is None else src.samples[int(round(a * SR)): int(round(b * SR))]
        return _made(new(b - a, _window(src, a, b), samples, src.sample_rate))
    if name == "set_volume":
        return _made(new(src.duration, src.segments, _scaled(src.samples, args["gain_db"]), src.sample_rate))
    if name == "normalize":
        now = None if src.samples is None else measure_audio(src.samples, SR)["loudness_lufs"]
        samples = None if now is None else _scaled(src.samples, args.get("lufs", -23.0) - now)
        return _made(new(src.duration, src.segments, samples, src.sample_rate))
    if name in ("fade", "add_reverb", "remove_noise", "pitch_shift"):
        return _made(new(src.duration, src.segments, sample_rate=src.sample_rate))
    if name == "reverse":
        return _made(new(src.duration, sample_rate=src.sample_rate))
    if name == "change_speed":
        return _made(new(src.duration / args["factor"], sample_rate=src.sample_rate))
    if name == "loop":
        return _made(new(src.duration * args["times"], sample_rate=src.sample_rate))
    if name == "convert":
        out = _made(new(src.duration, src.segments, sample_rate=args.get("sample_rate", 16000)))
        return Output(f"{out.text}, {args.get('format', 'wav')}", out.data)
    if name == "mix":
        other = world.clips[args["other"]]
        return _made(new(max(src.duration, args.get("offset", 0.0) + other.duration), sample_rate=src.sample_rate))
    if name == "speak":  # about 0.4 s a word
        return _made(new(0.4 * len(args["text"].split()) + 0.3))
    if name == "generate_sound":
        return _made(new(args.get("seconds", 5.0)))
    if name == "transcribe":
        speech = src.speech()
        if not speech:
            return Output("(no speech)", {"text": ""})
        if args.get("timestamps"):
            return Output("\n".join(f"[{s['onset']:.2f}-{s['offset']:.2f}] {s['text']}" for s in speech), {"text": ""})
        text = " ".join(s["text"] for s in speech)
        return Output(text, {"text": text})
    if name == "detect_speech":
        spans = [{"start": round(s["onset"], 2), "end": round(s["offset"], 2)} for s in src.segments if s["label"] == "speech"]
        return Output(json.dumps(spans) if spans else "no speech", {"spans": spans})
    if name == "measure":
        data = measure_audio(src.samples, src.sample_rate)
        return Output(json.dumps(data), data)
    if name == "count_events":
        seg = src.countable()
        count = seg["count"] if seg is not None and seg["label"] == args["sound"] else 0
        return Output(str(count), {"count": count})
    if name == "find_word":
        words = [w.strip(".,;:!?'\"").lower() for s in src.speech() for w in s["text"].split()]
        found = args["word"].lower() in words
        return Output("found" if found else "not found", {"found": found})
    if name == "classify_sound":
        seg = src.single_event()
        return Output(seg["label"] if seg is not None else "unknown")
    if name == "ask":
        return Output((answers or {})[args["question"]])
    return Output(_INFO_RESULTS[name](args))


WEATHER = ("sunny", "cloudy", "light rain", "windy", "snowing", "foggy")


def _stable_int(key: str, lo: int, hi: int) -> int:
    """A made-up but fixed value for ``key`` (a pretend service answers the same each time)."""
    return lo + zlib.crc32(key.encode()) % (hi - lo + 1)


def _calc(expression: str) -> str:
    a, op, b = expression.split()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op])


_INFO_RESULTS: dict[str, Callable[[Args], str]] = {
    "translate": lambda a: TRANSLATIONS[a["text"]][a["language"]],
    "send_email": lambda a: f"email to {a['to']} sent",
    "send_message": lambda a: f"message to {a['to']} sent",
    "search_web": lambda a: f"{_stable_int(a['query'], 3, 90)} results",
    "get_weather": lambda a: f"{_stable_int(a['city'], -5, 32)} °C, {WEATHER[_stable_int(a['city'] + 'w', 0, len(WEATHER) - 1)]}",
    "get_time": lambda a: f"{_stable_int(a['city'], 0, 23):02d}:{5 * _stable_int(a['city'] + 'm', 0, 11):02d}",
    "set_timer": lambda a: f"timer set for {a['minutes']} minutes",
    "set_reminder": lambda a: f"reminder set for {a['time']}",
    "play_music": lambda a: f"playing {a['genre']}",
    "save_note": lambda a: f"saved as note-{_stable_int(a['text'], 1, 40)}",
    "calculate": lambda a: _calc(a["expression"]),
    "call_phone": lambda a: f"calling {a['name']}",
}


def _spans_text(spans: list[dict[str, float]]) -> str:
    return ", ".join(f"{_num(s['start'])} to {_num(s['end'])} seconds" for s in spans)


def _db(value: float | None, unit: str) -> str:
    return f"{_num(value)} {unit}" if value is not None else "unmeasurable"


def closing(name: str, args: Args, out: Output) -> str:
    """The short answer after a call's result (from the arguments and the result only)."""
    src, new, result, data = args.get("clip", ""), out.data.get("id", ""), out.text, out.data
    made = {
        "trim": lambda: f"{src} from {_num(args['start'])} to {_num(args['end'])} seconds",
        "set_volume": lambda: f"{src} {_num(abs(args['gain_db']))} dB {'louder' if args['gain_db'] > 0 else 'quieter'}",
        "normalize": lambda: f"{src} at {_num(args.get('lufs', -23.0))} LUFS",
        "fade": lambda: f"{src} with {_num(args['seconds'])} second fades",
        "add_reverb": lambda: f"{src} with {args.get('room', 'medium')} room reverb",
        "remove_noise": lambda: f"{src} without the background noise",
        "pitch_shift": lambda: f"{src} shifted by {_num(args['semitones'])} semitones",
        "reverse": lambda: f"{src} played backwards",
        "change_speed": lambda: f"{src} at {_num(args['factor'])} times the speed",
        "loop": lambda: f"{src} repeated {args['times']} times",
        "convert": lambda: f"{src} as {args.get('sample_rate', 16000)} Hz {args.get('format', 'wav')}",
        "mix": lambda: f"{src} mixed with {args['other']}",
        "speak": lambda: f"\"{args['text']}\" spoken",
        "generate_sound": lambda: f"{_num(args.get('seconds', 5.0))} seconds of {args['description']}",
    }
    if name in made:
        return f"Done: {new} is {made[name]()}."
    if name == "transcribe":
        return f"The speaker says: \"{data['text'] or result}\"" if result != "(no speech)" else f"There is no speech in {src}."
    if name == "detect_speech":
        return f"There is speech in {src} from {_spans_text(data['spans'])}." if data["spans"] else f"There is no speech in {src}."
    if name == "measure":
        return (f"{src} is {_num(data['duration'])} seconds long, loudness {_db(data['loudness_lufs'], 'LUFS')}, "
                f"peak {_db(data['peak_dbfs'], 'dBFS')}.")
    if name == "count_events":
        n, sound = data["count"], args["sound"]
        return f"There is 1 {sound.removesuffix('s')} in {src}." if n == 1 else f"There are {n} {sound} in {src}."
    if name == "find_word":
        return f"Yes, \"{args['word']}\" is said in {src}." if data["found"] else f"No, \"{args['word']}\" is not said in {src}."
    if name == "classify_sound":
        return f"It is {LABEL_PHRASE.get(result, result)}."
    if name == "ask":
        return result
    info = {
        "translate": lambda: f"In {args['language']}, \"{args['text']}\" is \"{result}\".",
        "send_email": lambda: f"I sent the email to {args['to']}.",
        "send_message": lambda: f"I sent your message to {args['to']}.",
        "search_web": lambda: f"The search found {result}.",
        "get_weather": lambda: f"In {args['city']} it is {result}.",
        "get_time": lambda: f"It is {result} in {args['city']}.",
        "set_timer": lambda: f"Your timer is set for {args['minutes']} minutes.",
        "set_reminder": lambda: f"I will remind you to {args['text']} at {args['time']}.",
        "play_music": lambda: f"Playing some {args['genre']} now.",
        "save_note": lambda: f"I saved it as {result.removeprefix('saved as ')}.",
        "calculate": lambda: f"{args['expression']} = {result}.",
        "call_phone": lambda: f"Calling {args['name']} now.",
    }
    return info[name]()


# --------------------------------------------------------------------------------------
# Episodes


@dataclass
class Step:
    """One assistant turn: ``calls`` (name, arguments) and their ``results``, or a ``text`` answer."""

    calls: list[tuple[str, Args]] = field(default_factory=list)
    results: list[Output] = field(default_factory=list)
    text: str = ""


@dataclass
class Episode:
    """One item before it is written: the request, the steps, the clip, and what the offer must hold."""

    family: str
    request: str
    steps: list[Step]
    targets: list[str]  # the tools the request needs (offered, or missing for "unavailable")
    rendered: Rendered
    info: dict[str, Any] = field(default_factory=dict)
    exclude: set[str] = field(default_factory=set)  # tools that must not be offered


def _do(world: World, calls: list[tuple[str, Args]], answers: dict[str, str] | None = None) -> Step:
    calls = [(name, _ordered(name, args)) for name, args in calls]
    return Step(calls, [run_tool(world, name, args, answers) for name, args in calls])


def _close(step: Step) -> Step:
    return Step(text=" ".join(closing(n, a, r) for (n, a), r in zip(step.calls, step.results, strict=True)))


def _single(world: World, name: str, args: Args) -> list[Step]:
    step = _do(world, [(name, args)])
    return [step, _close(step)]


def family_request(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    p = _pick_phrasing(rng, _phrasings(split))
    r = render_clip(rng, split, res, p.needs)
    args, slots = p.draw(rng, r.clip)
    clause = _clause(rng, split, p, slots, _pick(rng, CLIP_REFS))
    return Episode("request", _frame(rng, split, clause), _single(World({CLIP: r.clip}), p.tool, args), [p.tool], r)


def family_speech(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    p = _pick_phrasing(rng, _phrasings(split, kinds=("edit", "make", "info"), spoken=True))
    for _ in range(20):
        # numbers about the clip (trim) are drawn for a short command, then checked against the rendered one
        args, slots = p.draw(rng, Audio(CLIP, 2.5))
        command = _frame(rng, split, _clause(rng, split, p, slots, _pick(rng, SPOKEN_REFS)))
        sp = speak(rng, split, res, sentence=Sentence(command, normalise_for_tts(command), "command", dict(slots)))
        r = _finish_clip(rng, res, [sp], noise=0.3)
        fits = p.tool != "trim" or args["end"] <= r.clip.duration - 0.05
        if MIN_SECONDS <= r.clip.duration <= MAX_SECONDS and fits:
            break
    else:
        raise RuntimeError(f"spoken command for {p.tool} never fit in {MIN_SECONDS}-{MAX_SECONDS} s")
    request = _pick(rng, SPEECH_REQUESTS[_phrasing_split(split)])
    return Episode("speech", request, _single(World({CLIP: r.clip}), p.tool, args), [p.tool], r)


TRANSCRIPT_USES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "save_note": (("save what is said in {clip} as a note",), ("make a note of the speech in {clip}",)),
    "search_web": (("search the web for the words spoken in {clip}",), ("look up online what the speaker in {clip} says",)),
    "speak": (("say the words from {clip} again in a {voice} voice",), ("repeat what {clip} says with the {voice} voice",)),
    "send_message": (("send the words spoken in {clip} to {to} as a message",), ("text {to} what the speaker in {clip} says",)),
}


def family_transcript(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    tool = _pick(rng, [t for t in TRANSCRIPT_USES if t in tools_for_split(split)])
    r = render_clip(rng, split, res, "speech")
    text = r.clip.speech()[0]["text"]
    slots = {"voice": str(_pick(rng, VOICES)), "to": str(_pick(rng, NAMES))}
    train, test = TRANSCRIPT_USES[tool]
    templates = train + test if tool in HELD_OUT_TOOLS else (train if split == "train" else test)
    args: Args = {"save_note": {"text": text}, "search_web": {"query": text}, "speak": {"text": text, "voice": slots["voice"]},
                  "send_message": {"to": slots["to"], "text": text}}[tool]
    request = _frame(rng, split, _pick(rng, templates).format(clip=_pick(rng, CLIP_REFS), **slots))
    # the words are heard, not looked up: no transcribing tool on offer (that is the chain "transcribe, then ...")
    return Episode("transcript", request, _single(World({CLIP: r.clip}), tool, args), [tool], r,
                   exclude={"transcribe", "ask", "find_word"})


SOUND_USES = (("generate {s} seconds of a sound like the one in {clip}", "make {s} more seconds of the sound in {clip}"),
              ("create {s} seconds of audio that sounds like {clip}",))


def family_sound(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    r = render_clip(rng, split, res, "event")
    seconds = float(_pick(rng, (2, 3, 5, 10)))
    request = _frame(rng, split, _pick(rng, SOUND_USES[0 if split == "train" else 1]).format(
        s=_num(seconds), clip=_pick(rng, CLIP_REFS)))
    args = {"description": r.clip.single_event()["caption"], "seconds": seconds}
    return Episode("sound", request, _single(World({CLIP: r.clip}), "generate_sound", args), ["generate_sound"], r)


ASK_FRAMES = {"train": ("Ask the audio model about {clip}: {question}", "Use the ask tool on {clip}: {question}"),
              "test": ("Put this question about {clip} to the ask tool: {question}",)}


def family_ask(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    kind = _pick(rng, ("content", "count", "sound"))
    if kind == "content":
        r = render_clip(rng, split, res, "speech")
        seg = r.clip.speech()[0]
        sentence = Sentence(seg["text"], "", r.meta["text_source"], r.meta["slots"])
        if not sentence.slots:  # a quote: ask what was said
            question, answer = "What does the speaker say?", seg["text"]
        else:
            question, answer = content_question(rng, sentence)
    elif kind == "count":
        r = render_clip(rng, split, res, "countable")
        seg = r.clip.countable()
        question, answer = f"How many {seg['label']} are there?", str(seg["count"])
    else:
        r = render_clip(rng, split, res, "event")
        question, answer = "What sound is this?", r.clip.single_event()["label"]
    request = _pick(rng, ASK_FRAMES[_phrasing_split(split)]).format(clip=_pick(rng, CLIP_REFS), question=question)
    world = World({CLIP: r.clip})
    step = _do(world, [("ask", {"clip": CLIP, "question": question})], {question: answer})
    return Episode("ask", request, [step, _close(step)], ["ask"], r)


# Clip edits that keep what a listening tool needs (speech, events) where it was.
KEEPS_CONTENT = ("trim", "set_volume", "normalize", "remove_noise", "convert")
MEASURABLE_AFTER = ("trim", "set_volume", "normalize")
LISTEN_INFO = {"save_note": "text", "search_web": "query", "speak": "text", "send_message": "text"}
LISTEN_INFO_CLAUSES = {"save_note": "save the text as a note", "search_web": "search the web for it",
                       "speak": "say it again", "send_message": "send it to {to} as a message"}


def _trim_around(rng: np.random.Generator, clip: Audio, seg: dict[str, Any]) -> Args:
    start = max(0.0, math.floor((seg["onset"] - float(rng.uniform(0.0, 0.2))) * 10) / 10)
    end = min(math.floor(clip.duration * 10) / 10, math.ceil((seg["offset"] + float(rng.uniform(0.0, 0.2))) * 10) / 10)
    return _on(clip, start=round(start, 1), end=round(end, 1))


def _needed_segment(clip: Audio, need: str | None) -> dict[str, Any] | None:
    if need == "speech":
        return clip.speech()[0]
    if need == "countable":
        return clip.countable()
    if need == "event":
        return clip.single_event()
    return None


def family_chain(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    """Two calls in sequence, the second on the first's output; ``info["chain"]`` says which kind."""
    kind = _pick(rng, ("edit_edit", "edit_listen", "make_mix", "listen_info"))
    connect = _pick(rng, CONNECT[_phrasing_split(split)])
    if kind == "make_mix":
        maker = _pick_phrasing(rng, _phrasings(split, tools=("speak", "generate_sound")))
        r = render_clip(rng, split, res)
        world = World({CLIP: r.clip})
        args, slots = maker.draw(rng, r.clip)
        first = _do(world, [(maker.tool, args)])
        mix_args: Args = {"clip": CLIP, "other": "audio-1"}
        extra = ""
        if rng.random() < 0.5:
            mix_args["other_gain_db"] = -float(_pick(rng, (3, 6, 10, 12)))
            extra = f" {_num(-mix_args['other_gain_db'])} decibels quieter"
        elif rng.random() < 0.7:
            mix_args["offset"] = _grid(rng, 0.5, r.clip.duration - 0.5)
            extra = f" starting at {_num(mix_args['offset'])} seconds"
        clause = _clause(rng, split, maker, slots, CLIP) + connect + f"mix it into {_pick(rng, CLIP_REFS)}{extra}"
        second = _do(world, [("mix", mix_args)])
        targets = [maker.tool, "mix"]
    elif kind == "listen_info":
        info_tool = _pick(rng, [t for t in LISTEN_INFO if t in tools_for_split(split)])
        r = render_clip(rng, split, res, "speech")
        world = World({CLIP: r.clip})
        first = _do(world, [("transcribe", {"clip": CLIP})])
        to = str(_pick(rng, NAMES))
        args = {LISTEN_INFO[info_tool]: first.results[0].text} | ({"to": to} if info_tool == "send_message" else {})
        clause = f"transcribe {_pick(rng, CLIP_REFS)}" + connect + LISTEN_INFO_CLAUSES[info_tool].format(to=to)
        second = _do(world, [(info_tool, args)])
        targets = ["transcribe", info_tool]
    else:
        listen = kind == "edit_listen"
        p2 = _pick_phrasing(rng, _phrasings(split, kinds=("listen",) if listen else ("edit",)))
        firsts = [p for p in _phrasings(split, kinds=("edit",)) if p.tool != p2.tool
                  and (not listen or p.tool in (MEASURABLE_AFTER if p2.tool == "measure" else KEEPS_CONTENT))]
        p1 = _pick_phrasing(rng, firsts)
        r = render_clip(rng, split, res, p2.needs)
        world = World({CLIP: r.clip})
        seg = _needed_segment(r.clip, p2.needs)
        if p1.tool == "trim" and seg is not None:  # keep what the second tool needs
            args1 = _trim_around(rng, r.clip, seg)
            slots1 = {"start": _num(args1["start"]), "end": _num(args1["end"])}
            p1 = next(p for p in PHRASINGS if p.draw is _d_trim_span)
        else:
            args1, slots1 = p1.draw(rng, r.clip)
        first = _do(world, [(p1.tool, args1)])
        args2, slots2 = p2.draw(rng, world.clips["audio-1"])
        clause = _clause(rng, split, p1, slots1, _pick(rng, CLIP_REFS)) + connect + _clause(rng, split, p2, slots2, "it")
        second = _do(world, [(p2.tool, args2)])
        targets = [p1.tool, p2.tool]
    request = _frame(rng, split, clause)
    return Episode("chain", request, [first, second, _close(second)], targets, r, {"chain": kind})


def family_parallel(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    kinds = ("listen",) if rng.random() < 0.5 else ("info",)
    p1 = _pick_phrasing(rng, _phrasings(split, kinds=kinds))
    r = render_clip(rng, split, res, p1.needs)
    options = [p for p in _phrasings(split, kinds=kinds) if p.tool != p1.tool and satisfies(r.clip, p.needs)
               and p.tool not in _overlaps(p1.tool)]
    p2 = _pick_phrasing(rng, options)
    world = World({CLIP: r.clip})
    (a1, s1), (a2, s2) = p1.draw(rng, r.clip), p2.draw(rng, r.clip)
    ref = _pick(rng, CLIP_REFS)
    clause = _clause(rng, split, p1, s1, ref) + _pick(rng, PARALLEL[_phrasing_split(split)]) + _clause(rng, split, p2, s2, "it")
    step = _do(world, [(p1.tool, a1), (p2.tool, a2)])
    return Episode("parallel", _frame(rng, split, clause), [step, _close(step)], [p1.tool, p2.tool], r)


NO_CALL_BUILDERS = (build_classification, build_counting, build_presence, build_loudness, build_speaker, build_spoken_qa,
                    build_transcription, build_order, build_event_list, build_captioning)
LISTEN_TOOLS = frozenset(n for n, t in TOOLS.items() if t.kind == "listen")


def family_no_call(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    """A question the model answers by listening; no listening tool is offered."""
    for _ in range(20):
        item = _pick(rng, NO_CALL_BUILDERS)(rng, split, res)
        if MIN_SECONDS <= item.audio.size / SR <= MAX_SECONDS:
            break
    else:
        raise RuntimeError(f"no question item within {MIN_SECONDS}-{MAX_SECONDS} s in 20 tries")
    meta = {**item.metadata, "source_task": item.task, "answer_format": item.metadata.get("format")}
    clip = Audio(CLIP, item.audio.size / SR, list(meta.get("segments", [])), item.audio)
    return Episode("no_call", item.instruction, [Step(text=item.answer)], [], Rendered(item.audio, meta, clip),
                   exclude=set(LISTEN_TOOLS))


def family_unavailable(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    """An action the offered tools cannot do."""
    p = _pick_phrasing(rng, _phrasings(split, kinds=("edit", "make", "info")))
    r = render_clip(rng, split, res, p.needs)
    args, slots = p.draw(rng, r.clip)
    request = _frame(rng, split, _clause(rng, split, p, slots, _pick(rng, CLIP_REFS)))
    return Episode("unavailable", request, [Step(text=NO_TOOL_ANSWER)], [p.tool], r,
                   exclude={p.tool, *_overlaps(p.tool)})


FAMILIES: dict[str, tuple[Callable[[np.random.Generator, str, Resources], Episode], int]] = {
    "request": (family_request, 6),
    "speech": (family_speech, 4),
    "transcript": (family_transcript, 2),
    "sound": (family_sound, 1),
    "ask": (family_ask, 2),
    "chain": (family_chain, 4),
    "parallel": (family_parallel, 1),
    "no_call": (family_no_call, 3),
    "unavailable": (family_unavailable, 2),
}


def offer(rng: np.random.Generator, split: str, episode: Episode) -> list[str]:
    """2-6 tools, shuffled: the episode's targets (unless missing on purpose) and distractors that
    cannot do the same job."""
    needed = [] if episode.family == "unavailable" else list(dict.fromkeys(episode.targets))
    banned = set(episode.exclude) | {o for t in needed for o in _overlaps(t)}
    pool = [n for n in tools_for_split(split) if n not in needed and n not in banned]
    total = max(int(rng.integers(2, 7)), len(needed) + (0 if needed else 2))
    extra = [pool[i] for i in rng.choice(len(pool), size=total - len(needed), replace=False)]
    names = needed + extra
    return [names[i] for i in rng.permutation(len(names))]


def build_episode(rng: np.random.Generator, split: str, res: Resources) -> Episode:
    names = list(FAMILIES)
    weights = np.array([FAMILIES[n][1] for n in names], dtype=float)
    family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    return FAMILIES[family][0](rng, split, res)


def build_task_calls(rng: np.random.Generator, split: str, res: Resources) -> Item:
    """One tool-call item of ``split`` (see the module docstring)."""
    ep = build_episode(rng, split, res)
    offered = offer(rng, split, ep)
    specs = [TOOLS[n].spec for n in offered]
    turns: list[dict[str, str]] = [{"role": "user", "content": ep.request}]
    expected: list[list[dict[str, Any]]] = []
    for step in ep.steps:
        if step.calls:
            turns.append({"role": "assistant", "content": calls_text(step.calls)})
            turns += [{"role": "tool", "content": result_text(n, out.text)} for (n, _), out in zip(step.calls, step.results, strict=True)]
        else:
            turns.append({"role": "assistant", "content": step.text})
        expected.append([{"name": n, "arguments": a} for n, a in step.calls])
    meta = dict(ep.rendered.meta)
    meta.update({
        "family": ep.family, **ep.info, "tools": [spec_dict(s) for s in specs], "expected": expected,
        "no_call": not expected[0], "targets": ep.targets,
        "held_out": any(t in HELD_OUT_TOOLS for t in ep.targets), "format": "text", "generator": f"task_calls-{VERSION}",
    })
    return Item(ep.rendered.x, TASK, ep.request, turns[1]["content"], meta, turns, system=tools_text(specs))

