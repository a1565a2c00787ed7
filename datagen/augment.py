"""Augmentations and mixing for 16 kHz mono float32 signals ``[T]``.

Each augmentation returns the new signal and a small dict recorded in the item's metadata,
so a manifest says exactly what was done. MP3 artefacts need the ``ffmpeg`` CLI; without it
the step is skipped and the skip is recorded.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from typing import Any

import numpy as np
import soxr
from scipy import signal

log = logging.getLogger(__name__)

SR = 16_000
PEAK_LIMIT = 0.98
MP3_DELAY = 1105  # samples of LAME encoder + decoder delay at 16 kHz, measured


def rms_db(x: np.ndarray) -> float:
    """RMS level in dBFS (-inf for an all-zero signal)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return 20 * np.log10(rms) if rms > 0 else float("-inf")


def set_level(x: np.ndarray, target_db: float) -> np.ndarray:
    """Scale ``x`` to an RMS of ``target_db`` dBFS, then pull it down if the peak would clip."""
    level = rms_db(x)
    if not np.isfinite(level):
        return x.astype(np.float32)
    y = x * 10 ** ((target_db - level) / 20)
    peak = float(np.max(np.abs(y)))
    if peak > PEAK_LIMIT:
        y = y * (PEAK_LIMIT / peak)
    return y.astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech + g * noise`` with ``g`` chosen so that 10 log10(P_speech / P_noise) = ``snr_db``.
    ``noise`` must be at least as long as ``speech``; both ``[T]``."""
    if noise.size < speech.size:
        raise ValueError(f"noise ({noise.size} samples) is shorter than speech ({speech.size})")
    noise = noise[: speech.size]
    ps, pn = np.mean(np.square(speech, dtype=np.float64)), np.mean(np.square(noise, dtype=np.float64))
    if pn == 0:
        return speech.astype(np.float32)
    g = np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    return (speech + g * noise).astype(np.float32)


def synthetic_rir(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """A room impulse response ``[L]``: a direct path, a few sparse early reflections, and
    exponentially decaying noise whose energy falls 60 dB in ``rt60`` seconds."""
    length = int(min(1.5, rt60 * 1.2) * SR)
    t = np.arange(length) / SR
    tail = rng.standard_normal(length) * np.exp(-6.908 * t / rt60)  # 6.908 = ln(1000): -60 dB at rt60
    tail = signal.sosfilt(signal.butter(1, 5000, "lowpass", fs=SR, output="sos"), tail)
    onset = int(rng.uniform(0.003, 0.012) * SR)
    tail[:onset] = 0.0
    h = 0.3 * tail / (np.sqrt(np.sum(tail**2)) + 1e-12)
    h[0] = 1.0
    for _ in range(int(rng.integers(3, 8))):
        h[int(rng.uniform(0.002, 0.03) * SR)] += float(rng.uniform(-0.4, 0.4))
    return h


def reverb(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Convolve with a synthetic RIR (RT60 0.2-1.0 s, drawn from ``rng``); same length as ``x``."""
    rt60 = float(rng.uniform(0.2, 1.0))
    wet = float(rng.uniform(0.3, 1.0))
    h = synthetic_rir(rng, rt60)
    y = signal.fftconvolve(x, h)[: x.size]
    y = (1 - wet) * x + wet * y
    return set_level(y, rms_db(x)), {"type": "reverb", "rt60": round(rt60, 3), "wet": round(wet, 3)}


def level_changes(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A slow piecewise-linear gain curve (2-4 breakpoints, -9..+3 dB), as if the source moved."""
    k = int(rng.integers(2, 5))
    gains_db = rng.uniform(-9.0, 3.0, size=k)
    curve = np.interp(np.arange(x.size), np.linspace(0, x.size - 1, k), 10 ** (gains_db / 20))
    return (x * curve).astype(np.float32), {"type": "level_changes", "gains_db": [round(float(g), 2) for g in gains_db]}


def resample_roundtrip(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Down to 8 / 11.025 / 12 kHz and back (band limitation like a phone line)."""
    rate = int(rng.choice([8000, 11025, 12000]))
    y = soxr.resample(soxr.resample(x, SR, rate, quality="MQ"), rate, SR, quality="MQ")
    y = np.pad(y, (0, max(0, x.size - y.size)))[: x.size]
    return y.astype(np.float32), {"type": "resample", "via_hz": rate}


@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str | None:
    """Path of ``ffmpeg`` on PATH, or None."""
    return shutil.which("ffmpeg")


@functools.lru_cache(maxsize=1)
def ffmpeg_version() -> str | None:
    exe = ffmpeg_binary()
    if exe is None:
        return None
    out = subprocess.run([exe, "-version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


def mp3_roundtrip(x: np.ndarray, rng: np.random.Generator, enabled: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode to MP3 at 24-64 kbit/s and decode again with the ffmpeg CLI (bit-exact flags),
    realigned to ``x``. Without ffmpeg (or with ``enabled=False``) returns ``x`` unchanged and
    records the skip."""
    bitrate = int(rng.choice([24, 32, 48, 64]))
    exe = ffmpeg_binary()
    if exe is None or not enabled:
        return x, {"type": "mp3", "skipped": "ffmpeg not found" if exe is None else "disabled"}
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    common = [exe, "-hide_banner", "-loglevel", "error", "-nostdin", "-threads", "1"]
    enc = subprocess.run(common + ["-f", "s16le", "-ar", str(SR), "-ac", "1", "-i", "pipe:0",
                                   "-c:a", "libmp3lame", "-b:a", f"{bitrate}k", "-flags", "+bitexact",
                                   "-fflags", "+bitexact", "-f", "mp3", "pipe:1"],
                         input=pcm, capture_output=True, check=False)
    if enc.returncode != 0:
        log.warning("ffmpeg mp3 encode failed (%s); codec step skipped", enc.stderr.decode()[:200])
        return x, {"type": "mp3", "skipped": "encode failed"}
    dec = subprocess.run(common + ["-f", "mp3", "-i", "pipe:0", "-f", "s16le", "-ar", str(SR), "-ac", "1",
                                   "-flags", "+bitexact", "pipe:1"],
                         input=enc.stdout, capture_output=True, check=True)
    y = np.frombuffer(dec.stdout, dtype="<i2").astype(np.float32) / 32768.0
    y = y[MP3_DELAY:]  # encoder + decoder delay (no gapless header through a pipe)
    y = np.pad(y, (0, max(0, x.size - y.size)))[: x.size]
    return y, {"type": "mp3", "kbps": bitrate}


def finalize(x: np.ndarray) -> np.ndarray:
    """Clip-safe float32 ``[T]`` with no NaN/inf (an internal invariant: asserted)."""
    assert np.all(np.isfinite(x)), "non-finite samples produced"
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > PEAK_LIMIT:
        x = x * (PEAK_LIMIT / peak)
    return x.astype(np.float32)
