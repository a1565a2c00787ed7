"""The task table, manifest reading and item selection (no model)."""

from __future__ import annotations

import json

import pytest

from omnivox.errors import UserInputError
from omnivox.evaluation import tasks as T
from omnivox.evaluation.data import load_fixtures, load_manifest
from omnivox.evaluation.runner import select


def test_every_suite_but_fixtures_and_all_has_tasks_and_every_task_a_suite():
    suites = {spec.suite for spec in T.TASKS.values()}
    assert suites == set(T.MANIFEST_SUITES) - {"format"}  # format rows come from metadata["format"]
    assert set(T.FORMATS) == {"word", "json", "list"}
    assert set(T.SUITES) == {*T.MANIFEST_SUITES, "fixtures", "codec", "speech-out", "all"}  # no LLM in the last two: not in all
    assert T.suite_parts("all") == (*T.MANIFEST_SUITES, "fixtures")
    with pytest.raises(UserInputError, match="unknown suite"):
        T.suite_parts("nope")


@pytest.mark.parametrize(
    "name, key",
    [("transcription", "transcription"), ("speaker", "speaker"), ("Speaker Attributes", "speaker"),
     ("multi-turn", "multi_turn"), ("content QA", "spoken_qa"), ("event_list", "event_list"), ("karaoke", None)],
)  # fmt: skip
def test_task_names_are_matched_through_one_table(name, key):
    assert T.canonical_task(name) == key


def test_scorers_on_known_answers():
    assert T.score_number("Three.", "3", {}, []).correct
    assert T.score_yes_no("yes, someone is speaking", "yes", {}, []).correct
    assert not T.score_yes_no("Someone is speaking", "yes", {}, []).correct
    assert T.score_classification("It is a siren.", "siren", {}, ["tone", "siren"]).details["predicted_label"] == "siren"
    assert T.score_classification("whistle", "siren", {}, ["tone", "siren"]).details["predicted_label"] == "other"
    assert T.score_phrase("I think it is a woman", "female", {}, []).correct
    assert T.score_phrase("the second one", "first", {"options": ["first", "second"]}, []).correct is False
    assert T.score_duration("about 3.4 seconds", "3 seconds", {}, []).correct
    assert not T.score_duration("5 seconds", "3 seconds", {}, []).correct
    assert T.score_order("First beeps, then the siren", "beeps, then siren", {}, []).correct
    meta = {"sounds": ["clicks", "falling sweep"],
            "segments": [{"label": "clicks", "caption": "six sharp clicks"},
                         {"label": "falling sweep", "caption": "a tone sweeping downward in pitch"}]}  # fmt: skip
    assert T.score_captioning("Six clicks, then a downward sweeping tone.", "", meta, []).correct  # described
    assert T.score_captioning("Clicks and a falling sweep.", "", meta, []).correct  # by label
    partial = T.score_captioning("Some clicking sounds.", "", meta, [])
    assert (partial.correct, partial.details["named"]) == (False, [])  # "clicking" is not "clicks"
    assert T.score_captioning("three beeps", "three short beeps", {}, []).details["recall"] == pytest.approx(2 / 3)
    assert T.score_json_format('{"n": 2}', '{"n": 2}', {"format": "json"}, []).details["compliant"]
    assert T.format_of({"format": "JSON"}) == "json" and T.format_of({"format": "text"}) is None


def test_json_items_are_scored_on_their_content():
    meta = {"format": "json"}
    assert T.content('{"count": "three"}', '{"count": 3}', meta) == ("three", "3")
    assert T.content("I hear 3", '{"count": 3}', meta) == ("I hear 3", "3")  # right answer, wrong format
    assert T.content('{"present": true}', '{"present": false}', meta) == ("yes", "no")
    assert T.content('{"first": "siren", "second": "tone"}', '{"first": "tone", "second": "siren"}', meta) == (
        "siren, tone", "tone, siren",
    )  # fmt: skip
    assert T.content("three", "3", {"format": "word"}) == ("three", "3")
    with pytest.raises(UserInputError, match="no number"):
        T.score_number("3", "many", {}, [])


def test_manifest_errors_name_the_line_and_field(tmp_path, write_manifest):
    write_manifest(tmp_path, [{"audio": "a.wav", "task": "counting", "instruction": "How many?", "answer": "2"},
                              {"audio": "a.wav", "task": "counting", "answer": "2"}])  # fmt: skip
    with pytest.raises(UserInputError, match="test.jsonl line 2: missing field 'instruction'"):
        load_manifest(tmp_path, "test", T.canonical_task)
    (tmp_path / "test.jsonl").write_text('{"audio": "a.wav", "task": "counting"\n')
    with pytest.raises(UserInputError, match="line 1: not JSON"):
        load_manifest(tmp_path, "test", T.canonical_task)
    with pytest.raises(UserInputError, match="validation.jsonl: manifest not found"):
        load_manifest(tmp_path, "validation", T.canonical_task)


def _lines():
    return [
        {"audio": "c1.wav", "task": "counting", "instruction": "How many beeps?", "answer": "three"},
        {"audio": "c2.wav", "task": "counting", "instruction": "How many clicks?", "answer": "two"},
        {"audio": "c3.wav", "task": "counting", "instruction": "How many knocks?", "answer": "one",
         "turns": [{"instruction": "Is it loud?", "answer": "yes"}]},
        {"audio": "t.wav", "task": "transcription", "instruction": "Transcribe.", "answer": "hello"},
        {"audio": "t.wav", "task": "karaoke", "instruction": "Sing.", "answer": "la"},
    ]  # fmt: skip


def test_selection_per_suite_limit_and_multiturn(tmp_path, write_manifest):
    write_manifest(tmp_path, _lines())
    qa = select("qa", tmp_path)
    assert [p.group for p in qa.planned] == ["counting"] * 3 and qa.turns == [1, 1, 1]
    assert any("karaoke" in note for note in qa.notes)
    assert len(select("qa", tmp_path, limit=2).items) == 2
    multi = select("multiturn", tmp_path)
    assert [it.id for it in multi.items] == ["test-000003"] and multi.turns == [2]
    # the opening turn counts in its own task's row (counting); the follow-up in the multi-turn rows
    assert [p.group for p in multi.planned] == ["multi_turn/turn 2"]
    both = select("all", tmp_path, fixtures_dir=tmp_path / "no-fixtures")
    assert both.turns == [1, 1, 2, 1]  # the item is generated once and counted in both rows
    assert [p.group for p in both.planned if p.item == 2] == ["counting", "multi_turn/turn 2"]
    assert any("fixtures suite skipped" in note for note in both.notes)
    with pytest.raises(UserInputError, match="needs --data"):
        select("asr", None)


def test_datagen_dialogues_repeat_the_opening_turn(tmp_path, write_manifest):
    dialogue = [{"instruction": "Transcribe the speech.", "answer": "Hi there."},
                {"instruction": "How many words?", "answer": "2"}, {"instruction": "Any noise?", "answer": "no"}]  # fmt: skip
    line = {"audio": "d.wav", "task": "multi_turn", "instruction": "Transcribe the speech.", "answer": "Hi there.",
            "metadata": {"format": "text"}, "turns": dialogue}  # fmt: skip
    write_manifest(tmp_path, [line])
    (item,) = load_manifest(tmp_path, "test", T.canonical_task)[0]
    assert [t.instruction for t in item.turns] == ["Transcribe the speech.", "How many words?", "Any noise?"]
    sel = select("multiturn", tmp_path)
    assert [(p.group, p.metric) for p in sel.planned] == [
        ("multi_turn/turn 1", "wer"), ("multi_turn/turn 2", "accuracy"), ("multi_turn/turn 3", "accuracy"),
    ]  # fmt: skip


def test_fixtures_folder(tmp_path):
    assert load_fixtures(tmp_path) is None
    (tmp_path / "transcripts.json").write_text(json.dumps({"b.wav": "Hello.", "a.wav": "Hi."}))
    items = load_fixtures(tmp_path)
    assert [it.id for it in items] == ["fixtures/a.wav", "fixtures/b.wav"]
    assert items[0].turns[0].instruction == "Transcribe the speech."
