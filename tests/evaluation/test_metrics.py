"""Metric functions on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from omnivox.evaluation import metrics as M


def test_wer_counts_on_a_hand_computed_example():
    # ref "the cat sat on the mat" vs hyp "the cat sit on mat": 1 substitution (sat->sit), 1 deletion (the)
    e = M.word_edits("The cat sat on the mat.", "the cat sit on mat")
    assert (e.substitutions, e.deletions, e.insertions, e.ref_len) == (1, 1, 0, 6)
    assert e.rate == pytest.approx(2 / 6)
    # an insertion
    e = M.word_edits("hello world", "hello big world")
    assert (e.errors, e.insertions, e.ref_len) == (1, 1, 2)


def test_wer_normaliser_folds_titles_numbers_case_and_punctuation():
    assert M.normalize_transcript("Mr. Smith paid twenty dollars.") == "mister smith paid $20"
    assert M.word_edits("Mr. Smith paid twenty dollars.", "mister smith paid $20").errors == 0
    assert M.word_edits("IN EIGHTEEN THIRTEEN", "In 1813.").errors == 0
    assert M.word_edits("The colour is red", "the color is red").errors == 0
    # without the normaliser these differ
    assert M.word_edits("Mr. Smith", "mister smith", normalize=False).errors == 2


def test_cer_and_empty_references():
    c = M.char_edits("abc", "abd")
    assert (c.errors, c.ref_len) == (1, 3)
    e = M.word_edits("", "hello there")
    assert (e.insertions, e.ref_len, e.rate) == (2, 0, None)
    assert M.word_edits("two words", "").deletions == 2


def test_corpus_wer_is_total_errors_over_total_words_not_mean_of_rates():
    assert M.corpus_rate([1, 0], [2, 8]) == pytest.approx(0.1)  # the mean of rates would be 0.25
    with pytest.raises(ValueError, match="at least one reference word"):
        M.corpus_rate([1], [0])


@pytest.mark.parametrize(
    "text, number",
    [("Three.", 3), ("3", 3), ("There are twenty-one clicks", 21), ("about 2.5 seconds", 2.5), ("no knocks", 0),
     ("one hundred and five", 105), ("I hear seven beeps, maybe eight", 7), ("many", None)],
)  # fmt: skip
def test_extract_number(text, number):
    assert M.extract_number(text) == number


@pytest.mark.parametrize(
    "text, answer",
    [("yes, someone is speaking", "yes"), ("Yes.", "yes"), ("No one is speaking.", "no"), ("It isn't.", "no"),
     ("There is no siren", "no"), ("Yeah", "yes"), ("Someone is speaking", None)],
)  # fmt: skip
def test_extract_yes_no(text, answer):
    assert M.extract_yes_no(text) == answer


def test_normalize_answer():
    assert M.normalize_answer("The THREE beeps.") == "3 beeps"
    assert M.normalize_answer("Three.") == M.normalize_answer("3")
    assert M.normalize_answer("A woman") == M.normalize_answer("female")
    assert M.normalize_answer("one two three") == "1 2 3"


def test_phrase_and_label_matching():
    assert M.phrase_position("pink noise", "It is pink noise.") == 2
    assert M.phrase_position("beeps", "a single beep") == 1  # plural folded; articles are not counted
    assert M.phrase_position("male", "a female voice") is None  # whole words only
    assert M.choose_label("It sounds like pink noise, not white noise.", ["white noise", "pink noise"]) == "pink noise"
    assert M.choose_label("a siren", ["tone", "beeps"]) is None


def test_sequence_order():
    items = M.split_sequence("beeps, then a siren")
    assert items == ["beeps", "a siren"]
    assert M.sequence_in_order("First the beeps, then the siren.", items)
    assert not M.sequence_in_order("The siren came before the beeps.", items)
    assert not M.sequence_in_order("beeps", items)


def test_bare_answer_format():
    assert M.check_bare_answer(" Siren. ", "siren") == M.FormatCheck(True, True, "")
    assert M.check_bare_answer("Three", "3").correct
    wrong = M.check_bare_answer("beeps", "siren")
    assert (wrong.compliant, wrong.correct) == (True, False)
    prose = M.check_bare_answer("It is a siren.", "siren")  # one word asked, four given
    assert (prose.compliant, prose.correct) == (False, False)
    assert M.check_bare_answer("White noise.", "white noise").correct  # a two-word label
    assert not M.check_bare_answer("noise", "white noise").compliant


def test_json_format_compliance_and_correctness():
    expected = {"sound": "beeps", "count": 3}
    assert M.check_json('{"sound": "beeps", "count": "three"}', expected) == M.FormatCheck(True, True, "")
    assert M.check_json('```json\n{"sound": "Beeps", "count": 3, "extra": 1}\n```', expected).correct
    wrong_value = M.check_json('{"sound": "beeps", "count": 2}', expected)
    assert (wrong_value.compliant, wrong_value.correct) == (True, False)
    missing = M.check_json('{"sound": "beeps"}', expected)
    assert (missing.compliant, missing.correct) == (False, False) and "count" in missing.detail
    assert not M.check_json("sound: beeps, count: 3", expected).compliant
    assert not M.check_json("[1, 2]", expected).compliant
    assert M.check_json('{"a": 1}', None, keys=["a"]) == M.FormatCheck(True, True, "")


def test_list_format():
    assert M.parse_list("beeps, a siren and rain") == ["beeps", "a siren", "rain"]
    assert M.parse_list("- beeps\n- siren") == ["beeps", "siren"]
    assert M.parse_list("1. beeps\n2) siren") == ["beeps", "siren"]
    assert M.parse_list("I can hear a siren that gets louder and louder over time") is None
    assert M.check_list("siren, beeps", ["beeps", "siren"]).correct
    assert not M.check_list("siren, beeps", ["beeps", "siren"], ordered=True).correct
    short = M.check_list("beeps", ["beeps", "siren"])
    assert (short.compliant, short.correct) == (True, False)


def test_wilson_interval_known_values():
    lo, hi = M.wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = M.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)


def test_bootstrap_interval_is_deterministic_and_brackets_the_rate():
    errors, words = [1, 2, 0, 3], [4, 5, 3, 6]
    lo, hi = M.bootstrap_rate_interval(errors, words)
    assert (lo, hi) == M.bootstrap_rate_interval(errors, words)
    assert lo <= M.corpus_rate(errors, words) <= hi
    assert M.bootstrap_rate_interval([2, 2], [4, 4]) == (0.5, 0.5)
    assert not math.isnan(lo)


def test_confusion_matrix_counts():
    refs = ["tone", "tone", "siren", "siren", "siren"]
    preds = ["tone", "siren", "siren", None, "whistle"]
    labels = ["siren", "tone", M.OTHER_LABEL]
    assert M.confusion_matrix(refs, preds, labels) == [[1, 0, 2], [1, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="other"):
        M.confusion_matrix(["tone"], ["x"], ["tone"])
