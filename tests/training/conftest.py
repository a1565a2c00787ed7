"""Fixtures: a tiny model's parts, a tiny tone dataset with manifests, recipe writing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny ChatML model folder without LoRA (trim_to_audio on); parts in ``../parts``."""
    return tiny.make_model_folder(tmp_path_factory.mktemp("tiny"), prompt_style="chatml", trim_to_audio=True, lora=False)


def _write_split(folder: Path, split: str, rows: list[dict]) -> None:
    with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Tones: low (220-330 Hz) or high (1500-2500 Hz), 1-2.5 s; one follow-up turn on some items.

    ``metadata.text`` ("a high tone" / "a low tone") stands in for a transcript (stage ctc).
    """
    root = tmp_path_factory.mktemp("data")
    (root / "clips").mkdir()
    splits = {"train": 8, "validation": 4, "test": 2}
    for split, n in splits.items():
        rows = []
        for i in range(n):
            high = i % 2 == 0
            freq = (1500 + 150 * i) if high else (220 + 15 * i)
            seconds = 1.0 + 0.25 * (i % 7)
            name = f"clips/{split}_{i:02d}.wav"
            sf.write(root / name, tiny.tone_clip(seconds, freq, seed=i), 16000)
            row = {"audio": name, "duration": seconds, "task": "pitch", "instruction": "Is the tone high or low?",
                   "answer": "high" if high else "low",
                   "metadata": {"freq": freq, "text": "a high tone" if high else "a low tone"}}  # fmt: skip
            if i % 3 == 0:
                row["turns"] = [{"instruction": "How many tones?", "answer": "one"}]
            rows.append(row)
        _write_split(root, split, rows)
    return root


@pytest.fixture
def fresh_recipe(tiny_folder, dataset):
    """``fresh_recipe(out_dir, **top_level_keys)`` -> recipe text."""
    return lambda out_dir, **top: fresh_model_toml(tiny_folder, dataset, out_dir, **top)


def fresh_model_toml(tiny_folder: Path, dataset: Path, out_dir: Path, **top) -> str:
    """A recipe assembling a fresh model from the tiny parts (align stage)."""
    parts = tiny_folder.parent / "parts"
    settings = {"stage": "align", "out_dir": str(out_dir), "seed": 0, "eval_every": 0, "save_every": 2, "log_every": 1,
                "device": "cpu", "threads": 2, **top}  # fmt: skip
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return f"""
{extra}

[model]
llm = "{parts / 'llm'}"
prompt_style = "chatml"
encoders = [{{kind = "whisper", path = "{parts / 'whisper.pt'}"}}, {{kind = "beats", path = "{parts / 'beats.pt'}"}}]

[model.qformer]
hidden_size = 32
num_layers = 1
num_heads = 2
intermediate_size = 64
queries_per_window = 1

[model.audio]
trim_to_audio = true

[data]
dir = "{dataset}"
eval_items = 4
num_generations = 1

[optim]
lr = 3e-3
warmup_steps = 0
max_steps = 4
batch_size = 4
scheduler = "constant"
"""
