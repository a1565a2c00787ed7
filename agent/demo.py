"""``make demo``: the bundled nano model answers questions about bundled example clips.

Run with ``python -m omnivox.agent.demo [--model DIR]``. The clips live in
``assets/examples`` (speech in held-out voices, sound events, a mixture) with the
questions in ``assets/examples/questions.json``; the real JFK clip from the shared
fixtures is added when that folder exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omnivox.agent.audio import load_audio
from omnivox.agent.cli import default_model_dir
from omnivox.agent.model import GenerationSettings, OmnivoxModel
from omnivox.errors import OmnivoxError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
JFK = ROOT.parent / "shared" / "fixtures" / "speech" / "jfk.flac"


def _examples() -> list[tuple[Path, list[str]]]:
    questions = json.loads((EXAMPLES / "questions.json").read_text())
    items = [(EXAMPLES / name, qs) for name, qs in questions.items()]
    if JFK.is_file():
        items.insert(0, (JFK, ["Transcribe the speech."]))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask the bundled model about example clips.")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled nano)")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    try:
        folder = args.model or default_model_dir()
        start = time.perf_counter()
        with console.status(f"Loading {folder} ..."):
            model = OmnivoxModel.from_pretrained(folder)
        console.print(f"[dim]loaded {folder} in {time.perf_counter() - start:.1f} s[/dim]")
        settings = GenerationSettings.greedy(max_new_tokens=64)
        for path, questions in _examples():
            clip = load_audio(path)
            console.rule(f"{path.name}  ({clip.duration:.1f} s)")
            tokens = model.encode_clip(clip.samples)
            for question in questions:
                from omnivox.prompts import Message

                answer = model.generate([[Message("user", question, num_audio=1)]], [[tokens]], settings)[0]
                console.print(f"[bold]Q:[/bold] {question}\n[bold green]A:[/bold green] {answer}")
    except OmnivoxError as err:
        print(f"omnivox demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
