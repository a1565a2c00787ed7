from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SALMONN-style model folder (random weights), built once for the evaluation tests."""
    return tiny.make_model_folder(tmp_path_factory.mktemp("tiny-eval"))


@pytest.fixture
def write_manifest():
    """``write_manifest(folder, lines)``: a manifest and its tone clips (see :func:`_write_manifest`)."""
    return _write_manifest


def _write_manifest(folder: Path, lines: list[dict], split: str = "test", seconds: float = 1.0) -> Path:
    """Write ``split.jsonl`` and one short tone per distinct ``audio`` path (frequency varies by clip)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = sorted({line["audio"] for line in lines if "audio" in line})
    for k, name in enumerate(clips):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tiny.tone_clip(seconds, freq=220.0 * (k + 1), seed=k), 16000)
    with (folder / f"{split}.jsonl").open("w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return folder
