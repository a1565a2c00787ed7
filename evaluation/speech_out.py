"""``omnivox eval --suite speech-out``: how well the model speaks.

Text to speech on the held-out sentences of an ``omnivox data tts`` test split, each in the
voice that read it there (when the model has that voice; else its default voice). Per voice:

- WER of Whisper tiny.en reading the model's speech, beside the WER of the source recording
  of the same sentence (the voice it learned from: its ceiling) and of that recording through
  the codec (the ceiling the codec leaves);
- speaker similarity: cosine of Resemblyzer's utterance embeddings, model's speech vs the
  source recording (needs the ``resemblyzer`` package, which ships its weights; "n/a" without);
- time to the first audio and real-time factor of speaking (talker + codec, streamed).

Writes ``results.json``, ``results.md``, ``spectrograms.png`` (source above the model's
speech) and a few ``samples/*.wav``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnivox.decoders.speech import SpeechHead
from omnivox.errors import UserInputError
from omnivox.evaluation.codec import WHISPER, resynthesize, whisper_reader
from omnivox.evaluation.report import plot_spectrograms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sentence:
    """A held-out sentence and the source recording of it."""

    name: str
    text: str
    voice: str
    audio: np.ndarray  # 16 kHz


@dataclass
class SpokenScore:
    name: str
    text: str
    voice: str  # the voice the model spoke with
    source_voice: str
    seconds: float
    heard_model: str
    heard_source: str
    heard_codec: str
    similarity: float | None
    first_audio_s: float
    speak_seconds: float


@dataclass
class SpeechOutReport:
    head: dict[str, Any]
    items: list[SpokenScore] = field(default_factory=list)
    voices: dict[str, dict[str, Any]] = field(default_factory=dict)
    waves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)  # name -> (source, model)

    def to_json(self) -> dict[str, Any]:
        return {"head": self.head, "voices": self.voices, "items": [asdict(i) for i in self.items]}


def held_out_sentences(data_dir: Path, split: str = "test", limit: int | None = 40) -> list[Sentence]:
    """The ``tts`` items of an ``omnivox data tts`` split, alternating between voices."""
    from omnivox.evaluation.codec import _read_16k
    from omnivox.training.data import iter_jsonl

    manifest = data_dir / f"{split}.jsonl"
    if not manifest.is_file():
        raise UserInputError(f"--data {data_dir}: no {manifest.name} (make one with `omnivox data tts`)")
    by_voice: dict[str, list[dict[str, Any]]] = {}
    for _, item in iter_jsonl(manifest):
        meta = item.get("metadata") or {}
        voice = (meta.get("voice") or {}).get("voice")
        if item.get("task") == "tts" and isinstance(meta.get("text"), str) and voice:
            by_voice.setdefault(str(voice), []).append(item)
    if not by_voice:
        raise UserInputError(f"{manifest}: no tts items (make them with `omnivox data tts`)")
    picked: list[dict[str, Any]] = []
    queues = [list(v) for _, v in sorted(by_voice.items())]
    while any(queues) and (not limit or len(picked) < limit):
        for q in queues:
            if q and (not limit or len(picked) < limit):
                picked.append(q.pop(0))
    return [Sentence(str(i["id"]), i["metadata"]["text"], str(i["metadata"]["voice"]["voice"]), _read_16k(data_dir / i["audio"]))
            for i in picked]  # fmt: skip


def _speaker_encoder() -> Any | None:
    try:
        from resemblyzer import VoiceEncoder  # type: ignore[import-not-found]
    except ImportError:
        logger.info("resemblyzer not installed: speaker similarity is n/a")
        return None
    return VoiceEncoder(device="cpu", verbose=False)


def _similarity(encoder: Any, a: np.ndarray, b: np.ndarray) -> float | None:
    if encoder is None:
        return None
    ea, eb = encoder.embed_utterance(a.astype(np.float32)), encoder.embed_utterance(b.astype(np.float32))
    return float(np.dot(ea, eb) / (np.linalg.norm(ea) * np.linalg.norm(eb)))


def evaluate_speech_out(head: SpeechHead, sentences: list[Sentence], whisper: str = WHISPER, progress: bool = True) -> SpeechOutReport:
    """Speak every sentence and score it (see the module docstring)."""
    import soxr
    from tqdm import tqdm

    from omnivox.evaluation.metrics import corpus_wer

    if not sentences:
        raise UserInputError("no sentences to speak")
    transcriber = whisper_reader(whisper)
    encoder = _speaker_encoder()
    report = SpeechOutReport(head={
        "voices": head.voices, "default_voice": head.default_voice, "sample_rate": head.sample_rate,
        "codec_frame_rate": head.codec.frame_rate, "talker_params": sum(p.numel() for p in head.talker.parameters()),
        "whisper": whisper, "speaker_encoder": "resemblyzer" if encoder is not None else None,
    })  # fmt: skip
    head.say("Warm up.")  # the first call pays for allocations; keep it out of the timings
    for s in tqdm(sentences, desc="speech-out", disable=not progress):
        voice = s.voice if s.voice in head.voices else head.default_voice
        spoken = head.say(s.text, voice)
        wav = spoken.waveform if spoken.sample_rate == 16_000 else soxr.resample(spoken.waveform, spoken.sample_rate, 16_000)
        wav = np.asarray(wav, dtype=np.float32)
        through_codec, _ = resynthesize(head.codec, s.audio)
        report.waves[s.name] = (s.audio, wav)
        report.items.append(SpokenScore(
            s.name, s.text, voice, s.voice, len(wav) / 16_000, transcriber.transcribe_long(wav),
            transcriber.transcribe_long(s.audio), transcriber.transcribe_long(through_codec),
            _similarity(encoder, wav, s.audio), float(spoken.first_audio_s or 0.0), float(spoken.seconds_taken or 0.0),
        ))  # fmt: skip
    for voice in dict.fromkeys(i.voice for i in report.items):
        rows = [i for i in report.items if i.voice == voice]
        refs = [i.text for i in rows]
        sims = [i.similarity for i in rows if i.similarity is not None]
        report.voices[voice] = {
            "sentences": len(rows),
            "seconds": sum(i.seconds for i in rows),
            "wer_model": corpus_wer(refs, [i.heard_model for i in rows]),
            "wer_source": corpus_wer(refs, [i.heard_source for i in rows]),
            "wer_source_through_codec": corpus_wer(refs, [i.heard_codec for i in rows]),
            "speaker_similarity": float(np.mean(sims)) if sims else None,
            "first_audio_ms_median": 1000 * float(np.median([i.first_audio_s for i in rows])),
            "real_time_factor": sum(i.speak_seconds for i in rows) / max(1e-9, sum(i.seconds for i in rows)),
            "sources": sorted({i.source_voice for i in rows}),
        }
    return report


def markdown(report: SpeechOutReport) -> str:
    h = report.head
    lines = [
        f"Speech out: {len(report.items)} held-out sentences; voices {', '.join(h['voices'])} (default {h['default_voice']}); "
        f"talker {h['talker_params'] / 1e6:.1f} M parameters; Whisper {h['whisper']}.",
        "",
        "| voice | sentences | WER model | WER source voice | WER source via codec | speaker similarity | first audio (median) | RTF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for voice, v in report.voices.items():
        sim = "n/a" if v["speaker_similarity"] is None else f"{v['speaker_similarity']:.3f}"
        lines.append(f"| {voice} | {v['sentences']} | {100 * v['wer_model']:.1f} % | {100 * v['wer_source']:.1f} % | "
                     f"{100 * v['wer_source_through_codec']:.1f} % | {sim} | {v['first_audio_ms_median']:.0f} ms | "
                     f"{v['real_time_factor']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_speech_out_report(report: SpeechOutReport, out: Path, samples: int = 4) -> dict[str, Path]:
    from omnivox.agent.workspace import write_audio

    out.mkdir(parents=True, exist_ok=True)
    files = {"results.json": out / "results.json", "results.md": out / "results.md", "spectrograms.png": out / "spectrograms.png"}
    files["results.json"].write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    files["results.md"].write_text(markdown(report), encoding="utf-8")
    shown = [i for i in report.items][:3]
    plot_spectrograms([[(f"source {i.source_voice}", report.waves[i.name][0], 16_000),
                        (f"model {i.voice}: {i.text[:30]}", report.waves[i.name][1], 16_000)] for i in shown],
                      files["spectrograms.png"])  # fmt: skip
    (out / "samples").mkdir(exist_ok=True)
    for i in report.items[:samples]:
        write_audio(out / "samples" / f"{i.name}.wav", report.waves[i.name][1], 16_000)
    return files
