"""Manifests -> training examples -> length-bucketed, rank-sharded batches.

A manifest (``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` in one folder) holds one
JSON object per line::

    {"audio": "clips/0001.wav", "duration": 3.2, "task": "asr", "instruction": "...",
     "answer": "...", "metadata": {...}, "turns": [{"instruction": "...", "answer": "..."}]}

``audio`` is relative to the manifest's folder; ``turns`` (optional) are follow-up
questions about the same clip. Labels are the answer tokens plus the stop token of every
trained assistant turn; prompt, audio, system and tool positions are ``-100``.

A row may also carry a ``system`` turn and write its dialogue as role turns (tool-call items,
``datagen/task_calls.py``)::

    {"system": "You can call these tools. ...", "instruction": "Trim clip-1 ...", "answer": "<tool_call>...",
     "turns": [{"role": "user", "content": "Trim clip-1 ..."}, {"role": "assistant", "content": "<tool_call>..."},
               {"role": "tool", "content": "{\"name\": \"trim\", ...}"}, {"role": "assistant", "content": "Done ..."}],
     "metadata": {"tools": [{"name": ..., "description": ..., "parameters": {...}}], ...}}

The clip goes with the first user turn; when tools are offered (``metadata["tools"]``) it is
labelled ``clip-1``, as the assistant labels clips when it offers tools.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omnivox.agent.processor import OmnivoxProcessor
from omnivox.errors import UserInputError
from omnivox.prompts import Message
from omnivox.prompts.styles import PromptStyle
from omnivox.prompts.tools import clip_label

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ManifestItem:
    """One line of a manifest.

    Attributes:
        audio: the path as written in the manifest (relative to its folder); names the clip.
        path: the audio file on disk.
        turns: (instruction, answer) pairs; the first is the item's own.
        system: the system turn ("" for none).
        dialogue: (role, text) of every turn when the row writes role turns (user, assistant,
            tool), else empty and ``turns`` is the conversation.
    """

    audio: str
    path: Path
    duration: float
    task: str
    turns: tuple[tuple[str, str], ...]
    metadata: dict = field(default_factory=dict, compare=False)
    system: str = ""
    dialogue: tuple[tuple[str, str], ...] = ()

    @property
    def offers_tools(self) -> bool:
        return bool(self.metadata.get("tools"))

    def messages(self, multi_turn: bool) -> list[Message]:
        """The conversation: the system turn if any, the clip in the first user turn, then the rest.
        Without ``multi_turn`` it ends at the first assistant turn."""
        labels = (clip_label(0),) if self.offers_tools else ()
        out = [Message("system", self.system)] if self.system else []
        if self.dialogue:
            end = next(k for k, (role, _) in enumerate(self.dialogue) if role == "assistant")
            turns = self.dialogue if multi_turn else self.dialogue[: end + 1]
            for k, (role, text) in enumerate(turns):
                out.append(Message("user", text, num_audio=1, audio_labels=labels) if k == 0 else Message(role, text))
            return out
        turns_ = self.turns if multi_turn else self.turns[:1]
        for i, (instruction, answer) in enumerate(turns_):
            first = i == 0
            out += [Message("user", instruction, num_audio=int(first), audio_labels=labels if first else ()),
                    Message("assistant", answer)]
        return out


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """``("file:line", object)`` for each non-empty line of a JSON-lines file.

    Raises:
        UserInputError: the file is missing, or a line is not a JSON object (file and line named).
    """
    if not path.is_file():
        raise UserInputError(f"manifest not found: {path}")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise UserInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def read_manifest(path: Path) -> list[ManifestItem]:
    """Parse a JSON-lines manifest; errors name the file and line."""
    items = []
    for where, row in iter_jsonl(path):
        missing = [k for k in ("audio", "instruction", "answer") if not isinstance(row.get(k), str)]
        if missing:
            raise UserInputError(f"{where}: missing or non-string field(s) {missing}")
        turns = [(row["instruction"], row["answer"])]
        raw_turns = row.get("turns") or []
        dialogue = _dialogue(raw_turns, where) if raw_turns and isinstance(raw_turns[0], dict) and "role" in raw_turns[0] else ()
        for j, turn in enumerate(() if dialogue else raw_turns):
            if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("instruction", "answer")):
                raise UserInputError(f"{where}: turns[{j}] needs string 'instruction' and 'answer'")
            turns.append((turn["instruction"], turn["answer"]))
        system = row.get("system") or ""
        if not isinstance(system, str):
            raise UserInputError(f"{where}: 'system' should be a string, got {type(system).__name__}")
        audio_path = (path.parent / row["audio"]).resolve()
        items.append(
            ManifestItem(
                audio=row["audio"],
                path=audio_path,
                duration=float(row.get("duration") or 0.0),
                task=str(row.get("task", "")),
                turns=tuple(turns),
                metadata=row.get("metadata") or {},
                system=system,
                dialogue=dialogue,
            )
        )
    return items


def _dialogue(turns: list, where: str) -> tuple[tuple[str, str], ...]:
    """Role turns -> (role, text) pairs, checked: user first, roles in a valid order, an assistant turn last."""
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant", "tool") or not isinstance(turn.get("content"), str):
            raise UserInputError(f"{where}: turns[{j}] needs 'role' (user, assistant or tool) and string 'content', got {turn!r}"[:300])
        out.append((turn["role"], turn["content"]))
    try:
        PromptStyle.check_order([Message(role, text) for role, text in out])
    except UserInputError as err:
        raise UserInputError(f"{where}: {err}") from None
    if out[-1][0] != "assistant":
        raise UserInputError(f"{where}: the last turn should be an assistant turn, got {out[-1][0]!r}")
    return tuple(out)


def load_split(
    folder: Path,
    split: str,
    tasks: Sequence[str] = (),
    max_items: int = 0,
    where: Callable[[ManifestItem], bool] | None = None,
) -> list[ManifestItem]:
    """Items of ``<folder>/<split>.jsonl``, filtered by task and ``where``, at most ``max_items`` (0: all)."""
    items = read_manifest(Path(folder) / f"{split}.jsonl")
    if where is not None:
        items = [i for i in items if where(i)]
    if tasks:
        known = {i.task for i in items}
        unknown = sorted(set(tasks) - known)
        if unknown:
            log.warning("%s/%s.jsonl has no items of task(s) %s (tasks present: %s)", folder, split, unknown, sorted(known))
        items = [i for i in items if i.task in set(tasks)]
    if max_items:
        items = items[:max_items]
    return items


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One tokenized training conversation.

    Attributes:
        input_ids: [T] ids; audio positions hold the placeholder id.
        audio_mask: [T] True where an audio vector goes.
        labels: [T] target ids at answer positions (answer tokens + stop token), else -100.
    """

    input_ids: torch.Tensor
    audio_mask: torch.Tensor
    labels: torch.Tensor


def build_example(processor: OmnivoxProcessor, messages: list[Message], audio_tokens: int) -> Example:
    """Tokenize a conversation ending with an assistant turn and label every assistant answer.

    The whole conversation is tokenized as the prompt style renders it; each answer starts
    where the style's generation prompt for that turn ends (checked to be a prefix of the
    whole) and runs through the first stop token after it, so training sees exactly what
    inference feeds and must produce.
    """
    if not messages or messages[-1].role != "assistant":
        raise UserInputError("a training conversation must end with an assistant turn")
    counts = [audio_tokens] * sum(1 for m in messages if m.num_audio)
    whole = _tokenize(processor, messages, counts, add_generation_prompt=False)
    ids = whole.input_ids
    labels = torch.full_like(ids, IGNORE_INDEX)
    stops = set(processor.stop_ids)
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prefix = _tokenize(processor, messages[:k], counts[: sum(1 for m in messages[:k] if m.num_audio)], True).input_ids
        start = prefix.numel()
        if start > ids.numel() or not torch.equal(ids[:start], prefix):
            raise UserInputError(
                f"prompt style {processor.style.name!r}: the generation prompt of turn {k} is not a prefix of the "
                "tokenized conversation, so answers cannot be located; check the style's rendering"
            )
        end = next((i for i in range(start, ids.numel()) if int(ids[i]) in stops), None)
        if end is None:
            raise UserInputError(f"prompt style {processor.style.name!r}: no stop token after assistant turn {k}")
        labels[start : end + 1] = ids[start : end + 1]
    return Example(ids, whole.audio_mask, labels)


def _tokenize(processor: OmnivoxProcessor, messages: list[Message], counts: list[int], add_generation_prompt: bool):
    """Like ``OmnivoxProcessor.tokenize`` (text pieces without special tokens, audio slots expanded),
    but with or without the trailing generation prompt."""
    return _tokenize_segments(processor, processor.style.render(messages, add_generation_prompt=add_generation_prompt), counts)


def _tokenize_segments(processor: OmnivoxProcessor, segments, counts: list[int]):
    from omnivox.agent.processor import TokenizedPrompt
    from omnivox.prompts import Special

    ids: list[int] = []
    mask: list[bool] = []
    clip = 0
    for segment in segments:
        if segment is Special.AUDIO:
            ids += [processor.audio_id] * counts[clip]
            mask += [True] * counts[clip]
            clip += 1
        elif isinstance(segment, Special):
            ids.append(processor._special_id(segment))
            mask.append(False)
        elif segment:
            piece = processor.tokenizer(segment, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [False] * len(piece)
    if clip != len(counts):
        raise UserInputError(f"audio clips and audio placeholders do not match: placeholders {clip}, clips {len(counts)}")
    return TokenizedPrompt(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


# ----------------------------------------------------------------------------- batching
def estimate_length(item: ManifestItem, tokens_per_second: float, multi_turn: bool) -> int:
    """A rough sequence length (audio tokens + ~4 characters per text token) for bucketing."""
    text = sum(len(m.text) for m in item.messages(multi_turn))
    return int(item.duration * tokens_per_second) + text // 4


class BatchPlan:
    """Deterministic micro-batches per epoch, bucketed by length and split over ranks.

    Epoch ``e``'s order depends only on ``(seed, e)``: the items are shuffled, sorted by
    length within chunks of ``bucket`` batches (so a batch holds similar lengths and little
    padding), cut into batches, and the batches shuffled. Rank ``r`` of ``world_size``
    takes every ``world_size``-th batch, all ranks the same number (this plays the role of a
    ``DistributedSampler``). A run's data position is ``(epoch, index)``, enough to resume
    exactly.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1, bucket: int = 16
    ) -> None:
        if len(lengths) < batch_size * world_size:
            raise UserInputError(
                f"{len(lengths)} training items are fewer than one batch per rank "
                f"(batch_size {batch_size} x {world_size} ranks)"
            )
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.bucket = bucket

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of item indices) for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.bucket
        batches: list[list[int]] = []
        for first in range(0, len(order), chunk):
            part = order[first : first + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i : i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size]  # equal batches on every rank
        batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) // self.world_size * self.world_size
        return batches[self.rank : usable : self.world_size]
