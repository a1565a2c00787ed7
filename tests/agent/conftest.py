from __future__ import annotations

from pathlib import Path

import pytest
import tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SALMONN-style model folder (Whisper .pt + BEATs ckpt + LLaMA + LoRA), random weights."""
    return tiny.make_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from omnivox.agent.model import OmnivoxModel

    return OmnivoxModel.from_pretrained(tiny_model_dir)
