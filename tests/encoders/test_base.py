"""Small helpers shared by the encoders."""

from __future__ import annotations

import torch
from torch import nn

from omnivox.encoders.base import weights_loaded_after


def _builds_randomly(build) -> bool:
    """Whether building modules draws from torch's random generator (i.e. initialises randomly)."""
    state = torch.get_rng_state()
    build()
    drew = not torch.equal(state, torch.get_rng_state())
    torch.set_rng_state(state)
    return drew


def test_weights_loaded_after_skips_random_init_only_inside():
    def build():
        return nn.Sequential(nn.Linear(4, 3), nn.Embedding(5, 3), nn.Conv1d(2, 2, 3), nn.LayerNorm(3))

    with weights_loaded_after():
        assert not _builds_randomly(build)
        inside = build()
    assert _builds_randomly(build)  # restored afterwards
    reference = build().state_dict()
    inside.load_state_dict(reference, strict=True)  # what the helper is for: weights loaded right after
    assert all(torch.equal(inside.state_dict()[k], reference[k]) for k in reference)
    assert nn.LayerNorm(3).weight.eq(1).all()  # non-random inits are back too
