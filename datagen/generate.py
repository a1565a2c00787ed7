"""Reproducible synthetic dataset generation: planning, parallel rendering, resume, manifests.

Item ``i`` is rendered from ``np.random.default_rng([seed, i])`` alone, so the output does not
depend on the number of workers or on resuming. Each finished item leaves
``audio/<split>/<id>.wav`` and ``items/<id>.json`` (written atomically, the JSON last); a
re-run skips items whose JSON exists, then rebuilds ``train.jsonl``, ``validation.jsonl``,
``test.jsonl`` and ``dataset.json`` from the item files in index order.

Two kinds of items. The tasks of ``TASK_WEIGHTS`` (generator 1.0) share one index ``0, 1, 2, ...``:
``--hours`` sets how many, and item ``i``'s task is the weighted cycle's entry ``i``. Each task of
``TASK_SHARES`` (added later: tool calls) has its own index and random stream (item ``k`` is
``task_calls-000000k``, drawn from ``default_rng([seed, crc32(task), k])``), with as many items as
make its share of all items. So adding such a task, or changing its share, leaves every item of the
cycle the same bytes, and an existing dataset is extended in place by running the same command.

Layout of ``out_dir``::

    audio/{train,validation,test}/0000042.wav   16 kHz mono PCM16
    items/0000042.json                          the manifest line of item 42
    items/task_calls-0000007.json               the manifest line of tool-call item 7
    {train,validation,test}.jsonl               manifests (JSON lines)
    dataset.json                                summary: counts, seed, version, held-out lists
    state.json                                  fingerprint that a resumed run must match
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from omnivox.datagen import augment as aug
from omnivox.datagen.task_calls import HELD_OUT_TOOLS
from omnivox.datagen.task_calls import VERSION as TASK_CALLS_VERSION
from omnivox.datagen.tasks import TASK_SHARES, TASK_WEIGHTS, TASKS, Item, Resources
from omnivox.datagen.text import FORTUNE_DIR, TextCorpus, load_corpus, split_fraction
from omnivox.datagen.voices import SAMPLE_RATE, Voice, available_voices, espeak_version
from omnivox.errors import OmnivoxError, UserInputError

if TYPE_CHECKING:
    from omnivox.datagen.speech_pairs import TTSOptions

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"  # the tasks of the weighted cycle; added tasks carry their own version
ADDED_TASK_VERSIONS = {"task_calls": TASK_CALLS_VERSION}
assert set(ADDED_TASK_VERSIONS) == set(TASK_SHARES)
SPLITS = ("train", "validation", "test")
# Average rendered item length (s), measured; turns requested hours into an item count.
EST_ITEM_SECONDS = 5.5


@dataclass(frozen=True)
class SynthOptions:
    """Everything but the output folder, hours, seed and worker count.

    ``engines``: TTS engines to use when installed (espeak is required);
    ``engine_share``: probability that an optional engine speaks an item;
    ``fortune_dir``: where fortune files are read (None: built-in text);
    ``sentences``: use these sentences instead (tests);
    ``validation_items``/``test_items``: fractions of items in those splits;
    ``held_out_sentences``: fraction of sentences kept for each of validation and test;
    ``held_out_voices``: fraction of voices (espeak: of variants) kept for each of them;
    ``mp3``: allow the MP3 codec step (needs ffmpeg); ``progress``: show a progress bar;
    ``task_shares``: the share of all items each added task gets (0 leaves it out).
    """

    engines: tuple[str, ...] = ("espeak", "piper", "kokoro")
    engine_share: dict[str, float] = field(default_factory=lambda: {"piper": 0.05, "kokoro": 0.02})
    fortune_dir: Path | None = FORTUNE_DIR
    sentences: tuple[str, ...] | None = None
    validation_items: float = 0.05
    test_items: float = 0.05
    held_out_sentences: float = 0.05
    held_out_voices: float = 0.1
    mp3: bool = True
    progress: bool = True
    task_shares: dict[str, float] = field(default_factory=lambda: dict(TASK_SHARES))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.task_shares) - set(TASK_SHARES))
        if unknown:
            raise UserInputError(f"task_shares names unknown task(s) {unknown}; known: {sorted(TASK_SHARES)}")
        if any(not 0.0 <= v < 1.0 for v in self.task_shares.values()) or sum(self.task_shares.values()) >= 0.9:
            raise UserInputError(f"task_shares {self.task_shares}: each must be 0 or more, together below 0.9")
        for name in ("validation_items", "test_items", "held_out_sentences", "held_out_voices"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise UserInputError(f"{name}={value}: must be between 0 and 0.5")
        if self.validation_items + self.test_items >= 1.0:
            raise UserInputError("validation_items + test_items must be below 1")
        if sum(self.engine_share.values()) >= 1.0:
            raise UserInputError(f"engine_share {self.engine_share} sums to 1 or more; espeak needs a share")


# --------------------------------------------------------------------------------------
# Planning


def voice_split(voice: Voice, held_out: float) -> str:
    """The split a voice belongs to. espeak voices are held out by *variant* (a held-out
    variant is unseen in training under every accent); other engines by voice name. Piper's
    single voice always trains."""
    if voice.engine == "piper":
        return "train"
    key = f"voice:espeak-variant:{getattr(voice, 'variant', voice.name)}" if voice.engine == "espeak" else f"voice:{voice.name}"
    u = split_fraction(key)
    return "test" if u < held_out else "validation" if u < 2 * held_out else "train"


def voices_by_split(voices: list[Voice], held_out: float) -> dict[str, tuple[Voice, ...]]:
    groups: dict[str, list[Voice]] = {s: [] for s in SPLITS}
    for v in voices:
        groups[voice_split(v, held_out)].append(v)
    for split, pool in groups.items():
        if not any(v.engine == "espeak" for v in pool):
            raise UserInputError(f"no espeak voice fell into split {split!r} (held_out_voices={held_out}); raise it")
    return {k: tuple(v) for k, v in groups.items()}


def task_schedule(seed: int) -> list[str]:
    """The cycle of task names items walk through: every task once (shuffled), then the
    weighted remainder (shuffled), so even a tiny run covers every task."""
    rng = np.random.default_rng([seed, 2**31 - 1])
    once = list(TASK_WEIGHTS)
    extra = [t for t, w in TASK_WEIGHTS.items() for _ in range(w - 1)]
    return [once[i] for i in rng.permutation(len(once))] + [extra[i] for i in rng.permutation(len(extra))]


@dataclass(frozen=True, order=True)
class ItemKey:
    """Which item: ``index`` in the weighted cycle (``task`` None) or in an added task's own stream."""

    task: str | None
    index: int

    @property
    def id(self) -> str:
        return item_id(self.index) if self.task is None else f"{self.task}-{self.index:07d}"

    def seed_words(self, seed: int) -> list[int]:
        """What the item's random streams are seeded with (the cycle's: ``[seed, index]``, as in 1.0)."""
        return [seed, self.index] if self.task is None else [seed, zlib.crc32(self.task.encode()), self.index]


def item_split(seed: int, key: ItemKey | int, opts: SynthOptions | TTSOptions) -> str:
    """The split of item ``key``: from ``default_rng([*seed words, 1])`` and the options' shares
    (``test_items``, ``validation_items``)."""
    key = key if isinstance(key, ItemKey) else ItemKey(None, key)
    u = float(np.random.default_rng([*key.seed_words(seed), 1]).random())
    return "test" if u < opts.test_items else "validation" if u < opts.test_items + opts.validation_items else "train"


def item_count(hours: float) -> int:
    """Items of the weighted cycle for ``hours``."""
    return max(1, math.ceil(hours * 3600 / EST_ITEM_SECONDS))


def plan_items(n: int, shares: dict[str, float]) -> list[ItemKey]:
    """The ``n`` items of the cycle and each added task's items (its share of the total), interleaved
    evenly in manifest order. Growing ``n`` only appends to each stream."""
    total = sum(shares.values())
    placed: list[tuple[float, int, ItemKey]] = [(float(i), 0, ItemKey(None, i)) for i in range(n)]
    for order, (task, share) in enumerate(sorted(shares.items()), start=1):
        per_item = share / (1.0 - total)  # added items per cycle item
        count = math.ceil(n * per_item) if share > 0 else 0
        placed += [((k + 0.5) / per_item, order, ItemKey(task, k)) for k in range(count)]
    return [key for _, _, key in sorted(placed)]


# --------------------------------------------------------------------------------------
# Rendering one item (in a worker)


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    seed: int
    schedule: tuple[str, ...]
    resources: Resources
    opts: SynthOptions


# What a worker process renders with (set by render_all before the first item)
_WORK: tuple[Callable[[Any, Any], Any], Any] | None = None


def _set_work(render: Callable[[Any, Any], Any], job: Any) -> None:
    global _WORK
    _WORK = (render, job)


def _render_one(key: Any) -> Any:
    assert _WORK is not None, "worker not initialised"
    render, job = _WORK
    return render(job, key)


def item_id(index: int) -> str:
    return f"{index:07d}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wav_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def render_item(job: _Job, key: ItemKey | int) -> dict[str, Any]:
    """Render item ``key`` (or load it when already done); returns its manifest line."""
    key = key if isinstance(key, ItemKey) else ItemKey(None, key)
    meta_path = job.out_dir / "items" / f"{key.id}.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    split = item_split(job.seed, key, job.opts)
    task = job.schedule[key.index % len(job.schedule)] if key.task is None else key.task
    rng = np.random.default_rng(key.seed_words(job.seed))
    try:
        item: Item = TASKS[task](rng, split, job.resources)
    except OmnivoxError:
        raise
    except Exception as err:
        raise RuntimeError(f"item {key.id} (task {task}, split {split}, seed {job.seed}) failed: {err}") from err
    if item.audio.size / SAMPLE_RATE > 30.0:
        raise AssertionError(f"item {key.id}: {item.audio.size / SAMPLE_RATE:.1f} s is over 30 s")
    wav = _wav_bytes(item.audio)
    rel = f"audio/{split}/{key.id}.wav"
    _write_atomic(job.out_dir / rel, wav)
    line: dict[str, Any] = {
        "id": key.id, "audio": rel, "duration": round(item.audio.size / SAMPLE_RATE, 4),
        "task": item.task, "split": split, "instruction": item.instruction, "answer": item.answer,
        "metadata": {"seed": job.seed, "index": key.index, **item.metadata},
    }
    if item.system is not None:
        line["system"] = item.system
    if item.turns is not None:
        line["turns"] = item.turns
    _write_atomic(meta_path, (json.dumps(line, ensure_ascii=False, sort_keys=False) + "\n").encode())
    return line


# --------------------------------------------------------------------------------------
# The whole dataset


def _corpus_hash(corpus: TextCorpus) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for s in corpus.by_split[split]:
            h.update(s.encode() + b"\n")
    return h.hexdigest()[:16]


def _fingerprint(seed: int, opts: SynthOptions, corpus: TextCorpus, voices: list[Voice]) -> dict[str, Any]:
    """What must match for a resumed run to continue a dataset."""
    return {
        "generator_version": GENERATOR_VERSION, "seed": seed,
        "engines": sorted({v.engine for v in voices}), "voices": len(voices),
        "engine_share": dict(sorted(opts.engine_share.items())), "corpus": _corpus_hash(corpus),
        "splits": [opts.validation_items, opts.test_items, opts.held_out_sentences, opts.held_out_voices],
        "mp3": bool(opts.mp3 and aug.ffmpeg_binary()), "espeak": espeak_version(),
        "added_tasks": dict(sorted(ADDED_TASK_VERSIONS.items())),
    }


# Keys a dataset made before they existed lacks; its items are still valid (added tasks have their own streams)
_ADDED_KEYS = ("added_tasks",)


def _continues(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a dataset with fingerprint ``old`` can be continued under ``new``."""
    return old == new or ({k: v for k, v in new.items() if k not in _ADDED_KEYS} == old)


def check_run_args(hours: float, workers: int, seed: int) -> None:
    """A generator run's ``--hours``, ``--workers`` and ``--seed``, each named when wrong."""
    if not hours > 0:
        raise UserInputError(f"--hours {hours}: must be positive")
    if workers < 1:
        raise UserInputError(f"--workers {workers}: must be at least 1")
    if seed < 0:
        raise UserInputError(f"--seed {seed}: must be non-negative")


def generate(out_dir: Path, hours: float, seed: int, workers: int = 1, options: SynthOptions | None = None) -> Path:
    """Generate (or resume) a synthetic dataset of about ``hours`` hours in ``out_dir``.

    Same ``seed`` (and same installed engines, fortunes and ffmpeg) -> byte-identical audio and
    manifests, whatever ``workers`` is. Returns the path of ``dataset.json``.
    """
    opts = options or SynthOptions()
    check_run_args(hours, workers, seed)
    out_dir = Path(out_dir)
    corpus = load_corpus(opts.fortune_dir, opts.held_out_sentences, opts.sentences)
    voices = available_voices(opts.engines)
    by_split = voices_by_split(voices, opts.held_out_voices)
    fingerprint = _fingerprint(seed, opts, corpus, voices)

    out_dir.mkdir(parents=True, exist_ok=True)
    state = out_dir / "state.json"
    old = json.loads(state.read_text()) if state.is_file() else None
    if old is not None and not _continues(old, fingerprint):
        diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
        raise UserInputError(f"{out_dir} holds a dataset made with other settings {diff}; use a new --out folder")
    if old != fingerprint:  # new, or made before the added tasks: they join it
        _write_atomic(state, (json.dumps(fingerprint, indent=2) + "\n").encode())
    for split in SPLITS:
        (out_dir / "audio" / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "items").mkdir(exist_ok=True)

    keys = plan_items(item_count(hours), opts.task_shares)
    n = len(keys)
    resources = Resources(by_split, corpus, dict(opts.engine_share), opts.mp3)
    job = _Job(out_dir, seed, tuple(task_schedule(seed)), resources, opts)
    todo = [k for k in keys if not (out_dir / "items" / f"{k.id}.json").is_file()]
    done = n - len(todo)
    log.info("%d items planned (%d already done) with %d voices, %d workers", n, done, len(voices), workers)
    bar = tqdm(total=n, initial=done, desc="synth", unit="item", disable=not opts.progress, dynamic_ncols=True)
    render_all(render_item, job, todo, workers, bar.update, chunksize=4)
    bar.close()
    return write_manifests(out_dir, keys, seed, hours, opts, corpus, by_split, fingerprint)


def render_all(render: Callable[[Any, Any], Any], job: Any, todo: Sequence[Any], workers: int, done: Callable[[], Any],
               chunksize: int = 4) -> None:  # fmt: skip
    """``render(job, key)`` for every key of ``todo``: here (``workers`` 1), or in a pool of
    ``workers`` processes (``job`` is handed to each once); ``done()`` after each item (in any order)."""
    if workers == 1 or len(todo) <= 1:
        for key in todo:
            render(job, key)
            done()
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_set_work, initargs=(render, job)) as pool:
        for _ in pool.imap_unordered(_render_one, todo, chunksize=chunksize):
            done()


def write_manifests(out_dir: Path, keys: list[ItemKey], seed: int, hours: float, opts: SynthOptions, corpus: TextCorpus,
                    by_split: dict[str, tuple[Voice, ...]], fingerprint: dict[str, Any]) -> Path:
    """Assemble the split manifests and ``dataset.json`` from ``items/*.json`` (in ``keys`` order)."""
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    seconds: dict[str, float] = dict.fromkeys(SPLITS, 0.0)
    n = len(keys)
    for key in keys:
        raw = (out_dir / "items" / f"{key.id}.json").read_text()
        line = json.loads(raw)
        lines[line["split"]].append(raw.rstrip("\n"))
        counts[line["split"]][line["task"]] += 1
        seconds[line["split"]] += line["duration"]
    for split in SPLITS:
        (out_dir / f"{split}.jsonl").write_text("".join(x + "\n" for x in lines[split]))
    summary = {
        "generator": "omnivox.datagen", "version": GENERATOR_VERSION, "seed": seed, "hours_requested": hours,
        "items": n, "hours": round(sum(seconds.values()) / 3600, 4), "sample_rate": SAMPLE_RATE,
        "counts": {s: dict(sorted(counts[s].items())) for s in SPLITS},
        "hours_per_split": {s: round(seconds[s] / 3600, 4) for s in SPLITS},
        "tasks": sorted([*TASK_WEIGHTS, *(t for t, share in opts.task_shares.items() if share > 0)]),
        "task_shares": dict(sorted(opts.task_shares.items())), "added_tasks": fingerprint["added_tasks"],
        "text": {"source": corpus.source, "sentences": {s: len(corpus.by_split[s]) for s in SPLITS},
                 "held_out_rule": "sha256('omnivox-datagen-v1:text:' + lower-cased words) -> split",
                 "held_out_fraction": opts.held_out_sentences},
        "voices": {"engines": fingerprint["engines"], "count": {s: len(by_split[s]) for s in SPLITS},
                   "held_out_rule": "espeak: sha256 of variant name; kokoro: of voice name; piper: train",
                   "held_out_fraction": opts.held_out_voices},
        "held_out": {
            "voices": {s: sorted(v.name for v in by_split[s]) for s in ("validation", "test")},
            "sentences": {s: list(corpus.by_split[s]) for s in ("validation", "test")},
            "tools": {"test": sorted(HELD_OUT_TOOLS)},
        },
        "espeak": fingerprint["espeak"], "ffmpeg": aug.ffmpeg_version() if fingerprint["mp3"] else None,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
                    if k not in ("sentences", "progress")},
    }
    path = out_dir / "dataset.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("wrote %s: %d items, %.3f h", path, n, summary["hours"])
    return path


# --------------------------------------------------------------------------------------
# CLI


def build_synth_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``omnivox data synth`` (adds them to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="omnivox data synth", description="Generate the synthetic training data.")
    p.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume)")
    p.add_argument("--hours", required=True, type=float, help="approximate hours of audio of the question tasks (tool-call items come on top)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="worker processes")
    p.add_argument("--engines", default="espeak,piper,kokoro",
                   help="TTS engines to use when installed, comma-separated (espeak required)")
    p.add_argument("--fortunes", type=Path, default=FORTUNE_DIR, help="folder of fortune files (text source)")
    p.add_argument("--no-mp3", action="store_true", help="skip the MP3 codec augmentation")
    p.add_argument("--task-calls-share", type=float, default=TASK_SHARES["task_calls"],
                   help="share of tool-call items among all items, added on top of --hours' items "
                        f"(default {TASK_SHARES['task_calls']}; 0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def run_synth(args: argparse.Namespace) -> int:
    """Run ``omnivox data synth`` from parsed arguments (raises UserInputError on bad input)."""
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    opts = SynthOptions(engines=engines, fortune_dir=args.fortunes, mp3=not args.no_mp3, progress=not args.quiet,
                        task_shares={**TASK_SHARES, "task_calls": args.task_calls_share})
    path = generate(args.out, args.hours, args.seed, args.workers, opts)
    summary = json.loads(path.read_text())
    print(f"{summary['items']} items, {summary['hours']:.3f} h -> {args.out}")
    return 0


def main_synth(argv: list[str] | None = None) -> int:
    """Entry point: ``omnivox data synth --out DIR --hours H --seed S [--workers N]``.
    User errors print one line and return 2 (``OMNIVOX_DEBUG=1`` shows the traceback)."""
    args = build_synth_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_synth(args)
    except UserInputError as err:
        if os.environ.get("OMNIVOX_DEBUG"):
            raise
        print(f"omnivox: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
