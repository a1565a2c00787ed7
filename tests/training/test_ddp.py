"""Two CPU processes (torchrun, gloo): ranks end with identical weights and the loss goes down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from omnivox.training.config import load_train_config
from omnivox.training.trainer import Trainer


def _free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as err:
        pytest.skip(f"cannot bind a loopback port for the process group: {err}")


def test_two_process_gloo_run(fresh_recipe, tmp_path):
    out = tmp_path / "ddp"
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(fresh_recipe(out, threads=1, save_every=0))
    overrides = ["optim.max_steps=3", "optim.batch_size=2", "data.max_items=4", "optim.lr=5e-3"]
    Trainer(load_train_config(recipe, overrides), progress=False)  # builds the feature cache in this process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", "-m", "omnivox.training", "train", str(recipe), "--no-progress"]  # fmt: skip
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert len(set(summary["rank_checksums"])) == 1
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert (out / "model" / "adapter.safetensors").is_file()
