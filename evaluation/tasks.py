"""The task table: manifest task name -> suite, metric and scorer. One table, nothing else dispatches on task names.

A scorer takes ``(prediction, reference, metadata, labels)`` and returns a :class:`Score`:
``correct`` (None for WER-scored tasks) and ``details`` (what was compared, kept in results.json).
``labels`` is the label set of the task in this run (used by classification).

How each task is scored (see :mod:`omnivox.evaluation.metrics` for the normalisers). Task scorers
compare the *content* of the answer (:func:`content`: for JSON-format items the values under the
reference's keys); format compliance is scored separately by :data:`FORMATS`.

==================== ========= =========================================================================
task                 metric    correct when
==================== ========= =========================================================================
transcription        WER, CER  (corpus WER after Whisper's English normaliser)
classification       accuracy  the label mentioned first in the answer is the reference label
captioning           accuracy  the answer names every sound of ``metadata["sounds"]``: its label, or half of
                               the content words of its ``metadata["segments"]`` caption (whole words,
                               plurals folded); without labels, half of the reference's content words.
                               A keyword match: caption fluency and detail are not measured.
counting             accuracy  the first number (digits or words) equals the reference number
presence             accuracy  the yes/no of the answer equals the reference's
order, event_list    accuracy  the reference's items ("beeps, then siren") occur in that order
speaker, loudness,   accuracy  the reference phrase occurs in the answer (or, with ``metadata["options"]``,
spoken_qa                      the option named first is the reference)
duration             accuracy  first numbers within max(0.5 s, 20 %); non-numeric: as spoken_qa
multi_turn           per turn  opening turn as ``opener`` (transcription: WER); follow-ups "auto":
                               yes/no, number or phrase, by the reference's form
task_calls           per step  the same tools as the reference (or rightly no call); also arguments exact
                               and schema-valid calls (:mod:`omnivox.evaluation.tool_calls`)
==================== ========= =========================================================================

Formats (``metadata["format"]``), each scored for compliance and correctness:
``word`` (the bare answer: as many words as the reference), ``json`` (an object with the
reference's keys and values), ``list`` (a comma/line list of the reference's items, any order).

Manifest names are matched after lower-casing and turning spaces and hyphens into underscores,
and through :data:`TASK_ALIASES` ("speaker attributes" -> speaker, "content qa" -> spoken_qa).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from omnivox.errors import UserInputError
from omnivox.evaluation import metrics as M

Metric = Literal["wer", "accuracy"]


@dataclass(frozen=True)
class Score:
    """The score of one answer: ``correct`` (None where the metric is an error rate) and what was compared."""

    correct: bool | None
    details: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[[str, str, Mapping[str, Any], Sequence[str]], Score]


# ------------------------------------------------------------------------------- scorers


def score_transcription(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """Word and character edit counts after Whisper's English normaliser."""
    words = M.word_edits(reference, prediction)
    chars = M.char_edits(reference, prediction)
    return Score(
        None,
        {
            "normalized_reference": M.normalize_transcript(reference),
            "normalized_prediction": M.normalize_transcript(prediction),
            "word_errors": words.errors, "ref_words": words.ref_len,
            "substitutions": words.substitutions, "deletions": words.deletions, "insertions": words.insertions,
            "wer": words.rate, "char_errors": chars.errors, "ref_chars": chars.ref_len, "cer": chars.rate,
        },
    )  # fmt: skip


def score_classification(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """The label named first in the answer (among the task's labels) must be the reference label."""
    candidates = list(dict.fromkeys([*labels, reference]))
    chosen = M.choose_label(prediction, candidates)
    correct = chosen is not None and M.normalize_answer(chosen) == M.normalize_answer(reference)
    return Score(correct, {"reference_label": reference, "predicted_label": chosen if chosen is not None else M.OTHER_LABEL})


_STOPWORDS = frozenset(
    "a an the of and or with in on at to from is are was were be there this that it its some someone something "
    "sound sounds audio clip recording heard hear can you which while then".split()
)


def _content_words(text: str) -> list[str]:
    return [t for t in M.answer_tokens(text) if t not in _STOPWORDS]


def caption_targets(reference: str, metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The sounds a caption must name, as (label, description) pairs: ``metadata["sounds"]`` (or
    "labels"/"label"), each described by its ``metadata["segments"]`` caption when there is one
    ("falling sweep" -> "a tone sweeping downward in pitch"). Empty without labels."""
    labels = metadata.get("sounds") or metadata.get("labels") or metadata.get("label") or []
    if isinstance(labels, str):
        labels = [labels]
    described = {str(seg.get("label")): str(seg.get("caption", "")) for seg in metadata.get("segments") or [] if isinstance(seg, Mapping)}
    return [(str(label), described.get(str(label), "")) for label in labels]


def _names(prediction: str, label: str, description: str) -> bool:
    """The answer names a sound: its label occurs, or half of its description's content words do."""
    if M.phrase_position(label, prediction) is not None:
        return True
    words = _content_words(description)
    return bool(words) and sum(M.phrase_position(w, prediction) is not None for w in words) >= len(words) / 2


def score_captioning(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """Every labelled sound is named (:func:`_names`); without labels, half of the reference's content words
    occur. A keyword match: fluency and detail of the caption are not measured."""
    targets = caption_targets(reference, metadata)
    if targets:
        named = [label for label, description in targets if _names(prediction, label, description)]
        return Score(len(named) == len(targets), {"sounds": [t[0] for t in targets], "named": named, "recall": len(named) / len(targets)})
    words = _content_words(reference)
    found = [w for w in words if M.phrase_position(w, prediction) is not None]
    recall = len(found) / len(words) if words else 0.0
    return Score(bool(words) and recall >= 0.5, {"keywords": words, "found": found, "recall": recall})


def score_number(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """The first numbers must be equal (counting)."""
    got, want = M.extract_number(prediction), M.extract_number(reference)
    if want is None:
        raise UserInputError(f"reference {reference!r} has no number to compare with")
    return Score(got is not None and got == want, {"predicted_number": got, "reference_number": want})


DURATION_ABS_TOLERANCE_S = 0.5
DURATION_REL_TOLERANCE = 0.2


def score_duration(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """Numbers within max(0.5 s, 20 % of the reference); a non-numeric reference ("the first") as a phrase."""
    want = M.extract_number(reference)
    if want is None:
        return score_phrase(prediction, reference, metadata, labels)
    got = M.extract_number(prediction)
    tolerance = max(DURATION_ABS_TOLERANCE_S, DURATION_REL_TOLERANCE * abs(want))
    return Score(got is not None and abs(got - want) <= tolerance, {"predicted_number": got, "reference_number": want, "tolerance": tolerance})


def score_yes_no(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """yes/no of the answer (first yes-like or no-like word) equals the reference's."""
    got, want = M.extract_yes_no(prediction), M.extract_yes_no(reference)
    if want is None:
        raise UserInputError(f"reference {reference!r} is neither yes nor no")
    return Score(got == want, {"predicted": got, "reference": want})


def score_phrase(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """With ``metadata["options"]`` (or "choices"): the option named first must be the reference. Otherwise
    the normalised reference must occur in the normalised answer as whole words."""
    options = metadata.get("options") or metadata.get("choices")
    if options:
        chosen = M.choose_label(prediction, [str(o) for o in options] + [reference])
        correct = chosen is not None and M.normalize_answer(chosen) == M.normalize_answer(reference)
        return Score(correct, {"chosen_option": chosen})
    return Score(
        M.phrase_position(reference, prediction) is not None,
        {"normalized_reference": M.normalize_answer(reference), "normalized_prediction": M.normalize_answer(prediction)},
    )


def score_order(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """A sequence reference ("beeps, then a siren") must occur in that order; a single item as a phrase."""
    items = M.split_sequence(reference)
    if len(items) < 2:
        return score_phrase(prediction, reference, metadata, labels)
    return Score(M.sequence_in_order(prediction, items), {"items": items})


def score_auto(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """By the reference's form: yes/no if it starts with yes/no, a number if it is one, else a phrase."""
    words = M.answer_tokens(reference)
    if words and M.extract_yes_no(words[0]) is not None:
        return score_yes_no(prediction, reference, metadata, labels)
    if 0 < len(words) <= 3 and M.extract_number(reference) is not None and words[0][0].isdigit():
        return score_number(prediction, reference, metadata, labels)
    return score_phrase(prediction, reference, metadata, labels)


def score_task_call(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """One step of a tool-call episode: right tool (``correct``), arguments, schema validity
    (:func:`omnivox.evaluation.tool_calls.score_step`)."""
    from omnivox.evaluation.tool_calls import score_step

    return Score(*score_step(prediction, reference, metadata))


# ----------------------------------------------------------------------- format checks
# Format scorers see the raw answer; every other scorer sees its content (see ``content``).


def _format_score(check: M.FormatCheck) -> Score:
    return Score(check.correct, {"compliant": check.compliant, "format_detail": check.detail})


def score_word_format(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """The bare answer ("Answer with one word / the label only"): as many words as the reference
    (exactly one for a one-word reference), equal to it after normalisation."""
    return _format_score(M.check_bare_answer(prediction, reference))


def score_json_format(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """Expected values from the reference (JSON object text) or ``metadata["expected"]``; extra required
    keys from ``metadata["keys"]``."""
    expected = metadata.get("expected")
    if expected is None:
        try:
            expected = M.parse_json_answer(reference)
        except ValueError:
            expected = None
    if expected is not None and not isinstance(expected, Mapping):
        raise UserInputError(f"JSON format: the expected answer should be an object, got {json.dumps(expected)}")
    keys = metadata.get("keys") or ()
    if expected is None and not keys:
        raise UserInputError(f"JSON format: reference {reference!r} is not a JSON object and metadata has no 'keys'")
    return _format_score(M.check_json(prediction, expected, keys))


def score_list_format(prediction: str, reference: str, metadata: Mapping[str, Any], labels: Sequence[str]) -> Score:
    """Expected items from ``metadata["items"]`` or the reference list; any order unless ``metadata["ordered"]``."""
    items = metadata.get("items") or M.parse_list(reference)
    if not items:
        raise UserInputError(f"list format: cannot read the expected items from {reference!r}")
    return _format_score(M.check_list(prediction, [str(i) for i in items], ordered=bool(metadata.get("ordered"))))


def _flatten(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_flatten(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(_flatten(v) for v in value.values())
    return str(value)


def content(prediction: str, reference: str, metadata: Mapping[str, Any]) -> tuple[str, str]:
    """What a task scorer compares, with the format taken off.

    For ``metadata["format"] == "json"`` the reference's values (in key order; lists joined with
    ", ", true/false as yes/no) are compared with the prediction's values under the same keys
    when the prediction parses as a JSON object, else with the raw prediction: a right answer in
    the wrong format counts as right here and as non-compliant in the format suite.
    """
    if metadata.get("format") != "json":
        return prediction, reference
    try:
        ref = M.parse_json_answer(reference)
    except ValueError:
        return prediction, reference
    if not isinstance(ref, Mapping):
        return prediction, _flatten(ref)
    try:
        got = M.parse_json_answer(prediction)
    except ValueError:
        got = None
    pred = ", ".join(_flatten(got.get(k, "")) for k in ref) if isinstance(got, Mapping) else prediction
    return pred, ", ".join(_flatten(v) for v in ref.values())


# -------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class TaskSpec:
    """How one task is evaluated: its suite, headline metric and scorer. ``opener``: for a
    dialogue task, the task whose scorer judges the opening turn (its later turns use ``scorer``)."""

    suite: str
    metric: Metric
    scorer: Scorer
    opener: str | None = None


# Task names as datagen writes them (omnivox.datagen.tasks.TASKS).
TASKS: dict[str, TaskSpec] = {
    "transcription": TaskSpec("asr", "wer", score_transcription),
    "classification": TaskSpec("sound", "accuracy", score_classification),
    "captioning": TaskSpec("sound", "accuracy", score_captioning),
    "counting": TaskSpec("qa", "accuracy", score_number),
    "order": TaskSpec("qa", "accuracy", score_order),
    "event_list": TaskSpec("qa", "accuracy", score_order),
    "presence": TaskSpec("qa", "accuracy", score_yes_no),
    "speaker": TaskSpec("qa", "accuracy", score_phrase),
    "loudness": TaskSpec("qa", "accuracy", score_phrase),
    "duration": TaskSpec("qa", "accuracy", score_duration),
    "spoken_qa": TaskSpec("qa", "accuracy", score_phrase),
    "multi_turn": TaskSpec("multiturn", "accuracy", score_auto, opener="transcription"),
    "task_calls": TaskSpec("task-calls", "accuracy", score_task_call),
}


@dataclass(frozen=True)
class FormatSpec:
    """A required answer format (``metadata["format"]``): the results row it counts in and its checker."""

    group: str
    scorer: Scorer


# metadata["format"] -> check. "text" (free text) has no format check.
FORMATS: dict[str, FormatSpec] = {
    "word": FormatSpec("format_word", score_word_format),
    "json": FormatSpec("format_json", score_json_format),
    "list": FormatSpec("format_list", score_list_format),
}

# Other spellings a manifest may use (after lower-casing, spaces/hyphens -> underscores).
TASK_ALIASES: dict[str, str] = {
    "asr": "transcription", "transcribe": "transcription",
    "classify": "classification", "sound_classification": "classification",
    "caption": "captioning", "audio_captioning": "captioning",
    "count": "counting", "ordering": "order", "temporal_order": "order", "events": "event_list",
    "speaker_attributes": "speaker", "speaker_attribute": "speaker", "attributes": "speaker",
    "content_qa": "spoken_qa", "qa": "spoken_qa", "content_question": "spoken_qa",
    "multiturn": "multi_turn", "dialogue": "multi_turn",
    "tool_calls": "task_calls", "tool_call": "task_calls", "task_call": "task_calls",
}  # fmt: skip

# Suites: each runs the tasks whose TaskSpec names it; "format" takes every item with a format in
# FORMATS, "multiturn" every item with follow-up turns (not tool-call episodes); "fixtures" runs the
# real speech clips.
MANIFEST_SUITES = ("asr", "sound", "qa", "format", "multiturn", "task-calls")
SUITES: dict[str, str] = {
    "asr": "transcription: corpus WER and CER after Whisper's English normaliser",
    "sound": "sound classification (accuracy, confusion matrix) and captioning (label keyword match)",
    "qa": "counting, order, event list, presence, speaker, loudness, duration, spoken QA: accuracy",
    "format": "answers asked as a bare word / JSON / list: format compliance and correctness",
    "multiturn": "follow-up questions answered in context: accuracy per turn (opening transcription: WER)",
    "task-calls": "tools offered, each step of an episode teacher-forced: right tool or rightly none, arguments "
                  "exact, schema-valid calls; per family and for held-out tools",
    "fixtures": "the real speech clips of ../shared/fixtures/speech, 'Transcribe the speech.': WER",
    "codec": "the model's speech codec (or --codec DIR) resynthesising held-out voices (--data) and the real "
             "fixtures: Whisper WER before/after, STOI, PESQ-wb, speed (not part of 'all': no LLM involved)",
    "speech-out": "the model speaking the held-out sentences of an `omnivox data tts` folder (--data): Whisper WER "
                  "beside the source voice's, speaker similarity, first audio, RTF (not part of 'all')",
    "all": "every suite above but codec and speech-out",
}

assert all(spec.suite in MANIFEST_SUITES and spec.suite != "format" for spec in TASKS.values())
assert all(target in TASKS for target in TASK_ALIASES.values())
assert all(spec.opener in TASKS for spec in TASKS.values() if spec.opener)


def format_of(metadata: Mapping[str, Any]) -> str | None:
    """The item's checked format (a :data:`FORMATS` key), or None (free text or unspecified)."""
    kind = re.sub(r"[\s-]+", "_", str(metadata.get("format", "")).strip().lower())
    kind = {"one_word": "word", "bare": "word"}.get(kind, kind)
    return kind if kind in FORMATS else None


def canonical_task(name: str) -> str | None:
    """The :data:`TASKS` key for a manifest task name, or None if unknown."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    key = TASK_ALIASES.get(key, key)
    return key if key in TASKS else None


def suite_parts(suite: str) -> tuple[str, ...]:
    """The suites that ``suite`` runs (``all`` -> every suite)."""
    if suite not in SUITES:
        raise UserInputError(f"unknown suite {suite!r}; known: {list(SUITES)}")
    return (*MANIFEST_SUITES, "fixtures") if suite == "all" else (suite,)
