"""Run a suite: pick the items, generate the model's answers in batches, score them, aggregate.

Generation is batched over items; a multi-turn item is one conversation whose earlier assistant
turns are the model's own answers (turn k of every item in a batch is generated together). Each
clip is encoded once per item. With greedy decoding (the default) and a fixed seed the answers are
deterministic.

Tool-call episodes (suite task-calls, :mod:`~omnivox.evaluation.tool_calls`) are generated step by
step with the item's tools offered, each step teacher-forced on the reference conversation before it.

Before generating, every scorer is run on (reference, reference): a reference the scorer cannot read
(no number for counting, no yes/no for presence, a JSON task without keys ...) fails the run at once,
naming the item; a reference that does not score as correct against itself is logged as a warning.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from omnivox.errors import UserInputError
from omnivox.evaluation import metrics as M
from omnivox.evaluation import tool_calls as TC
from omnivox.evaluation.data import EvalItem, default_fixtures_dir, load_fixtures, load_manifest
from omnivox.evaluation.tasks import (
    FORMATS,
    MANIFEST_SUITES,
    TASKS,
    Metric,
    Score,
    Scorer,
    canonical_task,
    content,
    format_of,
    score_auto,
    suite_parts,
)

log = logging.getLogger(__name__)

MULTITURN_GROUP = "multi_turn/turn {}"
FIXTURES_GROUP = "fixtures"


@dataclass(frozen=True)
class ItemRecord:
    """One scored answer. ``turn`` counts from 1; ``group`` is the row of the results table it counts in;
    ``aspect`` is "content" (the task's answer) or "format" (the asked format, in a format_* row)."""

    id: str
    task: str
    group: str
    aspect: Literal["content", "format"]
    metric: Metric
    turn: int
    prompt: str
    reference: str
    prediction: str
    correct: bool | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Planned:
    """A record to make once the answers exist."""

    item: int  # index into the item list
    turn: int  # 0-based
    task: str
    group: str
    metric: Metric
    scorer: Scorer
    raw: bool = False  # format checks see the raw answer; task scorers its content (tasks.content)

    def run(self, prediction: str, item: EvalItem, labels: dict[str, list[str]]) -> Score:
        reference = item.turns[self.turn].answer
        if not self.raw:
            prediction, reference = content(prediction, reference, item.metadata)
        return self.scorer(prediction, reference, item.metadata, labels.get(self.task, []))


@dataclass(frozen=True)
class Selection:
    """The items of a run and the records to score; ``notes`` are shown with the results."""

    suite: str
    split: str
    data: Path | None
    items: list[EvalItem]
    turns: list[int]  # per item: how many turns to generate
    planned: list[_Planned]
    notes: list[str]


def select(
    suite: str,
    data: Path | None,
    split: str = "test",
    limit: int | None = None,
    fixtures_dir: Path | None = None,
) -> Selection:
    """Items and planned records of ``suite``; ``limit`` keeps at most that many items per task."""
    parts = suite_parts(suite)
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {limit}")
    notes: list[str] = []
    items: list[EvalItem] = []
    if any(p in MANIFEST_SUITES for p in parts):
        if data is None:
            raise UserInputError(f"suite {suite!r} needs --data (a folder with {split}.jsonl)")
        loaded, unknown = load_manifest(data, split, canonical_task)
        if unknown:
            notes.append(f"skipped {sum(unknown.values())} lines with unknown tasks: {dict(sorted(unknown.items()))}")
        wanted = [
            it for it in loaded
            if TASKS[it.task].suite in parts
            or ("multiturn" in parts and it.is_multi_turn and not it.dialogue)
            or ("format" in parts and format_of(it.metadata) is not None and not it.dialogue)
        ]  # fmt: skip
        items += _limit(wanted, limit)
    if "fixtures" in parts:
        folder = fixtures_dir or default_fixtures_dir()
        fixtures = load_fixtures(folder)
        if fixtures is None:
            notes.append(f"fixtures suite skipped: no transcripts.json in {folder} (set OMNIVOX_FIXTURES or --fixtures)")
        else:
            items += _limit(fixtures, limit)

    planned: list[_Planned] = []
    turns: list[int] = []
    for i, item in enumerate(items):
        spec = TASKS[item.task]
        fmt = format_of(item.metadata)
        if item.dialogue:  # a tool-call episode: every assistant turn is a step, counted in each of its rows
            planned += [_Planned(i, k, item.task, group, spec.metric, spec.scorer)
                        for k, turn in enumerate(item.turns) for group in TC.groups(item.metadata, turn.answer)]  # fmt: skip
            turns.append(len(item.turns))
            continue
        if item.source == "fixtures":
            planned.append(_Planned(i, 0, item.task, FIXTURES_GROUP, spec.metric, spec.scorer))
        elif spec.suite in parts and spec.opener is None:
            planned.append(_Planned(i, 0, item.task, item.task, spec.metric, spec.scorer))
        if "format" in parts and fmt is not None and item.source != "fixtures":
            planned.append(_Planned(i, 0, item.task, FORMATS[fmt].group, "accuracy", FORMATS[fmt].scorer, raw=True))
        n = 1
        if "multiturn" in parts and (item.is_multi_turn or spec.opener is not None):
            n = len(item.turns)
            if spec.opener is not None:  # a dialogue task: its opening turn counts here too
                opener = TASKS[spec.opener]
                planned.append(_Planned(i, 0, spec.opener, MULTITURN_GROUP.format(1), opener.metric, opener.scorer))
            for k in range(1, n):  # follow-ups; another task's opening turn already counts in its own row
                task = canonical_task(item.turns[k].task) if item.turns[k].task else None
                # multi-turn rows are accuracies: a WER-scored or unnamed turn is judged by its reference's form
                scorer = TASKS[task].scorer if task is not None and TASKS[task].metric == "accuracy" else score_auto
                planned.append(_Planned(i, k, task or "multi_turn", MULTITURN_GROUP.format(k + 1), "accuracy", scorer))
        turns.append(n)
    if not items:
        notes.append(f"no items for suite {suite!r}")
    return Selection(suite, split, data, items, turns, planned, notes)


def _limit(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    if limit is None:
        return items
    seen: Counter[str] = Counter()
    kept = []
    for item in items:
        if seen[item.task] < limit:
            seen[item.task] += 1
            kept.append(item)
    return kept


def task_labels(items: Sequence[EvalItem]) -> dict[str, list[str]]:
    """Per task, the distinct first-turn references (the label set a classification answer is read against)."""
    labels: dict[str, list[str]] = defaultdict(list)
    for item in items:
        _, answer = content("", item.turns[0].answer, item.metadata)
        if answer not in labels[item.task]:
            labels[item.task].append(answer)
    return {task: sorted(values) for task, values in labels.items()}


def check_references(selection: Selection, labels: dict[str, list[str]]) -> None:
    """Score every reference against itself: unreadable ones raise, mismatching ones are logged."""
    bad: list[str] = []
    for plan in selection.planned:
        item = selection.items[plan.item]
        turn = item.turns[plan.turn]
        try:
            score = plan.run(turn.answer, item, labels)
        except UserInputError as err:
            raise UserInputError(f"item {item.id} (task {item.task}, turn {plan.turn + 1}): {err}") from None
        if score.correct is False:
            bad.append(f"{item.id}#{plan.turn + 1}")
    if bad:
        log.warning("%d references do not score as correct against themselves (check the data): %s", len(bad), bad[:10])


def validate(selection: Selection) -> dict[str, list[str]]:
    """Check the references and that every clip exists (before any model is loaded); the task label sets."""
    labels = task_labels(selection.items)
    check_references(selection, labels)
    missing = [str(it.audio) for it in selection.items if not it.audio.is_file()]
    if missing:
        raise UserInputError(f"{len(missing)} of {len(selection.items)} audio files not found, e.g. {missing[:3]}")
    return labels


def generate_answers(
    model,
    items: Sequence[EvalItem],
    turns: Sequence[int],
    settings,
    batch_size: int = 8,
    progress: bool = True,
    call_max_new_tokens: int | None = None,
) -> list[list[str]]:
    """The model's answers to the first ``turns[i]`` questions of each item; later questions see the
    earlier answers. ``model`` is an :class:`~omnivox.agent.assistant.Assistant` (or anything with its
    ``encode_clip`` and ``generate``, e.g. an :class:`~omnivox.agent.model.OmnivoxModel` alone)."""
    from tqdm.auto import tqdm

    from omnivox.agent.audio import load_audio
    from omnivox.prompts import Message

    if batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {batch_size}")
    answers: list[list[str]] = [[] for _ in items]
    bar = tqdm(total=sum(turns), desc="eval", unit="answer", disable=not progress)
    episodes = [i for i, item in enumerate(items) if item.dialogue]
    if episodes:
        tokens = call_max_new_tokens or max(settings.max_new_tokens, TC.MIN_NEW_TOKENS)
        _generate_steps(model, items, episodes, turns, settings.override(max_new_tokens=tokens), batch_size, answers, bar)
    plain = [i for i, item in enumerate(items) if not item.dialogue]
    for start in range(0, len(plain), batch_size):
        batch = plain[start : start + batch_size]
        clips = {i: model.encode_clip(load_audio(items[i].audio).samples) for i in batch}
        for k in range(max(turns[i] for i in batch)):
            active = [i for i in batch if turns[i] > k]
            conversations = []
            for i in active:
                messages = [Message("user", items[i].turns[0].instruction, num_audio=1)]
                for j in range(k):
                    messages += [Message("assistant", answers[i][j]), Message("user", items[i].turns[j + 1].instruction)]
                conversations.append(messages)
            out = model.generate(conversations, [[clips[i]] for i in active], settings)
            for i, answer in zip(active, out, strict=True):
                answers[i].append(answer.text)
            bar.update(len(active))
    bar.close()
    return answers


def _generate_steps(model, items: Sequence[EvalItem], episodes: Sequence[int], turns: Sequence[int], settings,
                    batch_size: int, answers: list[list[str]], bar) -> None:
    """The first ``turns[i]`` steps of each tool-call episode, teacher-forced, batched over steps (each
    conversation with its item's tools: ``tool_choice="auto"``). Answers are written as the reference
    writes them (calls as ``<tool_call>`` text)."""
    from omnivox.agent.audio import load_audio
    from omnivox.agent.constrained import AnswerFormat

    work = [(i, k) for i in episodes for k in range(turns[i])]
    clips: dict[int, Any] = {}
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        needed = sorted({i for i, _ in batch})
        clips = {i: clips[i] if i in clips else model.encode_clip(load_audio(items[i].audio).samples) for i in needed}
        conversations = [TC.step_conversations(items[i].dialogue)[k] for i, k in batch]
        formats = [AnswerFormat(tuple(TC.specs_of(items[i].metadata)), "auto") for i, _ in batch]
        out = model.generate(conversations, [[clips[i]] for i, _ in batch], settings, formats=formats)
        for (i, k), answer in zip(batch, out, strict=True):
            assert len(answers[i]) == k, "steps of an episode are generated in order"
            answers[i].append(TC.answer_text(answer))
        bar.update(len(batch))


def score(selection: Selection, answers: Sequence[Sequence[str]], labels: dict[str, list[str]]) -> list[ItemRecord]:
    """Records for the planned scores, in item order."""
    records = []
    for plan in selection.planned:
        item = selection.items[plan.item]
        turn = item.turns[plan.turn]
        prediction = answers[plan.item][plan.turn]
        result = plan.run(prediction, item, labels)
        records.append(
            ItemRecord(
                id=item.id, task=item.task, group=plan.group, aspect="format" if plan.raw else "content",
                metric=plan.metric, turn=plan.turn + 1,
                prompt=turn.instruction, reference=turn.answer, prediction=prediction, correct=result.correct,
                details=result.details,
            )
        )  # fmt: skip
    return records


# ------------------------------------------------------------------------- aggregation


def aggregate_group(records: Sequence[ItemRecord]) -> dict[str, Any]:
    """Metric, count, value and 95% interval of one group (all records share a metric)."""
    metric = records[0].metric
    assert all(r.metric == metric for r in records), "a group mixes metrics"
    n = len(records)
    if metric == "wer":
        errors = [r.details["word_errors"] for r in records]
        ref_words = [r.details["ref_words"] for r in records]
        char_errors = [r.details["char_errors"] for r in records]
        ref_chars = [r.details["ref_chars"] for r in records]
        if sum(ref_words) == 0:
            return {"metric": "wer", "n": n, "value": None, "ci95": None, "word_errors": sum(errors), "ref_words": 0}
        return {
            "metric": "wer", "n": n, "value": M.corpus_rate(errors, ref_words),
            "ci95": list(M.bootstrap_rate_interval(errors, ref_words)),
            "word_errors": sum(errors), "ref_words": sum(ref_words),
            "cer": {"value": M.corpus_rate(char_errors, ref_chars), "char_errors": sum(char_errors), "ref_chars": sum(ref_chars)},
        }  # fmt: skip
    correct = sum(bool(r.correct) for r in records)
    row: dict[str, Any] = {"metric": "accuracy", "n": n, "value": correct / n, "ci95": list(M.wilson_interval(correct, n)), "correct": correct}
    if any("compliant" in r.details for r in records):
        compliant = sum(bool(r.details.get("compliant")) for r in records)
        row["compliance"] = {"value": compliant / n, "ci95": list(M.wilson_interval(compliant, n)), "compliant": compliant}
    for key, name in (("arguments_correct", "arguments"), ("schema_valid", "schema_valid")):  # tool-call steps
        judged = [r.details[key] for r in records if r.details.get(key) is not None]
        if judged:
            good = sum(bool(v) for v in judged)
            row[name] = {"n": len(judged), "value": good / len(judged), "ci95": list(M.wilson_interval(good, len(judged))), "correct": good}
    return row


def aggregate(records: Sequence[ItemRecord]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(per group, overall). Overall: content accuracy over distinct answers (micro) and the mean of the
    content accuracy rows (macro); format compliance and format accuracy over all format records;
    corpus WER over distinct transcriptions. An answer counted in two content rows (the opening turn
    of a dialogue) counts once overall."""
    groups: dict[str, list[ItemRecord]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    order = {task: i for i, task in enumerate(TASKS)}  # table order, then multi-turn turns, then fixtures
    names = sorted(groups, key=lambda g: (order.get(g, len(order)), g == FIXTURES_GROUP, groups[g][0].turn, g))
    per_group = {name: aggregate_group(groups[name]) for name in names}
    content = list({(r.id, r.turn): r for r in records if r.aspect == "content"}.values())
    overall: dict[str, dict[str, Any]] = {}
    acc = [r for r in content if r.metric == "accuracy"]
    if acc:
        overall["accuracy"] = aggregate_group(acc)
        values = [per_group[g]["value"] for g in per_group if groups[g][0].aspect == "content" and per_group[g]["metric"] == "accuracy"]
        overall["accuracy_macro"] = {"metric": "accuracy", "n": len(values), "value": sum(values) / len(values)}
    fmt = [r for r in records if r.aspect == "format"]
    if fmt:
        row = aggregate_group(fmt)
        overall["format_compliance"] = {"metric": "accuracy", "n": row["n"], **row["compliance"]}
        overall["format_accuracy"] = {k: v for k, v in row.items() if k != "compliance"}
    wer = [r for r in content if r.metric == "wer"]
    if wer and sum(r.details["ref_words"] for r in wer):
        overall["wer"] = aggregate_group(wer)
    return per_group, overall


def confusion(records: Sequence[ItemRecord], task: str = "classification") -> dict[str, Any] | None:
    """Labels and counts [L, L] (row = reference, column = predicted) of ``task``'s records, or None."""
    rows = [r for r in records if r.group == task]
    if not rows:
        return None
    refs = [r.details["reference_label"] for r in rows]
    preds = [r.details["predicted_label"] for r in rows]
    labels = sorted(set(refs))
    if any(p not in labels for p in preds):
        labels.append(M.OTHER_LABEL)
    return {"labels": labels, "matrix": M.confusion_matrix(refs, preds, labels)}


# ----------------------------------------------------------------------------- the run


@dataclass
class EvalResults:
    """Everything written to results.json."""

    suite: str
    split: str
    model: str
    data: str | None
    settings: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    overall: dict[str, dict[str, Any]]
    confusion: dict[str, dict[str, Any]]
    notes: list[str]
    items: list[ItemRecord]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["items"] = [asdict(r) for r in self.items]
        return out


def evaluate(
    model,
    suite: str,
    data: Path | None = None,
    *,
    split: str = "test",
    limit: int | None = None,
    fixtures_dir: Path | None = None,
    **kwargs: Any,
) -> EvalResults:
    """Evaluate ``model`` (an ``OmnivoxModel``) on ``suite``: :func:`select` then :func:`run_selection`."""
    return run_selection(model, select(suite, data, split, limit, fixtures_dir), **kwargs)


def run_selection(
    model,
    selection: Selection,
    *,
    batch_size: int = 8,
    settings=None,
    model_name: str = "",
    seed: int = 0,
    progress: bool = True,
    call_max_new_tokens: int | None = None,
) -> EvalResults:
    """Generate, score and aggregate with ``model`` (an :class:`~omnivox.agent.assistant.Assistant`);
    unless ``settings`` says otherwise, the model's own decoding (joint CTC transcripts included)
    made greedy, with 64 new tokens, as ``omnivox eval`` does. Tool-call steps may write long calls:
    they get ``call_max_new_tokens`` (default: the settings' but at least 160)."""
    settings = settings or model.settings(max_new_tokens=64, num_beams=1, do_sample=False)
    labels = validate(selection)
    torch.manual_seed(seed)
    answers = generate_answers(model, selection.items, selection.turns, settings, batch_size, progress, call_max_new_tokens)
    records = score(selection, answers, labels)
    per_group, overall = aggregate(records)
    conf = confusion(records)
    used = asdict(settings)
    transcriber = model.model.config.transcriber if model.has_transcriber and settings.use_transcriber else None
    used["transcriber"] = None if transcriber is None else asdict(transcriber)
    return EvalResults(
        suite=selection.suite,
        split=selection.split,
        model=model_name,
        data=str(selection.data) if selection.data is not None else None,
        settings=used,
        metrics=per_group,
        overall=overall,
        confusion={"classification": conf} if conf else {},
        notes=selection.notes,
        items=records,
    )
