"""CTC prefix scores against brute force over every alignment, and against torch's CTC loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnivox.adapters.ctc import CTCHead, CTCPrefixScorer


def _random_log_probs(frames: int, labels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(0, 1.5, (frames, labels + 1))).log_softmax(-1).numpy().astype(np.float32)


def _collapse(path, blank):
    out, previous = [], None
    for p in path:
        if p != previous and p != blank:
            out.append(p)
        previous = p
    return tuple(out)


def _brute_force(lp: np.ndarray) -> dict[tuple[int, ...], float]:
    """Probability of every collapsed label sequence, summed over all alignment paths."""
    frames, width = lp.shape
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(width), repeat=frames):
        seq = _collapse(path, width - 1)
        totals[seq] = totals.get(seq, 0.0) + float(np.exp(sum(lp[t, p] for t, p in enumerate(path))))
    return totals


def _state_of(scorer: CTCPrefixScorer, prefix):
    state, last = scorer.initial(), None
    for label in prefix:
        state = scorer.extend(state, last, [label])[0]
        last = label
    return state


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_and_final_scores_equal_brute_force_over_all_alignments(seed):
    lp = _random_log_probs(frames=5, labels=3, seed=seed)
    totals = _brute_force(lp)
    assert sum(totals.values()) == pytest.approx(1.0, abs=1e-5)
    scorer = CTCPrefixScorer(lp)
    for prefix in [(0,), (1,), (2, 2), (0, 1), (1, 0, 1), (2, 1, 2, 0)]:
        state = _state_of(scorer, prefix)
        starts_with = sum(p for seq, p in totals.items() if seq[: len(prefix)] == prefix)
        assert np.exp(state.score) == pytest.approx(starts_with, rel=1e-4, abs=1e-9), prefix
        assert np.exp(scorer.final_score(state)) == pytest.approx(totals.get(prefix, 0.0), rel=1e-4, abs=1e-9), prefix
    assert np.exp(scorer.final_score(scorer.initial())) == pytest.approx(totals[()], rel=1e-4)


def test_extending_many_candidates_at_once_equals_one_by_one():
    scorer = CTCPrefixScorer(_random_log_probs(frames=12, labels=6, seed=3))
    state = _state_of(scorer, (4, 4, 1))
    together = scorer.extend(state, 1, [0, 1, 4, 5])
    for label, joint in zip([0, 1, 4, 5], together, strict=True):
        alone = scorer.extend(state, 1, [label])[0]
        assert joint.score == pytest.approx(alone.score, abs=1e-5)
        np.testing.assert_allclose(joint.r_n, alone.r_n, atol=1e-5)


def test_final_score_is_torch_ctc_loss_on_longer_clips():
    lp = _random_log_probs(frames=40, labels=20, seed=4)
    scorer = CTCPrefixScorer(lp)
    target = [3, 3, 7, 0, 19, 5, 5, 5, 12]
    loss = F.ctc_loss(torch.tensor(lp)[:, None], torch.tensor([target]), torch.tensor([40]), torch.tensor([len(target)]),
                      blank=20, reduction="sum")  # fmt: skip
    assert scorer.final_score(_state_of(scorer, target)) == pytest.approx(-float(loss), abs=1e-3)


def test_labels_outside_the_vocabulary_and_bad_shapes():
    scorer = CTCPrefixScorer(_random_log_probs(frames=6, labels=4, seed=5))
    outside = scorer.extend(scorer.initial(), None, [4, 99, -1])  # 4 is the blank's column, not a label
    assert all(s.score == -np.inf for s in outside)
    with pytest.raises(ValueError, match=r"\[T >= 1, V \+ 1 >= 2\], got \(3,\)"):
        CTCPrefixScorer(np.zeros(3))


def test_the_heads_column_scorer_equals_the_full_table():
    torch.manual_seed(0)
    head = CTCHead(torch.nn.Embedding(50, 8))
    with torch.no_grad():
        head.blank.normal_()
        head.log_scale.fill_(0.7)
    tokens = torch.randn(30, 8)
    lazy, full = head.scorer(tokens, chunk=7), CTCPrefixScorer(head.log_probs(tokens))
    a, b = lazy.initial(), full.initial()
    np.testing.assert_allclose(a.r_b, b.r_b, rtol=1e-5)
    # Chunked logits vs one log_softmax reorder float32 sums over |logits| up to 30 (ulp 2e-6), then
    # 30 frames add up: abs 5e-4 = 8 such ulp a frame; rel 1e-5 for the float32 sums (-311: ulp 3e-5).
    for last, label in [(None, 3), (3, 3), (3, 41), (41, 0)]:
        a, b = lazy.extend(a, last, [label, 7, 49])[0], full.extend(b, last, [label, 7, 49])[0]
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=5e-4)
    assert lazy.final_score(a) == pytest.approx(full.final_score(b), rel=1e-5, abs=5e-4)
