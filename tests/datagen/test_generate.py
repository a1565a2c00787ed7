"""End-to-end tests of the synthetic data generator on tiny runs (espeak-ng needed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omnivox.datagen import SynthOptions, generate, main_synth
from omnivox.datagen.generate import SPLITS
from omnivox.datagen.sounds import detect_onsets
from omnivox.datagen.tasks import TASKS
from omnivox.datagen.text import BUILTIN_SENTENCES

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng not on PATH (apt-get install espeak-ng)")

# Built-in text and espeak only: fast, and independent of what else is installed.
OPTS = SynthOptions(engines=("espeak",), fortune_dir=None, sentences=BUILTIN_SENTENCES, validation_items=0.2,
                    test_items=0.2, held_out_sentences=0.15, progress=False)
HOURS = 0.02  # 14 items: one of every task plus two more; seed 4 puts speech in validation and test


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "dataset.json"}


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for split in SPLITS for line in (folder / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "a"
    generate(out, HOURS, seed=4, workers=1, options=OPTS)
    return out


def test_same_seed_same_bytes_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path / "b", HOURS, seed=4, workers=2, options=OPTS)
    assert _tree_digest(dataset) == _tree_digest(tmp_path / "b")
    assert (dataset / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    generate(tmp_path / "c", 0.003, seed=5, workers=1, options=OPTS)
    first = (tmp_path / "c" / "items" / "0000000.json").read_text()
    assert first != (dataset / "items" / "0000000.json").read_text()


def test_every_task_present(dataset: Path) -> None:
    summary = json.loads((dataset / "dataset.json").read_text())
    seen = {task for split in SPLITS for task in summary["counts"][split]}
    assert seen == set(TASKS)
    assert summary["seed"] == 4 and summary["version"]


def test_manifest_lines_valid(dataset: Path) -> None:
    lines = _lines(dataset)
    assert len(lines) == json.loads((dataset / "dataset.json").read_text())["items"]
    for line in lines:
        path = dataset / line["audio"]
        assert path.is_file(), line["audio"]
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.frames / 16000 - line["duration"]) < 1e-3
        x, _ = sf.read(str(path), dtype="float32")
        assert np.all(np.isfinite(x)) and 0.1 < line["duration"] <= 30.0
        assert line["answer"].strip() and line["instruction"].strip()
        assert isinstance(line["metadata"], dict)
        if line["metadata"]["format"] == "json":
            json.loads(line["answer"])
        if line["task"] == "multi_turn":
            assert len(line["turns"]) >= 2 and line["turns"][0]["answer"] == line["answer"]
            assert all(t["instruction"] and t["answer"] for t in line["turns"])
        if line["task"] == "transcription":
            text = line["metadata"]["text"]
            assert text in line["answer"]


def test_splits_disjoint_in_voices_and_sentences(dataset: Path) -> None:
    summary = json.loads((dataset / "dataset.json").read_text())
    held = summary["held_out"]
    assert not set(held["voices"]["validation"]) & set(held["voices"]["test"])
    assert not set(held["sentences"]["validation"]) & set(held["sentences"]["test"])
    used: dict[str, dict[str, set[str]]] = {s: {"voices": set(), "texts": set()} for s in SPLITS}
    for line in _lines(dataset):
        meta = line["metadata"]
        if meta.get("voice"):
            used[line["split"]]["voices"].add(meta["voice"]["voice"])
            used[line["split"]]["texts"].add(meta["text"])
    for split in ("validation", "test"):
        assert used[split]["voices"] <= set(held["voices"][split])
        assert not used[split]["voices"] & used["train"]["voices"]
        assert not used[split]["texts"] & used["train"]["texts"]
    assert used["test"]["voices"], "tiny run rendered no test speech; change HOURS or the seed"
    quotes = [t for t in used["test"]["texts"] if t in BUILTIN_SENTENCES]
    assert set(quotes) <= set(held["sentences"]["test"])


def test_counting_answers_match_rendered_events(dataset: Path) -> None:
    lines = [line for line in _lines(dataset) if line["task"] == "counting"]
    assert lines
    for line in lines:
        x, _ = sf.read(str(dataset / line["audio"]), dtype="float32")
        count = line["metadata"]["count"]
        assert str(count) in line["answer"] or line["answer"] in ("one two three four five six".split())
        if "background" not in line["metadata"]:
            assert len(detect_onsets(x)) == count, line


def test_resume_skips_finished_items(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    shutil.copytree(dataset, out)
    (out / "items" / "0000003.json").unlink()
    wav_mtimes = {p: p.stat().st_mtime_ns for p in (out / "audio").rglob("*.wav")}
    generate(out, HOURS, seed=4, workers=1, options=OPTS)
    changed = [p for p, t in wav_mtimes.items() if p.stat().st_mtime_ns != t]
    assert len(changed) == 1 and changed[0].name == "0000003.wav"
    assert _tree_digest(out) == _tree_digest(dataset)


def test_resume_refuses_other_seed(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    shutil.copytree(dataset, out)
    with pytest.raises(ValueError, match="other settings"):
        generate(out, HOURS, seed=99, workers=1, options=OPTS)


def test_cli_rejects_bad_hours(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_synth(["--out", str(tmp_path / "x"), "--hours", "0", "--quiet"]) == 2
    assert "--hours" in capsys.readouterr().err
