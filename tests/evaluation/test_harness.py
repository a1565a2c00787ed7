"""The harness end to end: a scripted fake model (known answers -> known numbers) and a tiny real model."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.model import OmnivoxModel
from omnivox.errors import UserInputError
from omnivox.evaluation import metrics as M
from omnivox.evaluation.cli import add_eval_arguments, run_eval
from omnivox.evaluation.report import markdown
from omnivox.evaluation.runner import evaluate
from omnivox.prompts import Message

WORD, JSON, LIST, TEXT = ({"format": f} for f in ("word", "json", "list", "text"))
# (task, instruction, reference, scripted answer, metadata), as datagen writes them; instructions are unique
SCRIPT = [
    ("classification", "Classify clip 1.", "tone", "a tone", WORD),
    ("classification", "Classify clip 2.", "beeps", "I hear a tone", WORD),
    ("classification", "Classify clip 3.", '{"label": "siren"}', "whistling", JSON),
    ("counting", "How many beeps in clip 4?", "three", "3.", WORD),
    ("counting", "How many beeps in clip 5?", '{"count": 2}', '{"count": 4}', JSON),
    ("presence", "Is anything in clip 6?", "yes", "yes, there is", WORD),
    ("transcription", "Transcribe clip 7.", "The cat sat on the mat.", "the cat sit on mat", TEXT),
    ("transcription", "Transcribe clip 8.", '{"text": "Hello world"}', '{"text": "hello, world!"}', JSON),
    ("event_list", "List clip 9.", "beeps, siren", "It is beeps and a siren and many other things I cannot name", LIST),
]
SCRIPTED = {instruction: answer for _, instruction, _, answer, _ in SCRIPT} | {
    "Transcribe clip 10.": "hello there", "How many words in clip 10?": "three",
    "How many knocks in clip 11?": "three", "Is clip 11 loud?": "no",
}  # fmt: skip


def _lines() -> list[dict]:
    lines = [
        {"id": f"item-{k}", "audio": f"clips/{k}.wav", "duration": 1.0, "task": task, "instruction": instruction,
         "answer": ref, "metadata": meta}
        for k, (task, instruction, ref, _, meta) in enumerate(SCRIPT, start=1)
    ]
    # datagen's dialogues repeat the opening turn in "turns"
    dialogue = [{"instruction": "Transcribe clip 10.", "answer": "Hello there."},
                {"instruction": "How many words in clip 10?", "answer": "2"}]
    lines.append({"id": "item-10", "audio": "clips/10.wav", "task": "multi_turn", "instruction": "Transcribe clip 10.",
                  "answer": "Hello there.", "metadata": TEXT, "turns": dialogue})
    # follow-ups only, on another task
    lines.append({"id": "item-11", "audio": "clips/11.wav", "task": "counting", "instruction": "How many knocks in clip 11?",
                  "answer": "three", "turns": [{"instruction": "Is clip 11 loud?", "answer": "yes"}]})
    lines.append({"audio": "clips/1.wav", "task": "karaoke", "instruction": "Sing.", "answer": "la"})
    return lines  # fmt: skip


class ScriptedModel:
    """Stands in for OmnivoxModel: answers by the last user turn, records every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[list[Message]]] = []
        self.model = SimpleNamespace(config=SimpleNamespace(transcriber=None))
        self.has_transcriber = False

    def settings(self, **overrides) -> GenerationSettings:
        return GenerationSettings().override(**overrides)

    def encode_clip(self, samples) -> torch.Tensor:
        return torch.zeros(3, 4)  # [N, H]

    def generate(self, conversations, audio, settings=None):
        assert len(conversations) == len(audio) and all(len(a) == 1 for a in audio)
        self.batches.append([list(c) for c in conversations])
        return [Generation(SCRIPTED[c[-1].text], [], "stop") for c in conversations]


def test_scripted_answers_give_the_hand_computed_numbers(tmp_path, write_manifest):
    data = write_manifest(tmp_path / "data", _lines(), seconds=0.2)
    model = ScriptedModel()
    results = evaluate(model, "all", data, batch_size=4, fixtures_dir=tmp_path / "none", progress=False)
    m = results.metrics
    assert (m["classification"]["correct"], m["classification"]["n"]) == (1, 3)
    assert (m["counting"]["correct"], m["counting"]["n"]) == (2, 3)  # clips 4, 5 and the opening turn of 11
    assert m["presence"]["value"] == 1.0 and m["event_list"]["value"] == 1.0
    assert (m["transcription"]["word_errors"], m["transcription"]["ref_words"]) == (2, 8)  # 2 of 6 + 0 of 2 (JSON)
    assert m["transcription"]["value"] == pytest.approx(0.25)
    # formats: right content in the wrong form is correct above and non-compliant here
    assert (m["format_word"]["n"], m["format_word"]["correct"], m["format_word"]["compliance"]["compliant"]) == (4, 1, 1)
    assert (m["format_json"]["n"], m["format_json"]["correct"], m["format_json"]["compliance"]["compliant"]) == (3, 1, 2)
    assert (m["format_list"]["correct"], m["format_list"]["compliance"]["compliant"]) == (0, 0)
    # the dialogue's opening transcription counts as WER in turn 1; counting's opening stays in its own row
    assert (m["multi_turn/turn 1"]["metric"], m["multi_turn/turn 1"]["n"], m["multi_turn/turn 1"]["value"]) == ("wer", 1, 0.0)
    assert (m["multi_turn/turn 2"]["correct"], m["multi_turn/turn 2"]["n"]) == (0, 2)
    o = results.overall
    assert (o["accuracy"]["n"], o["accuracy"]["correct"]) == (10, 5)
    assert o["accuracy_macro"]["value"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 + 0) / 5)
    assert (o["format_compliance"]["n"], o["format_compliance"]["compliant"]) == (8, 3)
    assert o["wer"]["value"] == pytest.approx(2 / 10)
    assert results.confusion["classification"] == {
        "labels": ["beeps", "siren", "tone", "other"],
        "matrix": [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]],
    }
    assert any("karaoke" in n for n in results.notes) and any("fixtures suite skipped" in n for n in results.notes)
    # batches of at most 4 items; the follow-up sees the model's own earlier answer
    assert max(len(b) for b in model.batches) == 4
    follow = next(c for b in model.batches for c in b if c[-1].text == "How many words in clip 10?")
    assert follow == [Message("user", "Transcribe clip 10.", num_audio=1), Message("assistant", "hello there"),
                      Message("user", "How many words in clip 10?")]  # fmt: skip
    table = markdown(results)
    assert "| transcription | WER | 2 | 25.0% |" in table
    assert "| format_list | format compliance | 1 | 0.0% |" in table
    assert table.index("| transcription |") < table.index("| classification |") < table.index("| format_word |")


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def _recompute(items: list[dict]) -> dict[str, dict]:
    """Group metrics recomputed from the per-item records alone."""
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it["group"], []).append(it)
    out = {}
    for name, rows in groups.items():
        if rows[0]["metric"] == "wer":
            errors = sum(r["details"]["word_errors"] for r in rows)
            words = sum(r["details"]["ref_words"] for r in rows)
            chars = sum(r["details"]["char_errors"] for r in rows) / sum(r["details"]["ref_chars"] for r in rows)
            out[name] = {"n": len(rows), "value": errors / words, "cer": chars}
        else:
            k = sum(bool(r["correct"]) for r in rows)
            out[name] = {"n": len(rows), "value": k / len(rows), "ci95": list(M.wilson_interval(k, len(rows)))}
    return out


def test_tiny_model_end_to_end_writes_consistent_results(tiny_model_dir, tmp_path, write_manifest, capsys):
    lines = [
        {"audio": "a.wav", "task": "transcription", "instruction": "Transcribe the speech.", "answer": "the quick brown fox"},
        {"audio": "b.wav", "task": "transcription", "instruction": "Transcribe the speech.", "answer": "Birds sing at dawn."},
        {"audio": "a.wav", "task": "classification", "instruction": "What sound is this?", "answer": "tone"},
        {"audio": "b.wav", "task": "classification", "instruction": "What sound is this?", "answer": "siren"},
        {"audio": "c.wav", "task": "counting", "instruction": "How many beeps?", "answer": "three"},
        {"audio": "c.wav", "task": "presence", "instruction": "Is anyone speaking?", "answer": "no"},
        {"audio": "a.wav", "task": "classification", "instruction": "What sound is this? Answer in JSON.",
         "answer": '{"label": "tone"}', "metadata": {"format": "json"}},
        {"audio": "c.wav", "task": "event_list", "instruction": "List the sounds.", "answer": "beeps, tone",
         "metadata": {"format": "list"}},
        {"audio": "b.wav", "task": "multi_turn", "instruction": "Describe the audio.", "answer": "a siren",
         "turns": [{"instruction": "Describe the audio.", "answer": "a siren"}, {"instruction": "Is anyone speaking?", "answer": "no"}]},
    ]  # fmt: skip
    data = write_manifest(tmp_path / "data", lines, seconds=1.0)
    out = tmp_path / "out"
    args = _eval_args("--model", str(tiny_model_dir), "--suite", "all", "--data", str(data), "--out", str(out),
                      "--batch-size", "3", "--max-new-tokens", "4", "--fixtures", str(tmp_path / "none"), "--no-progress")  # fmt: skip
    assert run_eval(args) == 0
    printed = capsys.readouterr().out
    assert "transcription" in printed and "classification" in printed
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "metrics.png", "confusion_classification.png"}
    for png in ("metrics.png", "confusion_classification.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"suite", "split", "model", "settings", "metrics", "overall", "confusion", "notes", "items"}
    assert res["settings"]["num_beams"] == 1 and res["settings"]["max_new_tokens"] == 4
    assert res["settings"]["ctc_fusion_weight"] == 0.0  # the model's default: the tiny folder sets none
    # 8 content answers (one classification in JSON), 2 format checks, 2 dialogue turns
    assert len(res["items"]) == 12
    assert {r["group"] for r in res["items"]} >= {"format_json", "format_list", "multi_turn/turn 1", "multi_turn/turn 2"}
    for item in res["items"]:
        assert set(item) >= {"id", "task", "group", "aspect", "metric", "turn", "prompt", "reference", "prediction", "correct", "details"}
    # the stored numbers equal a recomputation from the per-item records
    recomputed = _recompute(res["items"])
    assert set(recomputed) == set(res["metrics"])
    for name, want in recomputed.items():
        got = res["metrics"][name]
        assert got["n"] == want["n"] and got["value"] == pytest.approx(want["value"])
        if "ci95" in want:
            assert got["ci95"] == pytest.approx(want["ci95"])
        if "cer" in want:
            assert got["cer"]["value"] == pytest.approx(want["cer"])
    acc = [r for r in res["items"] if r["metric"] == "accuracy" and r["aspect"] == "content"]
    assert res["overall"]["accuracy"]["value"] == pytest.approx(sum(bool(r["correct"]) for r in acc) / len(acc))
    conf = res["confusion"]["classification"]
    cls = [r for r in res["items"] if r["group"] == "classification"]
    assert sum(map(sum, conf["matrix"])) == len(cls)
    for r in cls:
        row, col = conf["labels"].index(r["details"]["reference_label"]), conf["labels"].index(r["details"]["predicted_label"])
        assert conf["matrix"][row][col] >= 1
    md = (out / "results.md").read_text()
    assert "CTC fusion weight in transcripts 0.0; transcripts by the LLM" in md
    assert res["settings"]["transcriber"] is None
    from omnivox.evaluation.report import _transcriber

    named = _transcriber({"beam_size": 5, "whisper_weight": 1.0, "llm_weight": 0.7, "ctc_rescore_weight": 0.3})
    assert named == "transcripts chosen among Whisper's 5 best and the LLM's (weights Whisper 1.0, LLM 0.7, CTC 0.3)"
    for name in res["metrics"]:
        assert f"| {name} |" in md

    # the multi-turn answers are the model's own, in context, identical to a one-at-a-time run
    from omnivox.agent.audio import load_audio

    model = OmnivoxModel.from_pretrained(tiny_model_dir)
    settings = GenerationSettings.greedy(max_new_tokens=4)
    clip = [model.encode_clip(load_audio(data / "b.wav").samples)]
    first = model.generate([[Message("user", "Describe the audio.", num_audio=1)]], [clip], settings)[0].text
    second = model.generate(
        [[Message("user", "Describe the audio.", num_audio=1), Message("assistant", first), Message("user", "Is anyone speaking?")]],
        [clip], settings,
    )[0].text  # fmt: skip
    turns = sorted((r for r in res["items"] if r["task"] == "multi_turn"), key=lambda r: r["turn"])
    assert [r["prediction"] for r in turns] == [first, second]


def test_fixtures_suite_skips_cleanly_when_absent(tmp_path, capsys):
    args = _eval_args("--model", str(tmp_path / "never-loaded"), "--suite", "fixtures", "--fixtures", str(tmp_path))
    assert run_eval(args) == 0
    assert "fixtures suite skipped" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="needs --data"):
        run_eval(_eval_args("--suite", "qa"))


def test_fixtures_suite_on_one_real_clip(tiny_model_dir, speech_fixtures, tmp_path):
    folder = next(iter(speech_fixtures)).parent
    args = _eval_args("--model", str(tiny_model_dir), "--suite", "fixtures", "--fixtures", str(folder), "--limit", "1",
                      "--max-new-tokens", "3", "--out", str(tmp_path), "--no-progress")  # fmt: skip
    assert run_eval(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    (item,) = res["items"]
    assert item["prompt"] == "Transcribe the speech." and item["group"] == "fixtures"
    assert item["reference"] == speech_fixtures[folder / item["id"].removeprefix("fixtures/")]
    assert res["metrics"]["fixtures"]["metric"] == "wer"
