"""``make demo``: the bundled nano model answers questions about bundled example clips.

Run with ``python -m omnivox.agent.demo [--model DIR]``. The clips live in
``assets/examples`` (a real speech recording, speech in held-out voices, sound events, a
mixture) with the questions in ``assets/examples/questions.json``; ``sources.json`` there
says where each clip comes from, its licence and its reference answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omnivox.agent.assistant import Assistant
from omnivox.agent.audio import load_audio
from omnivox.agent.cli import default_model_dir, quiet_library_noise
from omnivox.errors import OmnivoxError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


def _examples() -> list[tuple[Path, list[str], dict]]:
    """(clip, questions, what the clip holds) for each example."""
    questions = json.loads((EXAMPLES / "questions.json").read_text())
    sources = json.loads((EXAMPLES / "sources.json").read_text())
    return [(EXAMPLES / name, qs, sources.get(name, {})) for name, qs in questions.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask the bundled model about example clips.")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled nano)")
    args = parser.parse_args(argv)
    from rich.console import Console

    quiet_library_noise()

    console = Console()
    try:
        folder = args.model or default_model_dir()
        start = time.perf_counter()
        with console.status(f"Loading {folder} ..."):
            assistant = Assistant.from_pretrained(folder)
        console.print(f"[dim]loaded {folder} in {time.perf_counter() - start:.1f} s[/dim]")
        settings = assistant.settings(max_new_tokens=64)  # as `omnivox chat` decodes
        for path, questions, source in _examples():
            clip = load_audio(path)
            console.rule(f"{path.name}  ({clip.duration:.1f} s)")
            holds = ", ".join(f"{k}: {source[k]}" for k in ("voice", "sounds", "background") if source.get(k))
            if holds:
                console.print(f"[dim]{holds}[/dim]")
            encoded = assistant.encode_clip(clip.samples)
            for question in questions:
                from omnivox.prompts import Message

                answer = assistant.generate([[Message("user", question, num_audio=1)]], [[encoded]], settings)[0].text
                console.print(f"[bold]Q:[/bold] {question}\n[bold green]A:[/bold green] {answer}")
                if question == source.get("instruction"):
                    console.print(f"[dim]   reference: {source['answer']}[/dim]")
    except OmnivoxError as err:
        print(f"omnivox demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
