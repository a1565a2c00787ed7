"""Start-up benchmark: whole-process ``omnivox chat`` vs openai-whisper's own CLI on a 10 s clip.

Each round runs three fresh processes, in this order, on the same clip:

- A ``omnivox chat --audio CLIP "Is anyone speaking?"``      (a question)
- B ``omnivox chat --audio CLIP "Transcribe the speech."``   (a transcript)
- C ``whisper CLIP --model TINY_EN.pt --language en --fp16 False``   (the reference)

C uses the same tiny.en weights the model folder's transcriber uses (the openai-whisper ``.pt``
that omnivox converts once from the bundled CTranslate2 model into ``$OMNIVOX_CACHE/whisper``).
Runs alternate (A B C A B C ...) so that drifting load on a shared machine hits all three alike;
the figures are medians of the per-round ratios A/C and B/C, and the peak resident memory of
each child (``os.wait4``'s ``ru_maxrss``: only that child, not the sum of all children).
One unrecorded warm-up round comes first (it writes omnivox's caches and fills the OS file cache).

Targets (issue "Start-up"): a question in at most the whisper CLI's time (ratio <= 1.0), a
transcript in at most 1.5x, and peak memory under 1500 MB (MB = 10^6 bytes).

Usage::

    .venv/bin/python benchmarks/startup.py [--runs 5] [--clip F] [--model DIR] [--out F.json] [--threads N]

The runs inherit the environment: ``PYTHONPATH=/other/checkout/root`` measures another tree
with the same virtual environment. On a machine that other jobs keep busy, torch's default
OpenMP threads spin while they wait and every figure swings by several times; ``--threads 1``
(``OMP_NUM_THREADS=1`` for all three commands) gives steady figures there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
# The first clip that exists is cut to CLIP_SECONDS (JFK's inaugural address, 11 s).
DEFAULT_SOURCES = (
    ROOT / "assets" / "examples" / "jfk.flac",
    ROOT.parent / "shared" / "fixtures" / "speech" / "jfk.flac",
)
CLIP_SECONDS = 10.0
QUESTION = "Is anyone speaking?"
TRANSCRIPT = "Transcribe the speech."
# Upper bounds: run time as a multiple of the whisper CLI's, and peak resident memory.
MAX_QUESTION_RATIO = 1.0
MAX_TRANSCRIPT_RATIO = 1.5
MAX_PEAK_MB = 1500.0
# Printed by a child process: the openai-whisper file that the model folder's transcriber names.
# config.json is read as JSON so that the snippet depends on one project function alone.
_WHISPER_PATH_SNIPPET = """
import json, sys
from pathlib import Path
from omnivox.agent.loading import resolve_ref
folder = Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
transcriber = config.get("transcriber") or {}
ref = transcriber.get("path") or next(e["path"] for e in config["encoders"] if e["kind"] == "whisper")
print(resolve_ref(ref, folder))
"""


@dataclass(frozen=True)
class Run:
    """One child process: which command, its wall time, its peak resident memory and its output."""

    kind: str  # "question", "transcript" or "whisper"
    round: int
    wall_s: float
    cpu_s: float  # user + system time
    peak_mb: float
    stdout: str


def prepare_clip(source: Path, out: Path, seconds: float = CLIP_SECONDS) -> Path:
    """Write the first ``seconds`` of ``source`` to ``out`` (same sample rate and channels, FLAC)."""
    samples, rate = sf.read(source, dtype="float32", always_2d=True)  # [S, C]
    needed = round(seconds * rate)
    if samples.shape[0] < needed:
        raise SystemExit(f"{source}: {samples.shape[0] / rate:.2f} s long, need at least {seconds} s")
    sf.write(out, samples[:needed], rate, format="FLAC")
    return out


def default_source() -> Path:
    """The first of ``DEFAULT_SOURCES`` that exists."""
    for path in DEFAULT_SOURCES:
        if path.is_file():
            return path
    raise SystemExit(f"no speech clip found (looked for {', '.join(map(str, DEFAULT_SOURCES))}); pass --clip")


def bin_script(name: str) -> str:
    """A console script of this virtual environment (``omnivox``, ``whisper``)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: install omnivox (and openai-whisper) into this environment")
    return str(path)


def default_model_dir() -> Path:
    """The model folder ``omnivox chat`` uses without ``--model``."""
    env = os.environ.get("OMNIVOX_MODEL")
    return Path(env) if env else ROOT / "assets" / "nano"


def whisper_weights(model_dir: Path) -> Path:
    """The openai-whisper ``.pt`` of the model folder's transcriber (converted now if not cached)."""
    result = subprocess.run(
        [sys.executable, "-c", _WHISPER_PATH_SNIPPET, str(model_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"could not resolve the Whisper weights of {model_dir}:\n{result.stderr[-2000:]}")
    path = Path(result.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise SystemExit(f"the Whisper weights of {model_dir} resolve to {path}, which does not exist")
    return path


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, str]:
    """Run ``argv`` to completion; its wall seconds, CPU seconds, peak resident MB (10^6 bytes) and stdout.

    ``os.wait4`` gives the rusage of that one child; ``ru_maxrss`` is in KiB on Linux. A child's
    peak starts at this process's resident size (``/bin/true`` spawned by a 430 MiB process
    reports 430 MiB), which is why this script imports nothing heavy (it stays near 30 MiB).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale / 1e6, stdout.strip()


def commands(clip: Path, model_dir: Path | None, whisper_pt: Path, whisper_out: Path) -> dict[str, list[str]]:
    """The three commands of a round, by kind, in the order they run."""
    omnivox = [bin_script("omnivox"), "chat", "--audio", str(clip)]
    if model_dir is not None:
        omnivox += ["--model", str(model_dir)]
    return {
        "question": [*omnivox, QUESTION],
        "transcript": [*omnivox, TRANSCRIPT],
        "whisper": [
            bin_script("whisper"),
            str(clip),
            "--model",
            str(whisper_pt),
            "--language",
            "en",
            "--output_dir",
            str(whisper_out),
            "--fp16",
            "False",
        ],
    }


def run_rounds(
    cmds: dict[str, list[str]],
    rounds: int,
    env: dict[str, str] | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    """One unrecorded warm-up round, then ``rounds`` rounds of every command in turn."""
    for argv in cmds.values():
        measure(argv, env)
    runs = []
    for i in range(rounds):
        for kind, argv in cmds.items():
            runs.append(Run(kind, i, *measure(argv, env)))
            if on_run is not None:
                on_run(runs[-1])
    return runs


def summarize(runs: list[Run]) -> dict:
    """Medians per kind, medians of the per-round ratios to the whisper CLI, peaks, and the verdicts."""
    by_kind: dict[str, list[Run]] = {}
    for run in runs:
        by_kind.setdefault(run.kind, []).append(run)
    whisper = {r.round: r for r in by_kind["whisper"]}

    def ratio(kind: str, field: str = "wall_s") -> float:
        return statistics.median(getattr(r, field) / getattr(whisper[r.round], field) for r in by_kind[kind])

    kinds = {
        kind: {
            "median_s": statistics.median(r.wall_s for r in items),
            "min_s": min(r.wall_s for r in items),
            "max_s": max(r.wall_s for r in items),
            "median_cpu_s": statistics.median(r.cpu_s for r in items),
            "peak_mb": max(r.peak_mb for r in items),
            "answer": items[-1].stdout,
        }
        for kind, items in by_kind.items()
    }
    question, transcript = ratio("question"), ratio("transcript")
    peak = max(kinds["question"]["peak_mb"], kinds["transcript"]["peak_mb"])
    return {
        "kinds": kinds,
        "question_ratio": question,
        "transcript_ratio": transcript,
        "question_cpu_ratio": ratio("question", "cpu_s"),
        "transcript_cpu_ratio": ratio("transcript", "cpu_s"),
        "omnivox_peak_mb": peak,
        "targets": {
            "question_ratio": {"max": MAX_QUESTION_RATIO, "pass": question <= MAX_QUESTION_RATIO},
            "transcript_ratio": {"max": MAX_TRANSCRIPT_RATIO, "pass": transcript <= MAX_TRANSCRIPT_RATIO},
            "omnivox_peak_mb": {"max": MAX_PEAK_MB, "pass": peak < MAX_PEAK_MB},
        },
    }


def print_summary(summary: dict, rounds: int) -> None:
    """The medians and the verdicts as two tables."""
    from rich.console import Console
    from rich.table import Table

    times = Table(title=f"Whole-process start-up, {rounds} paired rounds")
    for column in ("command", "median s", "min s", "max s", "median CPU s", "peak MB"):
        times.add_column(column, justify="left" if column == "command" else "right")
    labels = {
        "question": "A omnivox question",
        "transcript": "B omnivox transcript",
        "whisper": "C whisper CLI",
    }
    for kind, row in summary["kinds"].items():
        seconds = (row[k] for k in ("median_s", "min_s", "max_s", "median_cpu_s"))
        times.add_row(labels[kind], *(f"{s:.2f}" for s in seconds), f"{row['peak_mb']:.0f}")

    verdicts = Table(title="Targets (wall-time ratios: medians of the per-round ratios)")
    for column in ("figure", "measured", "target", ""):
        verdicts.add_column(column, justify="left" if column == "figure" else "right")
    rows = (  # label, summary key, how a value and its bound print
        ("A / C", "question_ratio", "{:.2f}x", "<= {:.1f}x"),
        ("B / C", "transcript_ratio", "{:.2f}x", "<= {:.1f}x"),
        ("omnivox peak memory", "omnivox_peak_mb", "{:.0f} MB", "< {:.0f} MB"),
    )
    for label, key, value, bound in rows:
        target = summary["targets"][key]
        verdict = "[green]pass" if target["pass"] else "[red]FAIL"
        verdicts.add_row(label, value.format(summary[key]), bound.format(target["max"]), verdict)

    console = Console()
    console.print(
        f"A: omnivox chat '{QUESTION}'\nB: omnivox chat '{TRANSCRIPT}'\nC: whisper CLI (same tiny.en)"
    )
    console.print(times)
    console.print(verdicts)
    console.print(
        f"CPU-time ratios: A / C {summary['question_cpu_ratio']:.2f}x, B / C {summary['transcript_cpu_ratio']:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="paired rounds after the warm-up (default 5)")
    parser.add_argument(
        "--clip", type=Path, help=f"speech audio; its first {CLIP_SECONDS:g} s are used (default: JFK)"
    )
    parser.add_argument("--model", type=Path, help="omnivox model folder (default: the bundled nano model)")
    parser.add_argument("--out", type=Path, help="write the runs and the summary as JSON here")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for every run (default: as inherited; 1 gives steadier figures on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    env = dict(os.environ) if args.threads is None else {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    model_dir = args.model or default_model_dir()
    whisper_pt = whisper_weights(model_dir)
    source = args.clip or default_source()
    with tempfile.TemporaryDirectory(prefix="omnivox-startup-") as tmp:
        clip = prepare_clip(source, Path(tmp) / "clip.flac")
        cmds = commands(clip, args.model, whisper_pt, Path(tmp) / "whisper-out")
        print(f"clip: first {CLIP_SECONDS:g} s of {source}; whisper weights: {whisper_pt}", file=sys.stderr)

        def progress(run: Run) -> None:
            print(
                f"round {run.round + 1}/{args.runs} {run.kind:<10} {run.wall_s:6.2f} s wall {run.cpu_s:6.2f} s CPU "
                f"{run.peak_mb:6.0f} MB",
                file=sys.stderr,
            )

        load_before = os.getloadavg()
        runs = run_rounds(cmds, args.runs, env, on_run=progress)
        load_after = os.getloadavg()
    summary = summarize(runs)
    print_summary(summary, args.runs)
    print(
        f"1-minute load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    if args.out is not None:
        record = {
            "clip": {"source": str(source), "seconds": CLIP_SECONDS},
            "whisper_weights": str(whisper_pt),
            "model": str(model_dir),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_before": load_before,
                "load_average_after": load_after,
            },
            "env": {
                k: v
                for k, v in env.items()
                if k in ("PYTHONPATH", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMNIVOX_CACHE")
            },
            "summary": summary,
            "runs": [asdict(r) for r in runs],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
