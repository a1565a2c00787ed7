"""``make demo``: the bundled nano model answers questions about bundled example clips, then
speaks its first answer.

Run with ``python -m omnivox.agent.demo [--model DIR] [--out FILE.wav]``. The clips live in
``assets/examples`` (a real speech recording, speech in held-out voices, sound events, a
mixture) with the questions in ``assets/examples/questions.json``; ``sources.json`` there
says where each clip comes from, its licence and its reference answer. When the model folder
can speak, the first answer (the transcript of the real recording) is spoken into ``--out``
and Whisper tiny.en's reading of that audio is printed beside it.
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
    parser.add_argument("--out", type=Path, default=Path("omnivox-demo-answer.wav"),
                        help="where the spoken answer is written (default ./omnivox-demo-answer.wav)")  # fmt: skip
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
        first_answer = None
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
                first_answer = first_answer or answer
                console.print(f"[bold]Q:[/bold] {question}\n[bold green]A:[/bold green] {answer}")
                if question == source.get("instruction"):
                    console.print(f"[dim]   reference: {source['answer']}[/dim]")
        if assistant.can_speak and first_answer:
            speak_and_check(assistant, first_answer, args.out, console)
    except OmnivoxError as err:
        print(f"omnivox demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def speak_and_check(assistant: Assistant, text: str, out: Path, console) -> str:
    """Speak ``text`` into ``out`` and print what Whisper tiny.en hears in it; returns that."""
    from omnivox.agent.cli import speak_to_file
    from omnivox.evaluation.codec import whisper_reader

    console.rule("the model speaks its first answer")
    spoken = speak_to_file(assistant.speech, text, out)
    heard = whisper_reader().transcribe_long(load_audio(out).samples)
    console.print(f"[bold]said:[/bold] {text}\n[bold]wrote:[/bold] {out} ({spoken.seconds:.1f} s, voice {spoken.voice}, "
                  f"first audio after {1000 * (spoken.first_audio_s or 0):.0f} ms)\n[bold]Whisper tiny.en hears:[/bold] {heard}")  # fmt: skip
    return heard


if __name__ == "__main__":
    sys.exit(main())
