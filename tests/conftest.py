"""Shared test fixtures. Tests build tiny models in the real file formats; nothing is downloaded."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared test helpers: tiny.py, whisper_names.py
FIXTURES = Path(os.environ.get("OMNIVOX_FIXTURES", ROOT.parent / "shared" / "fixtures"))
SPEECH = FIXTURES / "speech"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def speech_fixtures() -> dict[Path, str]:
    """Real speech clips with transcripts from ``../shared/fixtures/speech`` (skips when absent)."""
    transcripts = SPEECH / "transcripts.json"
    if not transcripts.is_file():
        pytest.skip(f"real speech fixtures not found at {SPEECH} (set OMNIVOX_FIXTURES to their folder)")
    return {SPEECH / name: text for name, text in json.loads(transcripts.read_text()).items()}
