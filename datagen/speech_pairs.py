"""Speech corpora in a few named voices, for the speech head: ``omnivox data tts``.

``omnivox data synth`` speaks through hundreds of voices, most of them espeak-ng: good for
listening, poor as a voice to learn to speak *with* (a model can be only as intelligible as
the voice it copies). This corpus holds clean read sentences in a handful of chosen voices,
by default the natural Kokoro voice the nano speaks with and Piper's ``joe`` when installed.

Item ``i`` is rendered from ``default_rng([seed, crc32("tts"), i])`` alone (same seed, same
bytes, whatever the worker count); its split comes from the same stream, and validation and
test items speak only the text corpus' held-out sentences (the voices are the same in every
split: the target is new sentences in a known voice). Every voice speaks at one pace
(``--speed``) so the head learns one speaking style per voice.

Layout (the ``omnivox data synth`` one, in a folder of its own)::

    audio/{train,validation,test}/tts-0000042.wav   16 kHz mono PCM16
    items/tts-0000042.json                           manifest line
    {train,validation,test}.jsonl, dataset.json      manifests, summary
    tts_state.json                                   fingerprint a resumed run must match

Items have ``task == "tts"``, ``instruction`` "Say ...", ``answer`` the written text and the
metadata :func:`omnivox.training.talker.clean_speech_items` reads (one speech segment, the
voice, the written and spoken text).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omnivox.datagen import augment as aug
from omnivox.datagen.generate import (
    SPLITS,
    ItemKey,
    _corpus_hash,
    _wav_bytes,
    _write_atomic,
    check_run_args,
    item_split,
    render_all,
)
from omnivox.datagen.text import FORTUNE_DIR, TextCorpus, load_corpus
from omnivox.datagen.voices import ENGINES, SAMPLE_RATE, Voice
from omnivox.errors import UserInputError

log = logging.getLogger(__name__)

VERSION = "1.0"
TASK = "tts"
DEFAULT_VOICES = ("kokoro:jf_gongitsune", "piper:joe")
LEVEL_DBFS = -20.0
LEAD_S, TAIL_S = 0.1, 0.15
MAX_SECONDS = 16.0
EST_ITEM_SECONDS = 4.0
SAY = ("Say: {}", "Read this aloud: {}", "Please say \u201c{}\u201d", "Speak this sentence: {}")


@dataclass(frozen=True)
class TTSOptions:
    """``voices``: voice names (``kokoro:jf_gongitsune``, ``piper:joe``, ``espeak:en-us+m1``);
    ``weights``: how often each speaks (default equal); ``speed``: the pace, 0 (slow) to 1;
    ``validation_items``/``test_items``: fractions of items in those splits;
    ``held_out_sentences``: the text corpus' held-out fraction (as in ``data synth``)."""

    voices: tuple[str, ...] = DEFAULT_VOICES
    weights: tuple[float, ...] | None = None
    speed: float = 0.45
    fortune_dir: Path | None = FORTUNE_DIR
    sentences: tuple[str, ...] | None = None
    validation_items: float = 0.03
    test_items: float = 0.03
    held_out_sentences: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.voices:
            raise UserInputError("no voices given")
        if self.weights is not None and (len(self.weights) != len(self.voices) or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise UserInputError(f"weights {self.weights} must be one non-negative number per voice {self.voices}, not all 0")
        if not 0.0 <= self.speed <= 1.0:
            raise UserInputError(f"speed {self.speed}: must be between 0 and 1")
        if not (0 < self.validation_items < 0.5 and 0 < self.test_items < 0.5):
            raise UserInputError("validation_items and test_items must be between 0 and 0.5")


def find_voices(names: tuple[str, ...]) -> list[Voice]:
    """The named voices, each checked to be installed (with the list of what is, when not)."""
    found: list[Voice] = []
    for name in names:
        engine = name.split(":", 1)[0]
        if engine not in ENGINES:
            raise UserInputError(f"voice {name!r}: unknown engine {engine!r}; choose from {sorted(ENGINES)}")
        pool = {v.name: v for v in ENGINES[engine]()}
        if name not in pool:
            shown = ", ".join(sorted(pool)[:12]) or "none: the engine is not installed"
            raise UserInputError(f"voice {name!r} is not available; {engine} has {shown}")
        found.append(pool[name])
    return found


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    seed: int
    voices: tuple[Voice, ...]
    corpus: TextCorpus
    opts: TTSOptions


def item_key(index: int) -> ItemKey:
    """Item ``index`` of the corpus: id ``tts-0000042``, seeded ``[seed, crc32("tts"), index]`` (as
    ``data synth``'s added tasks)."""
    return ItemKey(TASK, index)


def render(job: _Job, index: int) -> dict[str, Any]:
    """Render item ``index`` (or read it back when done); returns its manifest line."""
    key = item_key(index)
    meta_path = job.out_dir / "items" / f"{key.id}.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    split = item_split(job.seed, key, job.opts)
    rng = np.random.default_rng(key.seed_words(job.seed))
    weights = np.asarray(job.opts.weights or [1.0] * len(job.voices), dtype=np.float64)
    voice = job.voices[int(rng.choice(len(job.voices), p=weights / weights.sum()))]
    for _ in range(50):  # a sentence the voice can say in MAX_SECONDS
        sentence = job.corpus.sentence(split, rng)
        samples, vmeta = voice.synthesize(sentence.spoken, rng, speed=job.opts.speed)
        if 0.3 * SAMPLE_RATE < samples.size <= MAX_SECONDS * SAMPLE_RATE:
            break
    else:
        raise RuntimeError(f"item {key.id}: 50 sentences in a row were empty or over {MAX_SECONDS} s")
    speech = aug.set_level(samples, LEVEL_DBFS)
    x = aug.finalize(np.concatenate([np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32), speech,
                                     np.zeros(int(TAIL_S * SAMPLE_RATE), np.float32)]))
    rel = f"audio/{split}/{key.id}.wav"
    _write_atomic(job.out_dir / rel, _wav_bytes(x))
    onset, offset = LEAD_S, LEAD_S + speech.size / SAMPLE_RATE
    line = {
        "id": key.id, "audio": rel, "duration": round(x.size / SAMPLE_RATE, 4), "task": TASK, "split": split,
        "instruction": SAY[int(rng.integers(len(SAY)))].format(sentence.written), "answer": sentence.written,
        "metadata": {
            "seed": job.seed, "index": index, "version": VERSION,
            "segments": [{"label": "speech", "onset": round(onset, 4), "offset": round(offset, 4),
                          "text": sentence.written, "voice": vmeta["voice"]}],
            "voice": vmeta, "text": sentence.written, "spoken": sentence.spoken, "text_source": sentence.source,
            "level_dbfs": LEVEL_DBFS,
        },
    }  # fmt: skip
    _write_atomic(meta_path, (json.dumps(line, ensure_ascii=False) + "\n").encode())
    return line


def item_count(hours: float) -> int:
    return max(1, math.ceil(hours * 3600 / EST_ITEM_SECONDS))


def generate_tts(out_dir: Path, hours: float, seed: int = 0, workers: int = 1, options: TTSOptions | None = None) -> Path:
    """Generate (or resume, or extend with more ``hours``) the corpus in ``out_dir``; returns
    the path of ``dataset.json``."""
    opts = options or TTSOptions()
    check_run_args(hours, workers, seed)
    out_dir = Path(out_dir)
    corpus = load_corpus(opts.fortune_dir, opts.held_out_sentences, opts.sentences)
    voices = find_voices(opts.voices)
    fingerprint = {"version": VERSION, "seed": seed, "voices": list(opts.voices),
                   "weights": list(opts.weights) if opts.weights else None, "speed": opts.speed,
                   "splits": [opts.validation_items, opts.test_items, opts.held_out_sentences],
                   "corpus": _corpus_hash(corpus)}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    state = out_dir / "tts_state.json"
    if (out_dir / "state.json").is_file():
        raise UserInputError(f"{out_dir} holds an `omnivox data synth` dataset; give the TTS corpus a folder of its own")
    if state.is_file():
        old = json.loads(state.read_text())
        if old != fingerprint:
            diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
            raise UserInputError(f"{out_dir} holds a TTS corpus made with other settings {diff}; use a new --out folder")
    else:
        _write_atomic(state, (json.dumps(fingerprint, indent=2) + "\n").encode())
    for split in SPLITS:
        (out_dir / "audio" / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "items").mkdir(exist_ok=True)

    n = item_count(hours)
    todo = [i for i in range(n) if not (out_dir / "items" / f"{item_key(i).id}.json").is_file()]
    job = _Job(out_dir, seed, tuple(voices), corpus, opts)
    log.info("%d TTS items planned (%d already done), voices %s, %d workers", n, n - len(todo), opts.voices, workers)
    bar = tqdm(total=n, initial=n - len(todo), desc="tts", unit="item", disable=not opts.progress, dynamic_ncols=True)
    render_all(render, job, todo, workers, bar.update, chunksize=2)
    bar.close()
    return write_manifests(out_dir, n, fingerprint, corpus)


def write_manifests(out_dir: Path, n: int, fingerprint: dict[str, Any], corpus: TextCorpus) -> Path:
    """The split manifests of items ``0..n-1`` and the summary ``dataset.json``."""
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    seconds: dict[str, dict[str, float]] = {s: {} for s in SPLITS}
    for i in range(n):
        raw = (out_dir / "items" / f"{item_key(i).id}.json").read_text().rstrip("\n")
        line = json.loads(raw)
        lines[line["split"]].append(raw)
        voice = line["metadata"]["voice"]["voice"]
        seconds[line["split"]][voice] = seconds[line["split"]].get(voice, 0.0) + line["duration"]
    for split in SPLITS:
        _write_atomic(out_dir / f"{split}.jsonl", "".join(x + "\n" for x in lines[split]).encode())
    summary = {
        "generator": "omnivox.datagen.speech_pairs", **fingerprint, "items": n,
        "hours": round(sum(sum(v.values()) for v in seconds.values()) / 3600, 4),
        "hours_per_voice": {s: {k: round(v / 3600, 4) for k, v in sorted(seconds[s].items())} for s in SPLITS},
        "held_out_sentences": {s: len(corpus.by_split[s]) for s in ("validation", "test")},
    }
    path = out_dir / "dataset.json"
    _write_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())
    return path


def build_tts_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="omnivox data tts", description="Clean read speech in a few named voices.")
    p.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume or extend)")
    p.add_argument("--hours", required=True, type=float, help="approximate hours of speech (raise it to extend a corpus)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="worker processes")
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES), help=f"comma-separated voice names (default {','.join(DEFAULT_VOICES)})")
    p.add_argument("--weights", default=None, help="comma-separated share of each voice (default: equal)")
    p.add_argument("--speed", type=float, default=TTSOptions.speed, help="speaking pace 0 (slow) .. 1 (fast)")
    p.add_argument("--fortunes", type=Path, default=FORTUNE_DIR, help="folder of fortune files (text source)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_tts(args: argparse.Namespace) -> int:
    voices = tuple(v.strip() for v in args.voices.split(",") if v.strip())
    try:
        weights = tuple(float(w) for w in args.weights.split(",")) if args.weights else None
    except ValueError as err:
        raise UserInputError(f"--weights {args.weights!r}: {err}") from None
    opts = TTSOptions(voices=voices, weights=weights, speed=args.speed, fortune_dir=args.fortunes, progress=not args.quiet)
    summary = json.loads(generate_tts(args.out, args.hours, args.seed, args.workers, opts).read_text())
    print(f"{summary['items']} TTS items, {summary['hours']:.3f} h -> {args.out}")
    return 0
