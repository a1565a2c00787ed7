from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SALMONN-style model folder (Whisper .pt + BEATs ckpt + LLaMA + LoRA), random weights."""
    return tiny.make_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from omnivox.agent.model import OmnivoxModel

    return OmnivoxModel.from_pretrained(tiny_model_dir)
