"""Procedural sound events with labels, captions and (where countable) counts.

Every class has one generator ``make_<label>(rng) -> SoundEvent`` in the ``SOUND_CLASSES``
table. Events are 16 kHz mono float32 ``[T]`` at an RMS of about -20 dBFS (silence aside), so
mixing code sets levels explicitly. The classes are built to be told apart by ear and by a
small model: tonal vs noisy, steady vs pulsed, rising vs falling, low vs high.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import signal

log = logging.getLogger(__name__)

SR = 16_000
EVENT_RMS_DB = -20.0

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class SoundEvent:
    """One rendered sound.

    ``samples``: ``[T]`` float32 at 16 kHz; ``label``: its class (a key of ``SOUND_CLASSES``);
    ``caption``: a lower-case noun phrase (``"three short beeps"``); ``count``: the number of
    countable events placed (beeps, clicks, knocks), else None; ``onsets``: their start times
    in seconds relative to the event; ``params``: the generator's choices.
    """

    samples: np.ndarray
    label: str
    caption: str
    count: int | None = None
    onsets: tuple[float, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.samples.size / SR


def _t(seconds: float) -> np.ndarray:
    return np.arange(int(round(seconds * SR))) / SR


def _fade(x: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    n = min(int(seconds * SR), x.size // 2)
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n)
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _norm(x: np.ndarray, rms_db: float = EVENT_RMS_DB) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    if rms == 0.0:
        return x.astype(np.float32)
    return (x * (10 ** (rms_db / 20) / rms)).astype(np.float32)


def coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), ``[n]``, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1] if n > 1 else 1.0
    spec *= f ** (-exponent / 2)
    x = np.fft.irfft(spec, n)
    return x / (np.std(x) + 1e-12)


def _harmonic(freq: float, seconds: float, decay: float, partials: int = 4) -> np.ndarray:
    t = _t(seconds)
    x = sum((0.6**k) * np.sin(2 * np.pi * freq * (k + 1) * t) for k in range(partials))
    return np.asarray(x) * np.exp(-t / decay)


def _pulse_train(pulses: list[np.ndarray], gaps: list[float], lead: float = 0.05) -> tuple[np.ndarray, tuple[float, ...]]:
    """Concatenate ``pulses`` with silent ``gaps`` (seconds) between them; returns the signal and onsets."""
    parts: list[np.ndarray] = [np.zeros(int(lead * SR))]
    onsets: list[float] = []
    pos = parts[0].size
    for k, pulse in enumerate(pulses):
        onsets.append(pos / SR)
        parts.append(pulse)
        pos += pulse.size
        gap = np.zeros(int(gaps[k] * SR)) if k < len(gaps) else np.zeros(int(lead * SR))
        parts.append(gap)
        pos += gap.size
    return np.concatenate(parts), tuple(round(o, 4) for o in onsets)


def _count_phrase(n: int, singular: str, plural: str) -> str:
    return f"a single {singular}" if n == 1 else f"{NUMBER_WORDS[n]} {plural}"


# --------------------------------------------------------------------------------------
# The classes


def make_tone(rng: np.random.Generator) -> SoundEvent:
    freq = float(rng.integers(25, 201) * 10)  # 250-2000 Hz in 10 Hz steps
    dur = float(rng.uniform(0.8, 2.5))
    x = _fade(np.sin(2 * np.pi * freq * _t(dur)), 0.02)
    return SoundEvent(_norm(x), "tone", f"a steady {freq:.0f} hertz tone", params={"freq_hz": freq, "seconds": round(dur, 3)})


def make_beeps(rng: np.random.Generator, count: int | None = None) -> SoundEvent:
    n = int(rng.integers(1, 7)) if count is None else count
    freq = float(rng.integers(6, 26) * 100)  # 600-2500 Hz
    length = float(rng.uniform(0.08, 0.2))
    pulses = [_fade(np.sin(2 * np.pi * freq * _t(length)), 0.005) for _ in range(n)]
    gaps = [float(rng.uniform(0.15, 0.4)) for _ in range(n - 1)]
    x, onsets = _pulse_train(pulses, gaps)
    caption = "a single short beep" if n == 1 else f"{NUMBER_WORDS[n]} short beeps"
    return SoundEvent(_norm(x), "beeps", caption, n, onsets, {"freq_hz": freq, "beep_seconds": round(length, 3)})


def make_clicks(rng: np.random.Generator, count: int | None = None) -> SoundEvent:
    n = int(rng.integers(1, 7)) if count is None else count
    sos = signal.butter(2, 2000, "highpass", fs=SR, output="sos")
    pulses = []
    for _ in range(n):
        burst = rng.standard_normal(int(0.004 * SR)) * np.exp(-np.arange(int(0.004 * SR)) / (0.0008 * SR))
        pulses.append(np.concatenate([signal.sosfilt(sos, burst), np.zeros(int(0.01 * SR))]))
    gaps = [float(rng.uniform(0.2, 0.5)) for _ in range(n - 1)]
    x, onsets = _pulse_train(pulses, gaps)
    return SoundEvent(_norm(x, -26.0), "clicks", _count_phrase(n, "sharp click", "sharp clicks"), n, onsets)


def make_knocks(rng: np.random.Generator, count: int | None = None) -> SoundEvent:
    n = int(rng.integers(1, 7)) if count is None else count
    freq = float(rng.uniform(90, 220))
    decay = float(rng.uniform(0.025, 0.05))
    sos = signal.butter(2, 1500, "lowpass", fs=SR, output="sos")
    pulses = []
    for _ in range(n):
        t = _t(0.2)
        body = np.sin(2 * np.pi * freq * t) * np.exp(-t / decay)
        hit = signal.sosfilt(sos, rng.standard_normal(t.size)) * np.exp(-t / 0.006)
        pulses.append(body + 0.5 * hit)
    gaps = [float(rng.uniform(0.12, 0.35)) for _ in range(n - 1)]
    x, onsets = _pulse_train(pulses, gaps)
    caption = "a single knock" if n == 1 else f"{NUMBER_WORDS[n]} knocks"
    return SoundEvent(_norm(x), "knocks", caption, n, onsets, {"freq_hz": round(freq, 1)})


def _sweep(rng: np.random.Generator, rising: bool) -> SoundEvent:
    lo, hi = float(rng.uniform(200, 500)), float(rng.uniform(2000, 4000))
    dur = float(rng.uniform(0.6, 2.0))
    f0, f1 = (lo, hi) if rising else (hi, lo)
    x = _fade(signal.chirp(_t(dur), f0=f0, t1=dur, f1=f1, method="logarithmic"), 0.02)
    label = "rising sweep" if rising else "falling sweep"
    caption = "a tone sweeping upward in pitch" if rising else "a tone sweeping downward in pitch"
    return SoundEvent(_norm(x), label, caption, params={"from_hz": round(f0), "to_hz": round(f1), "seconds": round(dur, 3)})


def make_rising_sweep(rng: np.random.Generator) -> SoundEvent:
    return _sweep(rng, True)


def make_falling_sweep(rng: np.random.Generator) -> SoundEvent:
    return _sweep(rng, False)


def make_siren(rng: np.random.Generator) -> SoundEvent:
    dur = float(rng.uniform(2.0, 4.0))
    t = _t(dur)
    if rng.random() < 0.5:  # wail: slow sinusoidal glide
        rate = float(rng.uniform(0.3, 0.8))
        inst = 950 + 350 * np.sin(2 * np.pi * rate * t - np.pi / 2)
        kind = "wailing"
    else:  # hi-lo: two alternating pitches
        rate = float(rng.uniform(1.0, 2.0))
        inst = np.where(np.floor(t * rate * 2) % 2 == 0, 1300.0, 900.0)
        kind = "two-tone"
    phase = 2 * np.pi * np.cumsum(inst) / SR
    x = np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase)
    return SoundEvent(_norm(_fade(x, 0.05)), "siren", f"a {kind} siren", params={"kind": kind, "rate_hz": round(rate, 3)})


def _noise(rng: np.random.Generator, exponent: float, label: str, caption: str) -> SoundEvent:
    dur = float(rng.uniform(1.0, 3.0))
    x = _fade(coloured_noise(int(dur * SR), exponent, rng), 0.05)
    return SoundEvent(_norm(x), label, caption, params={"seconds": round(dur, 3)})


def make_white_noise(rng: np.random.Generator) -> SoundEvent:
    return _noise(rng, 0.0, "white noise", "a burst of bright white noise")


def make_pink_noise(rng: np.random.Generator) -> SoundEvent:
    return _noise(rng, 1.0, "pink noise", "a burst of soft pink noise")


def make_brown_noise(rng: np.random.Generator) -> SoundEvent:
    return _noise(rng, 2.0, "brown noise", "a deep rumbling brown noise")


def _midi_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def make_chord(rng: np.random.Generator) -> SoundEvent:
    root = int(rng.integers(48, 67))
    quality = "major" if rng.random() < 0.5 else "minor"
    notes = [root, root + (4 if quality == "major" else 3), root + 7] + ([root + 12] if rng.random() < 0.5 else [])
    dur = float(rng.uniform(1.0, 2.5))
    x = sum(_harmonic(_midi_hz(n), dur, dur / 3) for n in notes)
    return SoundEvent(_norm(_fade(np.asarray(x), 0.01)), "chord", f"a {quality} chord",
                      params={"quality": quality, "midi": notes})


def make_melody(rng: np.random.Generator) -> SoundEvent:
    scale = (0, 2, 4, 7, 9, 12, 14, 16)
    base = int(rng.integers(60, 73))
    n = int(rng.integers(4, 9))
    notes = [base + int(scale[rng.integers(len(scale))]) for _ in range(n)]
    lengths = [float(rng.choice([0.15, 0.2, 0.25, 0.3, 0.4])) for _ in range(n)]
    x = np.concatenate([_fade(_harmonic(_midi_hz(m), s, s / 2, 3), 0.005) for m, s in zip(notes, lengths, strict=True)])
    return SoundEvent(_norm(x), "melody", f"a short melody of {NUMBER_WORDS[n] if n <= 10 else n} notes",
                      params={"midi": notes, "note_seconds": lengths})


def make_rain(rng: np.random.Generator) -> SoundEvent:
    dur = float(rng.uniform(2.0, 4.0))
    n = int(dur * SR)
    bed = signal.sosfilt(signal.butter(2, [400, 6000], "bandpass", fs=SR, output="sos"), coloured_noise(n, 1.0, rng))
    drops = np.zeros(n)
    rate = float(rng.uniform(60, 200))  # drops per second
    k = rng.poisson(rate * dur)
    pos = rng.integers(0, n - 200, size=k)
    amp = rng.uniform(0.5, 3.0, size=k)
    decay = np.exp(-np.arange(120) / 15.0) * np.sin(2 * np.pi * rng.uniform(2500, 5000) * np.arange(120) / SR)
    for p, a in zip(pos, amp, strict=True):
        drops[p:p + 120] += a * decay
    x = 0.5 * bed / (np.std(bed) + 1e-12) + drops / (np.std(drops) + 1e-12)
    return SoundEvent(_norm(_fade(x, 0.1)), "rain", "rain pattering steadily", params={"drops_per_s": round(rate, 1)})


def make_engine(rng: np.random.Generator) -> SoundEvent:
    dur = float(rng.uniform(2.0, 4.0))
    t = _t(dur)
    firing = float(rng.uniform(25, 60))
    rev = firing * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))  # wandering revs
    phase = np.cumsum(rev) / SR
    pulses = np.maximum(0.0, np.sin(2 * np.pi * phase)) ** 8  # sharp periodic combustion pulses
    rumble = signal.sosfilt(signal.butter(4, 600, "lowpass", fs=SR, output="sos"),
                            pulses * (1 + 0.3 * rng.standard_normal(t.size)))
    x = rumble / (np.std(rumble) + 1e-12) + 0.15 * coloured_noise(t.size, 2.0, rng)
    return SoundEvent(_norm(_fade(x, 0.1)), "engine", "an engine running", params={"firing_hz": round(firing, 1)})


def make_silence(rng: np.random.Generator) -> SoundEvent:
    dur = float(rng.uniform(1.0, 3.0))
    x = 10 ** (-80 / 20) * rng.standard_normal(int(dur * SR))  # a -80 dBFS floor, not digital zero
    return SoundEvent(x.astype(np.float32), "silence", "silence", params={"seconds": round(dur, 3)})


# One explicit table: label -> generator.
SOUND_CLASSES: dict[str, Callable[[np.random.Generator], SoundEvent]] = {
    "tone": make_tone,
    "beeps": make_beeps,
    "clicks": make_clicks,
    "knocks": make_knocks,
    "rising sweep": make_rising_sweep,
    "falling sweep": make_falling_sweep,
    "siren": make_siren,
    "white noise": make_white_noise,
    "pink noise": make_pink_noise,
    "brown noise": make_brown_noise,
    "chord": make_chord,
    "melody": make_melody,
    "rain": make_rain,
    "engine": make_engine,
    "silence": make_silence,
}
COUNTABLE: dict[str, Callable[..., SoundEvent]] = {"beeps": make_beeps, "clicks": make_clicks, "knocks": make_knocks}
# Textures that can sit behind speech as background.
BACKGROUNDS = ("white noise", "pink noise", "brown noise", "rain", "engine")


def make_sound(label: str, rng: np.random.Generator) -> SoundEvent:
    """Render one event of class ``label``."""
    try:
        maker = SOUND_CLASSES[label]
    except KeyError:
        raise KeyError(f"unknown sound class {label!r}; known: {sorted(SOUND_CLASSES)}") from None
    return maker(rng)


def background(label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A background texture of class ``label`` (one of ``BACKGROUNDS``) exactly ``seconds`` long, ``[T]``."""
    n = int(round(seconds * SR))
    parts, total = [], 0
    while total < n:
        ev = make_sound(label, rng)
        parts.append(ev.samples)
        total += ev.samples.size
    x = np.concatenate(parts)[:n]
    return _fade(x, 0.05).astype(np.float32)


def detect_onsets(x: np.ndarray, threshold_db: float = -25.0, min_gap_s: float = 0.06) -> list[float]:
    """Onset times (s) of separated events in a clean signal ``[T]``: rises of the 5 ms RMS
    envelope above ``threshold_db`` relative to its peak, at least ``min_gap_s`` apart after the
    envelope has fallen below threshold. Used to check countable events."""
    hop = int(0.005 * SR)
    frames = x[: x.size // hop * hop].reshape(-1, hop)  # [F, hop]
    env = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    if env.max() == 0:
        return []
    above = env > env.max() * 10 ** (threshold_db / 20)
    onsets: list[float] = []
    last_off = -1e9
    active = False
    for i, a in enumerate(above):
        t = i * hop / SR
        if a and not active:
            if t - last_off >= min_gap_s or not onsets:
                onsets.append(t)
            active = True
        elif not a and active:
            active = False
            last_off = t
    return onsets
