"""Training runs on a CUDA device: the recipes that run on the CPU run on a GPU too.

Marked ``gpu``; ``pytest -m gpu`` runs them where a CUDA device is.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from omnivox.agent.model import OmnivoxModel
from omnivox.training.config import load_train_config
from omnivox.training.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _losses(out_dir, key="loss"):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _recipe(tiny_folder, dataset, tmp_path, name, *, stage="instruct", dtype="fp32", quantization="none",
            ctc_loss_weight=0.0, steps=6):  # fmt: skip
    out = tmp_path / name
    recipe = tmp_path / f"{name}.toml"
    lora = "[model.lora]\nr = 4\n" if stage == "instruct" else ""
    recipe.write_text(f"""
stage = "{stage}"
out_dir = "{out}"
save_every = 2
log_every = 1
eval_every = 3
device = "cuda"
dtype = "{dtype}"
quantization = "{quantization}"
ctc_loss_weight = {ctc_loss_weight}
[model]
init_from = "{tiny_folder}"
{lora}
[data]
dir = "{dataset}"
eval_items = 2
num_generations = 1
max_items = 4
[optim]
lr = 3e-3
warmup_steps = 0
max_steps = {steps}
batch_size = 4
scheduler = "constant"
""")
    return recipe, out


@pytest.mark.parametrize(
    ("dtype", "quantization", "ctc_loss_weight"),
    [("fp32", "none", 0.0), ("bf16", "none", 0.3), ("fp16", "none", 0.0), ("bf16", "4bit", 0.0)],
)
def test_instruct_run_on_cuda_lowers_the_loss_and_writes_a_model(tiny_folder, dataset, tmp_path, dtype, quantization, ctc_loss_weight):
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    recipe, out = _recipe(tiny_folder, dataset, tmp_path, f"{dtype}-{quantization}", dtype=dtype,
                          quantization=quantization, ctc_loss_weight=ctc_loss_weight)  # fmt: skip
    result = train(load_train_config(recipe), progress=False)
    assert result.finished and result.step == 6
    losses = _losses(out)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.1, f"{dtype}/{quantization}: one fixed batch, loss {losses}"
    assert _losses(out, "val_loss")
    model = OmnivoxModel.from_pretrained(out / "model")  # trained on the GPU, loads on the CPU
    assert model.config.lora is not None and model.config.lora.r == 4


def test_ctc_stage_on_cuda(tiny_folder, dataset, tmp_path):
    recipe, out = _recipe(tiny_folder, dataset, tmp_path, "ctc", stage="ctc", dtype="bf16")
    result = train(load_train_config(recipe), progress=False)
    assert result.finished
    losses = _losses(out)
    assert losses[-1] < losses[0], losses


def test_stopped_cuda_run_resumes_where_it_stopped(tiny_folder, dataset, tmp_path):
    recipe, straight = _recipe(tiny_folder, dataset, tmp_path, "straight", steps=4)
    train(load_train_config(recipe), progress=False)
    recipe2, split = _recipe(tiny_folder, dataset, tmp_path, "split", steps=4)
    first = train(load_train_config(recipe2, ("stop_at_step=2",)), progress=False)
    assert first.step == 2 and not first.finished
    second = train(load_train_config(recipe2), progress=False)
    assert second.finished and second.step == 4
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    a = load_file(straight / "checkpoints" / "step-00000004" / "trainable.safetensors")
    b = load_file(split / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # GPU kernels may reorder sums: equal up to float rounding, not bit for bit
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
