"""Task builders: each renders one audio clip and an instruction whose answer follows from
what was rendered (never guessed).

A builder is ``build_<task>(rng, split, res) -> Item``; ``TASKS`` maps task names to
builders and ``TASK_WEIGHTS`` sets how often each is drawn. ``res`` holds the split's voices
and sentences, so held-out voices and sentences stay in their split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnivox.datagen import augment as aug
from omnivox.datagen.sounds import (
    BACKGROUNDS,
    COUNTABLE,
    NUMBER_WORDS,
    SOUND_CLASSES,
    SR,
    SoundEvent,
    background,
    make_sound,
)
from omnivox.datagen.text import DAYS, TEMPLATES, Sentence, Template, TextCorpus
from omnivox.datagen.voices import ACCENT_NAMES, EspeakVoice, Voice

log = logging.getLogger(__name__)

MAX_SECONDS = 30.0


@dataclass(frozen=True)
class Resources:
    """What builders draw from: ``voices`` per split, the text ``corpus``, how often the
    optional engines speak (``engine_share``: engine -> probability), and whether the MP3
    codec step may run."""

    voices: dict[str, tuple[Voice, ...]]
    corpus: TextCorpus
    engine_share: dict[str, float]
    mp3: bool = True


@dataclass
class Item:
    """One rendered example. ``audio``: ``[T]`` float32 at 16 kHz; ``turns``: for multi-turn
    items, the whole dialogue (the first turn repeats ``instruction``/``answer``), either as
    ``{"instruction", "answer"}`` pairs or as ``{"role", "content"}`` turns (user, assistant and
    tool turns: tool-call items); ``system``: the system turn (tool-call items: the offered tools)."""

    audio: np.ndarray
    task: str
    instruction: str
    answer: str
    metadata: dict[str, Any]
    turns: list[dict[str, str]] | None = None
    system: str | None = None


# --------------------------------------------------------------------------------------
# Shared helpers


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SR)), dtype=np.float32)


@dataclass
class Speech:
    """Rendered speech: ``samples`` ``[T]``, the ``sentence``, the ``voice`` metadata."""

    samples: np.ndarray
    sentence: Sentence
    voice: dict[str, Any]


def pick_voice(rng: np.random.Generator, split: str, res: Resources) -> Voice:
    """A voice of ``split``: an optional engine with its ``engine_share`` probability (when it
    has voices in this split), else espeak."""
    pool = res.voices[split]
    engines = sorted({v.engine for v in pool})
    u = float(rng.random())
    chosen = "espeak"
    acc = 0.0
    for engine in engines:
        if engine == "espeak":
            continue
        acc += res.engine_share.get(engine, 0.0)
        if u < acc:
            chosen = engine
            break
    candidates = [v for v in pool if v.engine == chosen]
    return _choice(rng, candidates)


def speak(rng: np.random.Generator, split: str, res: Resources, sentence: Sentence | None = None,
          voice: Voice | None = None, speed: float | None = None, pitch: int | None = None,
          templated: float = 0.2) -> Speech:
    """Render ``sentence`` (or a random one of ``split``; ``templated`` is the chance of a
    templated sentence) with ``voice`` (or a random one of ``split``)."""
    if sentence is None:
        sentence = res.corpus.templated(split, rng) if rng.random() < templated else res.corpus.sentence(split, rng)
    voice = voice or pick_voice(rng, split, res)
    if pitch is not None and isinstance(voice, EspeakVoice):
        samples, meta = voice.synthesize(sentence.spoken, rng, speed=speed, pitch=pitch)
    else:
        samples, meta = voice.synthesize(sentence.spoken, rng, speed=speed)
    max_n = int(MAX_SECONDS * 0.8 * SR)
    if samples.size > max_n:
        raise RuntimeError(f"speech for {sentence.written!r} is {samples.size / SR:.1f} s (> {max_n / SR:.0f} s)")
    return Speech(aug.set_level(samples, -20.0), sentence, meta)


@dataclass
class Timeline:
    """Segments placed one after another with silent gaps; ``segments`` records each one's
    ``label``, ``onset`` and ``offset`` in seconds."""

    parts: list[np.ndarray] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    length: int = 0

    def pad(self, seconds: float) -> None:
        self.parts.append(_silence(seconds))
        self.length += self.parts[-1].size

    def add(self, samples: np.ndarray, label: str, **info: Any) -> None:
        onset = self.length / SR
        self.parts.append(samples.astype(np.float32))
        self.length += samples.size
        self.segments.append({"label": label, "onset": round(onset, 3), "offset": round(self.length / SR, 3), **info})

    def audio(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)


def _event_info(ev: SoundEvent) -> dict[str, Any]:
    info: dict[str, Any] = {"caption": ev.caption, **ev.params}
    if ev.count is not None:
        info["count"] = ev.count
        info["event_onsets"] = list(ev.onsets)
    return info


def sequence(rng: np.random.Generator, things: Sequence[SoundEvent | Speech], gap: tuple[float, float] = (0.3, 0.8)) -> Timeline:
    """Place sound events and speech one after another with silent gaps and short lead/tail."""
    tl = Timeline()
    tl.pad(float(rng.uniform(0.1, 0.4)))
    for k, thing in enumerate(things):
        if k:
            tl.pad(float(rng.uniform(*gap)))
        if isinstance(thing, Speech):
            tl.add(thing.samples, "speech", text=thing.sentence.written, voice=thing.voice["voice"])
        else:
            tl.add(thing.samples, thing.label, **_event_info(thing))
    tl.pad(float(rng.uniform(0.1, 0.4)))
    return tl


def add_background(x: np.ndarray, rng: np.random.Generator, snr: tuple[float, float]) -> tuple[np.ndarray, dict[str, Any]]:
    """Mix a background texture under ``x`` at an SNR drawn from ``snr`` (dB)."""
    label = _choice(rng, BACKGROUNDS)
    snr_db = float(rng.uniform(*snr))
    bed = background(label, x.size / SR + 0.01, rng)
    return aug.mix_at_snr(x, bed, snr_db), {"label": label, "snr": round(snr_db, 2), "caption": SOUND_CLASSES_CAPTION[label]}


SOUND_CLASSES_CAPTION = {"white noise": "white noise", "pink noise": "pink noise", "brown noise": "a low rumble of brown noise",
                         "rain": "rain", "engine": "an engine running"}


def degrade(x: np.ndarray, rng: np.random.Generator, res: Resources, strength: float = 1.0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Random channel effects (reverb, level changes, resampling, MP3), each with a
    probability scaled by ``strength``; returns the signal and what was applied."""
    applied: list[dict[str, Any]] = []
    steps: list[tuple[float, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict[str, Any]]]]] = [
        (0.3, aug.reverb), (0.15, aug.level_changes), (0.1, aug.resample_roundtrip),
        (0.12, lambda y, r: aug.mp3_roundtrip(y, r, enabled=res.mp3)),
    ]
    for p, step in steps:
        if rng.random() < p * strength:
            x, info = step(x, rng)
            applied.append(info)
    return x, applied


def finish(x: np.ndarray, rng: np.random.Generator, level_db: float | None = None) -> tuple[np.ndarray, float]:
    """Set the final level (drawn from -32..-16 dBFS unless given) and return it as measured."""
    target = float(rng.uniform(-32.0, -16.0)) if level_db is None else level_db
    y = aug.finalize(aug.set_level(x, target))
    return y, round(aug.rms_db(y), 2)


def _speech_meta(sp: Speech) -> dict[str, Any]:
    return {"voice": sp.voice, "text": sp.sentence.written, "spoken": sp.sentence.spoken,
            "text_source": sp.sentence.source, "slots": dict(sp.sentence.slots)}


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _non_silent_labels() -> list[str]:
    return [k for k in SOUND_CLASSES if k != "silence"]


# How a question names each class ("Can you hear a siren?").
LABEL_PHRASE = {"tone": "a tone", "beeps": "beeping", "clicks": "clicking", "knocks": "knocking",
                "rising sweep": "a rising sweep", "falling sweep": "a falling sweep", "siren": "a siren",
                "white noise": "white noise", "pink noise": "pink noise", "brown noise": "brown noise",
                "chord": "a chord", "melody": "a melody", "rain": "rain", "engine": "an engine", "silence": "silence"}


def _label_phrase(label: str) -> str:
    """How an instruction names a class: ``the siren``, ``the beeps``, ``the speech``."""
    return f"the {label}"


# --------------------------------------------------------------------------------------
# Task builders

TRANSCRIBE = ("Transcribe the speech.", "What is being said?", "Write down exactly what the speaker says.",
              "Please provide a transcript of this audio.", "Transcribe this recording word for word.",
              "What does the voice say?")


def build_transcription(rng: np.random.Generator, split: str, res: Resources) -> Item:
    sp = speak(rng, split, res)
    tl = sequence(rng, [sp])
    x = tl.audio()
    meta: dict[str, Any] = {**_speech_meta(sp), "segments": tl.segments}
    if rng.random() < 0.5:
        x, bg = add_background(x, rng, (5.0, 30.0))
        meta["background"], meta["snr"] = bg, bg["snr"]
    x, meta["augment"] = degrade(x, rng, res)
    x, meta["level_dbfs"] = finish(x, rng)
    instruction = _choice(rng, TRANSCRIBE)
    answer = sp.sentence.written
    if rng.random() < 0.15:
        instruction += ' Reply in JSON as {"text": "..."}.'
        answer, meta["format"] = _json({"text": answer}), "json"
    else:
        meta["format"] = "text"
    return Item(x, "transcription", instruction, answer, meta)


CAPTION = ("Describe the audio.", "Write a short caption for this sound.", "What can you hear?",
           "Describe what happens in this recording.", "Give a one-sentence description of the audio.")


def build_captioning(rng: np.random.Generator, split: str, res: Resources) -> Item:
    n = int(rng.integers(1, 4))
    labels = list(rng.choice(_non_silent_labels(), size=n, replace=False))
    things: list[SoundEvent | Speech] = [make_sound(str(lb), rng) for lb in labels]
    with_speech = rng.random() < 0.3
    if with_speech:
        things.insert(int(rng.integers(len(things) + 1)), speak(rng, split, res, templated=0.0))
    tl = sequence(rng, things)
    x = tl.audio()
    phrases = ["someone speaks" if isinstance(t, Speech) else t.caption for t in things]
    caption = _cap(", then ".join(phrases)) + "."
    meta: dict[str, Any] = {"segments": tl.segments, "sounds": [str(lb) for lb in labels]}
    if with_speech:
        sp = next(t for t in things if isinstance(t, Speech))
        meta.update(_speech_meta(sp))
    if rng.random() < 0.2:
        x, bg = add_background(x, rng, (15.0, 30.0))
        meta["background"], meta["snr"] = bg, bg["snr"]
        caption = caption[:-1] + f", with {bg['caption']} in the background."
    x, meta["augment"] = degrade(x, rng, res, 0.5)
    x, meta["level_dbfs"] = finish(x, rng)
    meta["format"] = "text"
    return Item(x, "captioning", _choice(rng, CAPTION), caption, meta)


CLASSIFY = ("What sound is this?", "Classify this sound.", "What kind of sound do you hear?",
            "Which sound class is this?", "Name the sound.")


def build_classification(rng: np.random.Generator, split: str, res: Resources) -> Item:
    label = _choice(rng, list(SOUND_CLASSES))
    ev = make_sound(label, rng)
    tl = sequence(rng, [ev])
    x = tl.audio()
    meta: dict[str, Any] = {"segments": tl.segments, "sounds": [label]}
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng, -60.0 if label == "silence" else None)
    instruction = _choice(rng, CLASSIFY)
    style = _choice(rng, ("label", "json", "options"))
    if style == "json":
        instruction += ' Answer in JSON as {"label": "..."}.'
        answer = _json({"label": label})
    elif style == "options":
        instruction += " Choose one of: " + ", ".join(SOUND_CLASSES) + "."
        answer = label
    else:
        instruction += " Answer with the label only."
        answer = label
    meta["format"] = "json" if style == "json" else "word"
    return Item(x, "classification", instruction, answer, meta)


def build_counting(rng: np.random.Generator, split: str, res: Resources) -> Item:
    label = _choice(rng, list(COUNTABLE))
    n = int(rng.integers(1, 7))
    ev = COUNTABLE[label](rng, count=n)
    tl = sequence(rng, [ev])
    x = tl.audio()
    meta: dict[str, Any] = {"segments": tl.segments, "sounds": [label], "count": n}
    if rng.random() < 0.3:
        x, bg = add_background(x, rng, (15.0, 30.0))
        meta["background"], meta["snr"] = bg, bg["snr"]
    meta["augment"] = []  # no channel effects: reverb could smear the events being counted
    x, meta["level_dbfs"] = finish(x, rng)
    noun = {"beeps": "beeps", "clicks": "clicks", "knocks": "knocks"}[label]
    instruction = _choice(rng, (f"How many {noun} do you hear?", f"Count the {noun}.",
                                f"How many times does it {'beep' if label == 'beeps' else 'click' if label == 'clicks' else 'knock'}?"))
    style = _choice(rng, ("digit", "word", "json"))
    if style == "digit":
        instruction += " Answer with a number."
        answer = str(n)
    elif style == "word":
        instruction += " Answer with one word."
        answer = NUMBER_WORDS[n]
    else:
        instruction += ' Answer in JSON as {"count": N}.'
        answer = _json({"count": n})
    meta["format"] = {"digit": "word", "word": "word", "json": "json"}[style]
    return Item(x, "counting", instruction, answer, meta)


def build_order(rng: np.random.Generator, split: str, res: Resources) -> Item:
    if rng.random() < 0.35:
        ev = make_sound(_choice(rng, _non_silent_labels()), rng)
        sp = speak(rng, split, res, templated=0.0)
        things: list[SoundEvent | Speech] = [sp, ev] if rng.random() < 0.5 else [ev, sp]
    else:
        a, b = rng.choice(_non_silent_labels(), size=2, replace=False)
        things = [make_sound(str(a), rng), make_sound(str(b), rng)]
    labels = ["speech" if isinstance(t, Speech) else t.label for t in things]
    tl = sequence(rng, things, gap=(0.4, 1.0))
    x = tl.audio()
    meta: dict[str, Any] = {"segments": tl.segments, "sounds": [lb for lb in labels if lb != "speech"]}
    sp_list = [t for t in things if isinstance(t, Speech)]
    if sp_list:
        meta.update(_speech_meta(sp_list[0]))
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng)
    q = [labels[0], labels[1]] if rng.random() < 0.5 else [labels[1], labels[0]]
    kind = _choice(rng, ("first", "second", "json"))
    if kind == "first":
        instruction = f"Which came first, {_label_phrase(q[0])} or {_label_phrase(q[1])}? Answer with the name only."
        answer = labels[0]
    elif kind == "second":
        instruction = f"What did you hear after {_label_phrase(labels[0])}? Answer with the name only."
        answer = labels[1]
    else:
        instruction = 'List the two sounds in the order they occur, in JSON as {"first": "...", "second": "..."}.'
        answer = _json({"first": labels[0], "second": labels[1]})
    meta["format"] = "json" if kind == "json" else "word"
    meta["order"] = labels
    return Item(x, "order", instruction, answer, meta)


SPEECH_PRESENT = ("Is anyone speaking?", "Is there speech in this recording?", "Can you hear a voice?",
                  "Does someone talk in this clip?")


def build_presence(rng: np.random.Generator, split: str, res: Resources) -> Item:
    meta: dict[str, Any] = {}
    if rng.random() < 0.6:  # speech present or not
        present = bool(rng.random() < 0.5)
        if present:
            sp = speak(rng, split, res, templated=0.0)
            tl = sequence(rng, [sp])
            meta.update(_speech_meta(sp))
        else:
            n = int(rng.integers(1, 3))
            tl = sequence(rng, [make_sound(str(lb), rng) for lb in rng.choice(_non_silent_labels(), n, replace=False)])
        x = tl.audio()
        if rng.random() < 0.5:
            x, bg = add_background(x, rng, (5.0, 25.0))
            meta["background"], meta["snr"] = bg, bg["snr"]
        instruction = _choice(rng, SPEECH_PRESENT)
        target = "speech"
    else:  # a named sound present or not
        labels = [str(lb) for lb in rng.choice(_non_silent_labels(), 3, replace=False)]
        scene = labels[: int(rng.integers(1, 3))]
        present = bool(rng.random() < 0.5)
        target = _choice(rng, scene) if present else labels[2]
        tl = sequence(rng, [make_sound(lb, rng) for lb in scene])
        x = tl.audio()
        instruction = _choice(rng, (f"Can you hear {LABEL_PHRASE[target]}?", f"Is there {LABEL_PHRASE[target]} in this clip?"))
    meta["segments"] = tl.segments
    meta["sounds"] = [s["label"] for s in tl.segments if s["label"] != "speech"]
    meta["target"], meta["present"] = target, present
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng)
    answer = "yes" if present else "no"
    if rng.random() < 0.2:
        instruction += ' Answer in JSON as {"present": true/false}.'
        answer, meta["format"] = _json({"present": present}), "json"
    else:
        instruction += " Answer yes or no."
        meta["format"] = "word"
    return Item(x, "presence", instruction, answer, meta)


def median_f0(x: np.ndarray, fmin: float = 60.0, fmax: float = 400.0) -> float | None:
    """Median fundamental frequency (Hz) over voiced 40 ms frames of ``x`` ``[T]`` by
    normalised autocorrelation; None when fewer than 5 frames look voiced."""
    frame, hop = int(0.04 * SR), int(0.02 * SR)
    if x.size < frame:
        return None
    idx = np.arange(0, x.size - frame, hop)[:, None] + np.arange(frame)[None, :]
    frames = x[idx] * np.hanning(frame)  # [F, frame]
    energy = np.sum(frames**2, axis=1)
    frames = frames[energy > 0.1 * np.max(energy)]
    spec = np.fft.rfft(frames, 2 * frame, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :frame]  # [F, lag]
    ac = ac / (ac[:, :1] + 1e-12)
    lo, hi = int(SR / fmax), int(SR / fmin)
    lags = lo + np.argmax(ac[:, lo:hi], axis=1)
    voiced = ac[np.arange(ac.shape[0]), lags] > 0.5
    if voiced.sum() < 5:
        return None
    return float(np.median(SR / lags[voiced]))


PITCH_LOW_HZ, PITCH_HIGH_HZ = 130.0, 190.0
SLOW, FAST = (0.0, 0.2), (0.8, 1.0)


def _attribute(rng: np.random.Generator, split: str, res: Resources, attribute: str) -> tuple[Speech, str, str, str] | None:
    """Render speech for ``attribute`` (accent, speed or pitch); returns (speech, question,
    answer, json key), or None when the rendered pitch is ambiguous."""
    if attribute == "accent":
        voice = _choice(rng, [v for v in res.voices[split] if v.engine == "espeak"])
        sp = speak(rng, split, res, voice=voice, templated=0.0)
        accents = ", ".join(ACCENT_NAMES[a] for a in ACCENT_NAMES)
        q = _choice(rng, ("What accent does the speaker have?", "Which English accent is this?",
                          f"Which accent is this: {accents}?"))
        return sp, q, ACCENT_NAMES[str(sp.voice["accent"])], "accent"
    if attribute == "speed":
        fast = bool(rng.random() < 0.5)
        speed = float(rng.uniform(*(FAST if fast else SLOW)))
        sp = speak(rng, split, res, speed=speed, templated=0.0)
        q = _choice(rng, ("Is the speaker talking fast or slow?", "Is the speech fast or slow?",
                          "How fast is the person speaking: fast or slow?"))
        return sp, q, "fast" if fast else "slow", "speed"
    voice = _choice(rng, [v for v in res.voices[split] if v.engine == "espeak"])
    high = bool(rng.random() < 0.5)
    sp = speak(rng, split, res, voice=voice, pitch=int(rng.integers(45, 61) if high else rng.integers(10, 26)), templated=0.0)
    f0 = median_f0(sp.samples)
    sp.voice["median_f0_hz"] = None if f0 is None else round(f0, 1)
    if f0 is None or PITCH_LOW_HZ <= f0 <= PITCH_HIGH_HZ:
        return None
    q = _choice(rng, ("Is the voice high or low pitched?", "Does the speaker have a high or a low voice?",
                      "Is the pitch of this voice high or low?"))
    return sp, q, "high" if f0 > PITCH_HIGH_HZ else "low", "pitch"


def build_speaker(rng: np.random.Generator, split: str, res: Resources) -> Item:
    attribute = _choice(rng, ("accent", "speed", "pitch"))
    got = _attribute(rng, split, res, attribute)
    while got is None:  # ambiguous pitch: ask about the accent instead
        attribute = "accent"
        got = _attribute(rng, split, res, attribute)
    sp, question, value, key = got
    tl = sequence(rng, [sp])
    x = tl.audio()
    meta: dict[str, Any] = {**_speech_meta(sp), "segments": tl.segments, "attribute": key, "attribute_value": value}
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng)
    if rng.random() < 0.25:
        question += f' Answer in JSON as {{"{key}": "..."}}.'
        answer, meta["format"] = _json({key: value}), "json"
    else:
        question += " Answer briefly."
        answer, meta["format"] = value, "word"
    return Item(x, "speaker", question, answer, meta)


LOUD_DB, QUIET_DB = (-18.0, -12.0), (-45.0, -36.0)


STEADY = ("tone", "rising sweep", "falling sweep", "siren", "white noise", "pink noise", "brown noise", "chord",
          "engine", "rain")


def build_loudness(rng: np.random.Generator, split: str, res: Resources) -> Item:
    loud = bool(rng.random() < 0.5)
    while True:  # the label is what was measured; retry when peak limiting spoiled a loud target
        if rng.random() < 0.5:
            sp = speak(rng, split, res, templated=0.0)
            tl = sequence(rng, [sp])
            meta: dict[str, Any] = _speech_meta(sp)
        else:
            tl = sequence(rng, [make_sound(_choice(rng, STEADY), rng)])
            meta = {}
        # Level over the active part (the segment), not the silent padding.
        seg = tl.segments[0]
        x = tl.audio()
        span = slice(int(seg["onset"] * SR), int(seg["offset"] * SR))
        target = float(rng.uniform(*(LOUD_DB if loud else QUIET_DB)))
        x = aug.finalize(x * 10 ** ((target - aug.rms_db(x[span])) / 20))
        active_db = aug.rms_db(x[span])
        if (active_db > -24.0) == loud:
            break
    meta["segments"] = tl.segments
    meta["sounds"] = [s["label"] for s in tl.segments if s["label"] != "speech"]
    meta["level_dbfs"], meta["active_level_dbfs"] = round(aug.rms_db(x), 2), round(active_db, 2)
    meta["augment"] = []
    instruction = _choice(rng, ("Is this recording quiet or loud?", "Is the sound loud or quiet?",
                                "How loud is this audio: quiet or loud?"))
    meta["format"] = "word"
    return Item(x, "loudness", instruction + " Answer with one word.", "loud" if loud else "quiet", meta)


def build_duration(rng: np.random.Generator, split: str, res: Resources) -> Item:
    if rng.random() < 0.4:
        sp = speak(rng, split, res, templated=0.0)
        things: list[SoundEvent | Speech] = [sp]
        meta: dict[str, Any] = _speech_meta(sp)
    else:
        n = int(rng.integers(1, 4))
        things = [make_sound(str(lb), rng) for lb in rng.choice(_non_silent_labels(), n, replace=False)]
        meta = {}
    tl = sequence(rng, things)
    target = float(rng.integers(max(2, int(np.ceil(tl.length / SR))), 21))  # whole seconds, >= content
    tl.pad(max(0.0, target - tl.length / SR))
    x = tl.audio()[: int(target * SR)]
    meta["segments"] = tl.segments
    meta["sounds"] = [s["label"] for s in tl.segments if s["label"] != "speech"]
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng)
    seconds = int(round(x.size / SR))
    meta["seconds"] = seconds
    if rng.random() < 0.25:
        instruction = 'How long is this clip? Answer in JSON as {"seconds": N}.'
        answer, meta["format"] = _json({"seconds": seconds}), "json"
    else:
        instruction = _choice(rng, ("How long is this clip?", "What is the duration of this recording?",
                                    "About how many seconds does this audio last?"))
        answer, meta["format"] = f"About {seconds} second{'s' if seconds != 1 else ''}.", "text"
    return Item(x, "duration", instruction, answer, meta)


def _next_day(day: str) -> str:
    return DAYS[(DAYS.index(day) + 1) % 7]


# Questions per template: (question pattern over the slots, answer function over the slots).
CONTENT_QUESTIONS: dict[str, tuple[tuple[str, Callable[[dict[str, str]], str]], ...]] = {
    "buy": (("Who went to the market?", lambda s: s["name"]),
            ("How many {object} were bought?", lambda s: s["number"]),
            ("On which day did they go to the market?", lambda s: s["day"]),
            ("If {name} bought two more {object}, how many would that be?", lambda s: str(int(s["number"]) + 2)),
            ("Which day comes right after the day mentioned?", lambda s: _next_day(s["day"]))),
    "car": (("What colour is the {vehicle}?", lambda s: s["colour"]),
            ("What does {name} drive to work?", lambda s: f"a {s['colour']} {s['vehicle']}")),
    "meet": (("Which city is the meeting in?", lambda s: s["city"]),
             ("On what day is the meeting?", lambda s: s["day"]),
             ("At what time is the meeting?", lambda s: s["time"])),
    "birthday": (("Whose birthday is mentioned?", lambda s: s["name"]),
                 ("In which month is the birthday?", lambda s: s["month"])),
    "pet": (("What kind of animal is the pet?", lambda s: s["animal"]),
            ("What is the pet called?", lambda s: s["name"]),
            ("Which room does the pet love?", lambda s: s["room"])),
    "paint": (("What colour should the door be painted?", lambda s: s["colour"]),
              ("Which door should be painted?", lambda s: f"the {s['room']} door"),
              ("By which day should the painting be done?", lambda s: s["day"])),
    "trip": (("Where did {name} fly to?", lambda s: s["city"]),
             ("In which year was the trip?", lambda s: s["year"]),
             ("How many people travelled in total, counting {name}?", lambda s: str(int(s["number"]) + 1))),
    "price": (("What colour is the {vehicle}?", lambda s: s["colour"]),
              ("How much does the {vehicle} cost?", lambda s: f"${s['price']}")),
    "call": (("Who should be called?", lambda s: s["name"]),
             ("What should they ask about?", lambda s: f"the {s['object']}"),
             ("At what time should the call happen?", lambda s: s["time"])),
    "favourite": (("What colour did they mention?", lambda s: s["colour"]),
                  ("Where does the speaker live?", lambda s: s["city"])),
    "room": (("How many {object} are there?", lambda s: s["number"]),
             ("Where are the {object}?", lambda s: f"in the {s['room']}"),
             ("If one of the {object} were removed, how many would be left?", lambda s: str(int(s["number"]) - 1))),
    "ask": (("What colour are the {object}?", lambda s: s["colour"]),
            ("Which city is mentioned?", lambda s: s["city"]),
            ("Who is the question about?", lambda s: s["name"])),
    "bring": (("How many {object} should be brought?", lambda s: s["number"]),
              ("Where should they be brought?", lambda s: f"to the {s['room']}"),
              ("By what time?", lambda s: s["time"])),
    "met": (("Who did {name} meet?", lambda s: s["name2"]),
            ("Where did they meet?", lambda s: s["city"]),
            ("On which day did they meet?", lambda s: s["day"])),
    "train": (("Where is the train going?", lambda s: s["city"]),
              ("Which platform does the train leave from?", lambda s: s["number"]),
              ("When does the train leave?", lambda s: s["time"])),
    "percent": (("What share of the {object} are {colour}?", lambda s: f"about {s['percent']}%"),
                ("What percentage of the {object} are not {colour}?", lambda s: f"about {100 - int(s['percent'])}%")),
    "where": (("Who put the {object} somewhere?", lambda s: s["name"]),
              ("How many {object} are mentioned?", lambda s: s["number"])),
    "feed": (("Which animal should be fed?", lambda s: s["animal"]),
             ("When should the {animal} be fed?", lambda s: s["time"]),
             ("Which room should be locked?", lambda s: f"the {s['room']}")),
}


def content_question(rng: np.random.Generator, sentence: Sentence) -> tuple[str, str]:
    """A question about a templated ``sentence`` and its answer, from the slots."""
    name = sentence.source.removeprefix("template:")
    question, answer_of = _choice(rng, CONTENT_QUESTIONS[name])
    return question.format(**sentence.slots), answer_of(sentence.slots)


def _template(name: str) -> Template:
    return next(t for t in TEMPLATES if t.name == name)


def build_spoken_qa(rng: np.random.Generator, split: str, res: Resources) -> Item:
    sentence = res.corpus.templated(split, rng)
    sp = speak(rng, split, res, sentence=sentence)
    tl = sequence(rng, [sp])
    x = tl.audio()
    meta: dict[str, Any] = {**_speech_meta(sp), "segments": tl.segments}
    if rng.random() < 0.4:
        x, bg = add_background(x, rng, (10.0, 30.0))
        meta["background"], meta["snr"] = bg, bg["snr"]
    x, meta["augment"] = degrade(x, rng, res, 0.5)
    x, meta["level_dbfs"] = finish(x, rng)
    question, answer = content_question(rng, sentence)
    if rng.random() < 0.2:
        question += ' Answer in JSON as {"answer": "..."}.'
        answer, meta["format"] = _json({"answer": answer}), "json"
    else:
        question += " Answer briefly."
        meta["format"] = "text"
    return Item(x, "spoken_qa", question, answer, meta)


def build_multi_turn(rng: np.random.Generator, split: str, res: Resources) -> Item:
    sp = speak(rng, split, res, templated=0.4)
    tl = sequence(rng, [sp])
    x = tl.audio()
    meta: dict[str, Any] = {**_speech_meta(sp), "segments": tl.segments}
    noisy = bool(rng.random() < 0.5)
    if noisy:
        x, bg = add_background(x, rng, (5.0, 20.0))
        meta["background"], meta["snr"] = bg, bg["snr"]
    x, meta["augment"] = degrade(x, rng, res, 0.5)
    x, meta["level_dbfs"] = finish(x, rng)
    turns = [{"instruction": _choice(rng, TRANSCRIBE), "answer": sp.sentence.written}]
    follow: list[tuple[str, str]] = [
        ("How many words did they say?", str(len(sp.sentence.written.split()))),
        ("Was there any background noise? Answer yes or no.", "yes" if noisy else "no"),
        ("Was it a question, a statement or a request?", _sentence_kind(sp.sentence)),
    ]
    if noisy:
        follow.append(("What was the background sound?", meta["background"]["label"]))
    if sp.voice.get("accent") and sp.voice["engine"] == "espeak":
        follow.append(("What accent did the speaker have?", ACCENT_NAMES[str(sp.voice["accent"])]))
    if sp.sentence.slots:
        follow.append(content_question(rng, sp.sentence))
    order = rng.permutation(len(follow))[: int(rng.integers(1, 3))]
    turns += [{"instruction": follow[i][0], "answer": follow[i][1]} for i in order]
    meta["format"] = "text"
    return Item(x, "multi_turn", turns[0]["instruction"], turns[0]["answer"], meta, turns)


def _sentence_kind(sentence: Sentence) -> str:
    if sentence.source.startswith("template:"):
        kind = _template(sentence.source.removeprefix("template:")).kind
        return {"statement": "a statement", "question": "a question", "command": "a request"}[kind]
    return "a question" if sentence.written.rstrip().endswith("?") else "a statement"


def build_event_list(rng: np.random.Generator, split: str, res: Resources) -> Item:
    n = int(rng.integers(2, 4))
    labels = [str(lb) for lb in rng.choice(_non_silent_labels(), n, replace=False)]
    tl = sequence(rng, [make_sound(lb, rng) for lb in labels])
    x = tl.audio()
    meta: dict[str, Any] = {"segments": tl.segments, "sounds": labels}
    x, meta["augment"] = degrade(x, rng, res, 0.3)
    x, meta["level_dbfs"] = finish(x, rng)
    if rng.random() < 0.7:
        instruction = _choice(rng, ("List the sounds you hear in order, separated by commas.",
                                    "Name each sound in the order it occurs, as a comma-separated list."))
        answer, meta["format"] = ", ".join(labels), "list"
    else:
        instruction = 'List the sounds in order in JSON as {"events": [...]}.'
        answer, meta["format"] = _json({"events": labels}), "json"
    return Item(x, "event_list", instruction, answer, meta)


def build_task_calls(rng: np.random.Generator, split: str, res: Resources) -> Item:
    """Tool calls (``omnivox.datagen.task_calls``; imported here, as it builds on this module)."""
    from omnivox.datagen.task_calls import build_task_calls as build

    return build(rng, split, res)


# One explicit table: task name -> builder, and how often each is drawn.
TASKS: dict[str, Callable[[np.random.Generator, str, Resources], Item]] = {
    "transcription": build_transcription,
    "captioning": build_captioning,
    "classification": build_classification,
    "counting": build_counting,
    "order": build_order,
    "presence": build_presence,
    "speaker": build_speaker,
    "loudness": build_loudness,
    "duration": build_duration,
    "spoken_qa": build_spoken_qa,
    "multi_turn": build_multi_turn,
    "event_list": build_event_list,
    "task_calls": build_task_calls,
}
# The tasks of generator 1.0, drawn in one weighted cycle over the item index (generate.task_schedule).
TASK_WEIGHTS: dict[str, int] = {
    "transcription": 6, "captioning": 2, "classification": 2, "counting": 2, "order": 1, "presence": 1,
    "speaker": 2, "loudness": 1, "duration": 1, "spoken_qa": 3, "multi_turn": 2, "event_list": 1,
}
# Tasks added later: each has its own item stream (ids "<task>-0000042"), with this share of all
# items, so adding one leaves every item of the weighted cycle the same bytes.
TASK_SHARES: dict[str, float] = {"task_calls": 0.2}
assert set(TASKS) == set(TASK_WEIGHTS) | set(TASK_SHARES) and not set(TASK_WEIGHTS) & set(TASK_SHARES)
