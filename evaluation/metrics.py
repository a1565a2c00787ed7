"""Metric functions: WER/CER, answer normalisers, format checks, confidence intervals, confusion.

Everything here is a pure function of strings and numbers, so each one is unit-tested on
hand-computed cases. The task table (:mod:`omnivox.evaluation.tasks`) decides which of them
scores which task.

Normalisation in one place:

- **WER/CER**: openai-whisper's ``EnglishTextNormalizer`` on reference and prediction
  ("Mr." -> "mister", "twenty" -> "20", British -> American spelling, punctuation removed),
  then ``jiwer`` word / character edit counts. Corpus WER = total edits / total reference words.
- **Answers** (:func:`normalize_answer`): lower case, number words -> digits ("three" -> "3",
  "twenty one" -> "21"), punctuation and the articles a/an/the removed, gender words folded
  ("woman" -> "female"), whitespace collapsed.
- **yes/no** (:func:`extract_yes_no`): the first yes-like or no-like word decides
  ("yes, someone is speaking" -> yes; "no one is speaking" -> no; "it isn't" -> no).
- **numbers** (:func:`extract_number`): the first number written as digits or words;
  "no"/"none" mean 0 when there is no other number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- WER / CER


@lru_cache(maxsize=1)
def _whisper_normalizer():
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_transcript(text: str) -> str:
    """openai-whisper's English normaliser ("Mr. Smith paid twenty dollars." -> "mister smith paid $20")."""
    return _whisper_normalizer()(text)


@dataclass(frozen=True)
class EditCounts:
    """Word (or character) edit counts of one hypothesis against one reference.

    ``errors`` = substitutions + deletions + insertions; ``ref_len`` = reference words (or chars).
    """

    substitutions: int
    deletions: int
    insertions: int
    ref_len: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float | None:
        """errors / ref_len; None for an empty reference (the rate is undefined there)."""
        return self.errors / self.ref_len if self.ref_len else None


def word_edits(reference: str, prediction: str, normalize: bool = True) -> EditCounts:
    """Word edit counts (jiwer), after :func:`normalize_transcript` unless ``normalize`` is False."""
    import jiwer

    ref = normalize_transcript(reference) if normalize else reference
    hyp = normalize_transcript(prediction) if normalize else prediction
    if not ref.split():  # jiwer's rate is undefined here; every predicted word is an insertion
        return EditCounts(0, 0, len(hyp.split()), 0)
    out = jiwer.process_words(ref, hyp)
    return EditCounts(out.substitutions, out.deletions, out.insertions, out.substitutions + out.deletions + out.hits)


def char_edits(reference: str, prediction: str, normalize: bool = True) -> EditCounts:
    """Character edit counts (jiwer; spaces count as characters), after the same normaliser."""
    import jiwer

    ref = normalize_transcript(reference) if normalize else reference
    hyp = normalize_transcript(prediction) if normalize else prediction
    if not ref:
        return EditCounts(0, 0, len(hyp), 0)
    out = jiwer.process_characters(ref, hyp)
    return EditCounts(out.substitutions, out.deletions, out.insertions, out.substitutions + out.deletions + out.hits)


def corpus_wer(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus WER of ``predictions`` against ``references``, both after :func:`normalize_transcript`."""
    edits = [word_edits(r, p) for r, p in zip(references, predictions, strict=True)]
    return corpus_rate([e.errors for e in edits], [e.ref_len for e in edits])


def corpus_rate(errors: Sequence[int], ref_lens: Sequence[int]) -> float:
    """Corpus error rate: sum of errors / sum of reference lengths (not a mean of item rates)."""
    total = sum(ref_lens)
    if total == 0:
        raise ValueError(f"corpus error rate needs at least one reference word; got {len(ref_lens)} empty references")
    return sum(errors) / total


# -------------------------------------------------------------------- answer normalisation

_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_SCALES = {"hundred": 100, "thousand": 1000}
_NUMBER_WORDS = set(_UNITS) | set(_TENS) | set(_SCALES)
_ARTICLES = frozenset({"a", "an", "the"})
# Folded on both sides before comparing, so "a woman" matches the label "female".
_CANONICAL = {
    "man": "male", "men": "male", "masculine": "male", "boy": "male",
    "woman": "female", "women": "female", "feminine": "female", "girl": "female",
}  # fmt: skip
_YES = frozenset({"yes", "yeah", "yep", "yup", "true", "correct", "affirmative"})
_NO = frozenset(
    {"no", "nope", "not", "false", "incorrect", "none", "nobody", "nothing", "never", "neither",
     "isnt", "arent", "wasnt", "werent", "doesnt", "dont", "didnt", "cant", "cannot", "hasnt", "havent"}
)  # fmt: skip
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+")


def _words(text: str) -> list[str]:
    """Lower-case word and number tokens; apostrophes dropped ("isn't" -> "isnt"), hyphens split."""
    return _TOKEN.findall(text.lower().replace("'", "").replace("\u2019", ""))


def _words_to_numbers(tokens: list[str]) -> list[str]:
    """Replace runs of number words by digits: ["twenty", "one", "beeps"] -> ["21", "beeps"]."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] not in _NUMBER_WORDS or tokens[i] in _SCALES:
            out.append(tokens[i])
            i += 1
            continue
        total, current = 0, 0
        while i < len(tokens):
            word = tokens[i]
            if word == "and" and current % 100 == 0 and current and i + 1 < len(tokens) and tokens[i + 1] in _UNITS:
                i += 1  # "one hundred and five"
                continue
            if word not in _NUMBER_WORDS:
                break
            if word in _UNITS:
                if current % 10 or (current % 100 and _UNITS[word] >= 10):  # "one two" is two numbers
                    break
                current += _UNITS[word]
            elif word in _TENS:
                if current % 100:
                    break
                current += _TENS[word]
            elif word == "hundred":
                current = max(current, 1) * 100
            else:  # thousand
                total += max(current, 1) * 1000
                current = 0
            i += 1
        out.append(str(total + current))
    return out


def answer_tokens(text: str) -> list[str]:
    """The tokens :func:`normalize_answer` joins (numbers as digits, no articles, gender folded)."""
    tokens = _words_to_numbers(_words(text))
    return [_CANONICAL.get(t, t) for t in tokens if t not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer: "The THREE beeps." -> "3 beeps"; "A woman" -> "female"."""
    return " ".join(answer_tokens(text))


def _stem(token: str) -> str:
    """Crude plural folding so that "beep" matches "beeps" (tokens of 4+ letters ending in s)."""
    return token[:-1] if len(token) > 3 and token.endswith("s") and not token.endswith("ss") else token


def phrase_position(phrase: str, text: str) -> int | None:
    """Token index where ``phrase`` first occurs in ``text`` as whole words (after normalisation and
    plural folding), or None. An empty phrase never matches."""
    needle = [_stem(t) for t in answer_tokens(phrase)]
    hay = [_stem(t) for t in answer_tokens(text)]
    if not needle:
        return None
    for i in range(len(hay) - len(needle) + 1):
        if hay[i : i + len(needle)] == needle:
            return i
    return None


def extract_yes_no(text: str) -> str | None:
    """"yes" or "no" from an answer, or None. The first word decides if it is yes-like or no-like;
    otherwise the first such word anywhere ("there is no siren" -> "no")."""
    for token in _words(text):
        if token in _YES:
            return "yes"
        if token in _NO:
            return "no"
    return None


def extract_number(text: str) -> float | None:
    """The first number in ``text``, as digits or words ("Three." -> 3, "2.5 s" -> 2.5); "no"/"none"
    give 0 when no number is written."""
    tokens = _words_to_numbers(_words(text))
    for token in tokens:
        if token[0].isdigit():
            return float(token)
    if any(t in ("no", "none", "nothing") for t in tokens):
        return 0.0
    return None


def choose_label(text: str, labels: Sequence[str]) -> str | None:
    """The label mentioned earliest in ``text`` (longest first on ties), as given in ``labels``; None if none is.

    >>> choose_label("It sounds like pink noise.", ["white noise", "pink noise", "noise"])
    'pink noise'
    """
    best: tuple[int, int, str] | None = None
    for label in labels:
        pos = phrase_position(label, text)
        if pos is not None:
            key = (pos, -len(answer_tokens(label)), label)
            best = key if best is None or key < best else best
    return None if best is None else best[2]


_SEQUENCE_SPLIT = re.compile(r",|;|->|\band then\b|\bthen\b|\bfollowed by\b|\bafter that\b|\bbefore\b", re.IGNORECASE)


def split_sequence(text: str) -> list[str]:
    """The items of an ordered answer: "beeps, then a siren" -> ["beeps", "a siren"]."""
    items = [re.sub(r"^\s*(and|first|second|last|finally)\b", "", p, flags=re.IGNORECASE) for p in _SEQUENCE_SPLIT.split(text)]
    return [i.strip(" .") for i in items if answer_tokens(i)]


def sequence_in_order(prediction: str, items: Sequence[str]) -> bool:
    """Every item occurs in ``prediction`` and at increasing positions."""
    positions = [phrase_position(item, prediction) for item in items]
    if any(p is None for p in positions):
        return False
    return all(a < b for a, b in zip(positions, positions[1:], strict=False))  # type: ignore[operator]


# -------------------------------------------------------------------------- format checks


@dataclass(frozen=True)
class FormatCheck:
    """``compliant``: the answer has the asked form; ``correct``: it is compliant and its content is right."""

    compliant: bool
    correct: bool
    detail: str = ""


def check_bare_answer(prediction: str, reference: str) -> FormatCheck:
    """The bare answer ("Answer with one word" / "the label only"): as many words as the reference (so exactly
    one word for a one-word reference; surrounding punctuation allowed), equal to it after normalisation."""
    words = prediction.strip().strip(".,!?;:\"'`()[]").split()
    want = len(reference.split())
    if len(words) != want:
        return FormatCheck(False, False, f"{len(words)} words, expected {want}")
    correct = normalize_answer(" ".join(words)) == normalize_answer(reference)
    return FormatCheck(True, correct, "" if correct else "different answer")


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_answer(prediction: str) -> Any:
    """The JSON value of an answer (a surrounding Markdown code fence is allowed); raises ValueError."""
    text = prediction.strip()
    fenced = _FENCE.match(text)
    return json.loads(fenced.group(1) if fenced else text)


def _values_match(got: Any, expected: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(got, Mapping) and all(k in got and _values_match(got[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(_values_match, got, expected))
    if isinstance(expected, bool) or isinstance(got, bool):
        return normalize_answer(str(got)) == normalize_answer(str(expected)) or (
            extract_yes_no(str(got)) is not None and extract_yes_no(str(got)) == extract_yes_no(str(expected))
        )
    return normalize_answer(str(got)) == normalize_answer(str(expected))


def check_json(prediction: str, expected: Mapping[str, Any] | None, keys: Sequence[str] = ()) -> FormatCheck:
    """A JSON object with the asked keys (compliance) whose values equal ``expected`` (correctness).

    Keys are those of ``expected`` plus ``keys``. Values are compared after :func:`normalize_answer`
    (3 == "3" == "three"); nested objects and lists recursively. Extra keys are allowed.
    """
    try:
        value = parse_json_answer(prediction)
    except ValueError as err:
        return FormatCheck(False, False, f"not JSON: {err}")
    if not isinstance(value, dict):
        return FormatCheck(False, False, f"JSON {type(value).__name__}, not an object")
    wanted = list(dict.fromkeys([*(expected or {}), *keys]))
    missing = [k for k in wanted if k not in value]
    if missing:
        return FormatCheck(False, False, f"missing keys {missing}")
    wrong = [k for k, v in (expected or {}).items() if not _values_match(value[k], v)]
    return FormatCheck(True, not wrong, f"wrong values for {wrong}" if wrong else "")


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
MAX_LIST_ITEM_WORDS = 6


def parse_list(text: str) -> list[str] | None:
    """Items of a comma- or line-separated list ("a, b and c", "- a\\n- b", "1. a\\n2. b"), or None when the
    text is not a list (an empty item, or an item longer than ``MAX_LIST_ITEM_WORDS`` words, i.e. prose)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        items = [_BULLET.sub("", line) for line in lines]
    else:
        items = (lines[0] if lines else "").split(",")
        if len(items) > 1:  # "a, b and c" / "a, b, and c"
            last = re.split(r"\s+and\s+", items[-1].strip())
            items = items[:-1] + last
            items = [re.sub(r"^\s*and\s+", "", i) for i in items]
        items = [_BULLET.sub("", i) for i in items]
    items = [i.strip().strip(".;").strip() for i in items]
    if not items or any(not i for i in items) or any(len(i.split()) > MAX_LIST_ITEM_WORDS for i in items):
        return None
    return items


def check_list(prediction: str, expected: Sequence[str], ordered: bool = False) -> FormatCheck:
    """A list (see :func:`parse_list`) holding exactly the expected items (as a multiset, or in order)."""
    items = parse_list(prediction)
    if items is None:
        return FormatCheck(False, False, "not a list")
    got = [normalize_answer(i) for i in items]
    want = [normalize_answer(i) for i in expected]
    if not ordered:
        got, want = sorted(got), sorted(want)
    correct = [_stem_all(g) for g in got] == [_stem_all(w) for w in want]
    return FormatCheck(True, correct, "" if correct else f"items {got}, expected {want}")


def _stem_all(phrase: str) -> str:
    return " ".join(_stem(t) for t in phrase.split())


# -------------------------------------------------------------- intervals and confusion


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z = 1.96); (0, 1) for n = 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap_rate_interval(
    errors: Sequence[int], ref_lens: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95% percentile bootstrap interval of a corpus error rate, resampling items (deterministic per seed)."""
    if len(errors) != len(ref_lens):
        raise ValueError(f"{len(errors)} error counts but {len(ref_lens)} reference lengths")
    e, r = np.asarray(errors, dtype=np.float64), np.asarray(ref_lens, dtype=np.float64)
    if r.sum() == 0:
        raise ValueError("bootstrap interval needs at least one reference word")
    idx = np.random.default_rng(seed).integers(0, len(e), size=(resamples, len(e)))  # [R, N]
    den = r[idx].sum(axis=1)
    rates = e[idx].sum(axis=1)[den > 0] / den[den > 0]
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return (float(lo), float(hi))


OTHER_LABEL = "other"


def confusion_matrix(references: Sequence[str], predictions: Sequence[str | None], labels: Sequence[str]) -> list[list[int]]:
    """Counts ``[len(labels), len(labels)]``: row = reference label, column = predicted label.

    A prediction that is None or not in ``labels`` counts in the column ``OTHER_LABEL``, which must
    then be among ``labels``.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for ref, pred in zip(references, predictions, strict=True):
        if ref not in index:
            raise ValueError(f"reference label {ref!r} is not among the labels {list(labels)}")
        col = index.get(pred) if pred is not None else None
        if col is None:
            if OTHER_LABEL not in index:
                raise ValueError(f"prediction {pred!r} is not a label and {OTHER_LABEL!r} is not among {list(labels)}")
            col = index[OTHER_LABEL]
        matrix[index[ref]][col] += 1
    return matrix
