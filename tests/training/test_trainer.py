"""Training runs on a tiny model: loss goes down, the result loads, stopping and resuming is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from omnivox.agent.model import OmnivoxModel
from omnivox.training.cli import add_train_arguments, run_train
from omnivox.training.config import load_train_config
from omnivox.training.trainer import train


def _rows(out_dir, key):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def test_align_run_lowers_loss_and_writes_a_model(fresh_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "align.toml"
    recipe.write_text(fresh_recipe(out, eval_every=4))
    config = load_train_config(recipe, ("optim.max_steps=5", "data.max_items=4"))  # one fixed batch of 4
    result = train(config, progress=False)
    assert result.finished and result.step == 5
    losses = [r["loss"] for r in _rows(out, "loss")]
    assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.3, losses
    assert _rows(out, "val_loss") and (out / "curves.png").stat().st_size > 0
    assert (out / "samples.jsonl").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000004", "step-00000005"]
    model = OmnivoxModel.from_pretrained(out / "model")  # a normal model folder, real encoders again
    assert model.config.lora is None and model.config.prompt_style == "chatml"
    trained = load_file(out / "checkpoints" / "step-00000005" / "trainable.safetensors")
    torch.testing.assert_close(model.adapter.state_dict()["projection.weight"], trained["adapter.projection.weight"], rtol=0, atol=0)


def _instruct_recipe(tiny_folder, dataset, tmp_path, name):
    out = tmp_path / name
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(f"""
stage = "instruct"
out_dir = "{out}"
save_every = 2
log_every = 1
eval_every = 2
device = "cpu"
threads = 2
[model]
init_from = "{tiny_folder}"
[model.lora]
r = 4
[data]
dir = "{dataset}"
eval_items = 2
num_generations = 0
[optim]
lr = 1e-3
warmup_steps = 1
max_steps = 3
batch_size = 2
grad_accum = 2
""")
    return recipe, out


def test_stopped_run_resumes_exactly(tiny_folder, dataset, tmp_path):
    recipe, straight = _instruct_recipe(tiny_folder, dataset, tmp_path, "straight")
    assert train(load_train_config(recipe), progress=False).step == 3

    recipe2, split = _instruct_recipe(tiny_folder, dataset, tmp_path, "split")
    first = train(load_train_config(recipe2, ("stop_at_step=2",)), progress=False)
    assert first.step == 2 and not first.finished and not (split / "model").exists()
    parser = __import__("argparse").ArgumentParser()
    add_train_arguments(parser)
    assert run_train(parser.parse_args([str(recipe2), "--no-progress"])) == 0  # resumes by default

    a = load_file(straight / "checkpoints" / "step-00000003" / "trainable.safetensors")
    b = load_file(split / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert any("lora_A" in k for k in a) and any(k.startswith("adapter.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _rows(split, "loss")]
    assert steps == [1, 2, 3]
    assert _rows(split, "loss")[-1]["loss"] == pytest.approx(_rows(straight, "loss")[-1]["loss"], abs=0)
    model = OmnivoxModel.from_pretrained(split / "model")
    assert model.config.lora is not None and model.config.lora.r == 4
