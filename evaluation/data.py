"""Evaluation items: manifest lines (JSON lines from ``datagen``) and the real speech fixtures.

A manifest folder holds ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``; each line::

    {"audio": "clips/000123.wav",        # relative to the manifest folder (or absolute)
     "duration": 3.2, "task": "counting",
     "instruction": "How many beeps are there?", "answer": "three",
     "metadata": {...},                   # optional; e.g. "label", "options", "keys", "items"
     "turns": [{"instruction": "...", "answer": "..."}],   # optional: follow-ups, or the whole
                                          # dialogue (first turn = instruction/answer, as datagen writes)
     "id": "..."}                         # optional; default "<split>-<line number>"

Tool-call items (task ``task_calls``) write the whole episode as role turns,
``[{"role": "user" | "assistant" | "tool", "content": "..."}, ...]``, with the offered tools in
``metadata["tools"]`` and the tool list rendered in ``system``; each assistant turn is one scored step.

Every line is checked where it is read; an error names the file, the line and the field.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnivox.errors import UserInputError
from omnivox.prompts import Message
from omnivox.prompts.styles import PromptStyle

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FIXTURES_PROMPT = "Transcribe the speech."
FIXTURES_TASK = "transcription"


@dataclass(frozen=True)
class Turn:
    """One question of a conversation and its reference answer."""

    instruction: str
    answer: str
    task: str | None = None  # a follow-up may name its own task (scorer); None: scored generically


@dataclass(frozen=True)
class EvalItem:
    """One clip with its questions.

    Attributes:
        id: unique within the run.
        audio: path of the clip.
        task: canonical task name (a key of ``omnivox.evaluation.tasks.TASKS``).
        turns: the first question (the manifest's instruction/answer) then the follow-ups.
        metadata: the manifest's metadata dict.
        source: "manifest" or "fixtures".
        duration: seconds, as the manifest says (0 when unknown).
        dialogue: (role, text) of every turn of a role-turn item (tool calls); then ``turns`` holds
            one Turn per assistant turn (what came before it since the last one, the reference).
    """

    id: str
    audio: Path
    task: str
    turns: tuple[Turn, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = "manifest"
    duration: float = 0.0
    dialogue: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        assert self.turns, f"item {self.id} has no turns"

    @property
    def is_multi_turn(self) -> bool:
        return len(self.turns) > 1


def _field(line: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in line:
        raise UserInputError(f"{where}: missing field {key!r} (fields: {sorted(line)})")
    value = line[key]
    if not isinstance(value, kind):
        raise UserInputError(f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _answer(line: Mapping[str, Any], where: str) -> str:
    """The ``answer`` field as text; a JSON value (for JSON format tasks) is kept as its JSON text."""
    if "answer" not in line:
        raise UserInputError(f"{where}: missing field 'answer' (fields: {sorted(line)})")
    value = line["answer"]
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, int, float, bool)):
        return json.dumps(value)
    raise UserInputError(f"{where}: field 'answer' should be text, got {value!r}")


def parse_line(line: Mapping[str, Any], where: str, folder: Path, default_id: str, canonical_task: str) -> EvalItem:
    """One manifest line -> :class:`EvalItem` (``canonical_task`` already resolved by the caller)."""
    audio = Path(_field(line, "audio", where))
    audio = audio if audio.is_absolute() else folder / audio
    turns = [Turn(_field(line, "instruction", where), _answer(line, where))]
    follow = line.get("turns") or []
    if not isinstance(follow, list):
        raise UserInputError(f"{where}: field 'turns' should be a list, got {follow!r}")
    dialogue: tuple[tuple[str, str], ...] = ()
    if follow and isinstance(follow[0], Mapping) and "role" in follow[0]:
        dialogue = _dialogue(follow, where)
        turns, follow = _steps(dialogue), []
    if follow and isinstance(follow[0], Mapping) and (follow[0].get("instruction"), follow[0].get("answer")) == (
        line.get("instruction"),
        line.get("answer"),
    ):
        follow = follow[1:]  # datagen writes the whole dialogue: its first turn repeats instruction/answer
    for k, turn in enumerate(follow, start=1):
        at = f"{where} turns[{k}]"
        if not isinstance(turn, Mapping):
            raise UserInputError(f"{at}: should be an object with instruction and answer, got {turn!r}")
        turns.append(Turn(_field(turn, "instruction", at), _answer(turn, at), turn.get("task")))
    metadata = line.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise UserInputError(f"{where}: field 'metadata' should be an object, got {metadata!r}")
    duration = line.get("duration", 0.0)
    if not isinstance(duration, (int, float)):
        raise UserInputError(f"{where}: field 'duration' should be a number, got {duration!r}")
    return EvalItem(
        id=str(line.get("id", default_id)),
        audio=audio,
        task=canonical_task,
        turns=tuple(turns),
        metadata=dict(metadata),
        duration=float(duration),
        dialogue=dialogue,
    )


def _dialogue(turns: list, where: str) -> tuple[tuple[str, str], ...]:
    """Role turns -> (role, text), checked: a user turn first, tool turns after assistant or tool turns."""
    out: list[tuple[str, str]] = []
    for k, turn in enumerate(turns):
        at = f"{where} turns[{k}]"
        if not isinstance(turn, Mapping) or turn.get("role") not in ("user", "assistant", "tool"):
            raise UserInputError(f"{at}: should have role user, assistant or tool, got {turn!r}"[:300])
        out.append((turn["role"], _field(turn, "content", at)))
    try:  # the order every prompt style accepts
        PromptStyle.check_order([Message(role, text) for role, text in out])
    except UserInputError as err:
        raise UserInputError(f"{where}: {err}") from None
    if not any(role == "assistant" for role, _ in out):
        raise UserInputError(f"{where}: the dialogue has no assistant turn to score")
    return tuple(out)


def _steps(dialogue: tuple[tuple[str, str], ...]) -> list[Turn]:
    """One Turn per assistant turn: what came before it since the previous one, and the reference."""
    steps, before = [], []
    for role, text in dialogue:
        if role == "assistant":
            steps.append(Turn("\n".join(before), text))
            before = []
        else:
            before.append(text)
    return steps


def load_manifest(folder: Path, split: str, canonical_task) -> tuple[list[EvalItem], Counter[str]]:
    """Items of ``folder/<split>.jsonl`` whose task is known, and a count of the unknown task names.

    ``canonical_task(name) -> str | None`` maps a manifest task name to the task table's key.
    """
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.jsonl")) if folder.is_dir() else []
        raise UserInputError(f"{path}: manifest not found (the folder has {present or 'no .jsonl files'})")
    items: list[EvalItem] = []
    unknown: Counter[str] = Counter()
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                line = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserInputError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(line, dict):
                raise UserInputError(f"{where}: should be a JSON object, got {type(line).__name__}")
            task = _field(line, "task", where)
            canonical = canonical_task(task)
            if canonical is None:
                unknown[task] += 1
                continue
            item = parse_line(line, where, folder, f"{split}-{number:06d}", canonical)
            if item.id in seen:
                raise UserInputError(f"{where}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    return items, unknown


def default_fixtures_dir() -> Path:
    """``$OMNIVOX_FIXTURES/speech``, else ``<repo root>/../shared/fixtures/speech``."""
    env = os.environ.get("OMNIVOX_FIXTURES")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    return root / "speech"


def load_fixtures(folder: Path) -> list[EvalItem] | None:
    """Items for the real speech clips of ``folder/transcripts.json`` ({file: transcript}); None when absent."""
    transcripts = folder / "transcripts.json"
    if not transcripts.is_file():
        return None
    try:
        table = json.loads(transcripts.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserInputError(f"{transcripts}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise UserInputError(f"{transcripts}: should map file names to transcripts")
    return [
        EvalItem(id=f"fixtures/{name}", audio=folder / name, task=FIXTURES_TASK, turns=(Turn(FIXTURES_PROMPT, text),), source="fixtures")
        for name, text in sorted(table.items())
    ]
