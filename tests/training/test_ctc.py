"""CTC against the LLM's embedding table: the head itself, and stage ``ctc`` / ``ctc_loss_weight`` runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from omnivox.agent.model import OmnivoxModel
from omnivox.training.config import ConfigError, load_train_config
from omnivox.training.ctc import CTC_HEAD_FILE, CTCHead, transcript_of
from omnivox.training.trainer import train


def _rows(out_dir, key):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def test_head_learns_a_transcript_and_greedy_collapses_repeats():
    torch.manual_seed(0)
    table = nn.Embedding(12, 8)
    table.weight.requires_grad_(False)
    head = CTCHead(table, negatives=4)
    tokens = nn.Parameter(torch.randn(2, 7, 8) * 0.1)  # two items, 7 audio tokens each
    targets = [[3, 3, 5], [7, 1]]  # a repeated id needs a blank between its copies
    optim = torch.optim.Adam([tokens, *head.parameters()], lr=0.1)
    first = None
    for _ in range(150):
        loss, count = head.loss(list(tokens), targets)
        assert count == 5
        first = float(loss.detach()) if first is None else first
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.05 * first
    assert head.greedy(tokens[0].detach()) == [3, 3, 5]
    assert head.greedy(tokens[1].detach()) == [7, 1]


def test_head_skips_items_without_transcript_and_checks_ids():
    table = nn.Embedding(10, 4)
    head = CTCHead(table, negatives=0)
    loss, count = head.loss([torch.randn(3, 4), torch.randn(5, 4)], [[], []])
    assert count == 0 and float(loss) == 0.0
    loss.backward()  # still connected to the head (DDP needs every parameter used)
    assert head.blank.grad is not None
    with pytest.raises(ValueError, match=r"outside the vocabulary of 10"):
        head.loss([torch.randn(3, 4)], [[12]])
    with pytest.raises(ValueError, match=r"2 token sequences but 1 targets"):
        head.loss([torch.randn(3, 4), torch.randn(3, 4)], [[1]])


def test_transcript_of():
    assert transcript_of({"text": "  hello  "}) == "hello"
    assert transcript_of({"text": ""}) is None and transcript_of({}) is None and transcript_of({"text": 3}) is None


def test_ctc_stage_lowers_its_loss_and_hands_its_head_to_the_next_stage(fresh_recipe, dataset, tmp_path):
    out = tmp_path / "ctc"
    recipe = tmp_path / "ctc.toml"
    recipe.write_text(fresh_recipe(out, stage="ctc", eval_every=6, ctc_negatives=16))
    config = load_train_config(recipe, ("optim.max_steps=6", "data.max_items=4"))  # one fixed batch of 4
    result = train(config, progress=False)
    assert result.finished and result.step == 6
    losses = [r["loss"] for r in _rows(out, "loss")]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    evals = _rows(out, "val_ctc_wer")
    assert evals and 0 <= evals[-1]["val_ctc_wer"] and evals[-1]["val_loss"] == evals[-1]["val_ctc_loss"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["instruction"] == "(CTC best path)" and samples[0]["reference"] in ("a high tone", "a low tone")
    head = load_file(out / "model" / CTC_HEAD_FILE)
    assert set(head) == {"blank", "log_scale"}
    model = OmnivoxModel.from_pretrained(out / "model")  # the head is an extra file; the folder loads as usual
    assert model.config.lora is None

    # stage align from the ctc model, with the auxiliary loss: the head carries over
    out2 = tmp_path / "align"
    recipe2 = tmp_path / "align.toml"
    recipe2.write_text(f"""
stage = "align"
out_dir = "{out2}"
ctc_loss_weight = 0.5
ctc_negatives = 16
device = "cpu"
[model]
init_from = "{out / 'model'}"
[data]
dir = "{dataset}"
[optim]
max_steps = 2
batch_size = 4
""")
    config2 = load_train_config(recipe2)
    from omnivox.training.trainer import Trainer

    trainer = Trainer(config2, progress=False)
    torch.testing.assert_close(trainer.ctc_head.blank.detach(), head["blank"], rtol=0, atol=0)
    stats = trainer.train_step()
    assert stats["ctc_labels"] > 0 and stats["labels"] > 0 and stats["loss"] > 0 and stats["ctc_loss"] > 0


def test_ctc_settings_are_checked(fresh_recipe, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(fresh_recipe(tmp_path / "x", ctc_loss_weight=-1.0))
    with pytest.raises(ConfigError, match=r"ctc_loss_weight must be >= 0, got -1.0"):
        load_train_config(recipe)
    recipe.write_text(fresh_recipe(tmp_path / "x", ctc_weight=0.3))  # the old name
    with pytest.raises(ConfigError, match=r"unknown key ctc_weight \(ctc_weight was renamed ctc_loss_weight\)"):
        load_train_config(recipe)
