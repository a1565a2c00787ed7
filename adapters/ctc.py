"""CTC over the LLM's own vocabulary on the audio tokens: the head, and prefix scoring for decoding.

The LLM reads audio tokens as input embeddings. The CTC head scores every audio token
against the LLM's input embedding table, ``logits = exp(log_scale) * token @ [E; blank]^T``;
training (``training/ctc.py``, stage ``ctc`` and the auxiliary ``ctc_loss_weight``) uses it to
pull the audio tokens of speech towards the embeddings of the words said.

At inference the same head gives per-token log-probabilities over the vocabulary plus a
blank, and :class:`CTCPrefixScorer` turns them into prefix scores: the log-probability that
the audio's CTC alignment *begins* with a given token sequence (Watanabe et al. 2017, "Hybrid
CTC/attention architecture for end-to-end speech recognition", algorithm 2; the
"partial scoring" of ESPnet). Adding these to the LLM's scores while it writes a transcript
(``agent/ctc_fusion.py``) keeps the words tied to the audio frames: a continuation the audio
does not hold, or a stop before the audio is used up, scores low.

The head has two trainable numbers of its own (a blank vector and a log scale); they are
not part of the SALMONN format and are kept next to the model as ``ctc_head.safetensors``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CTC_HEAD_FILE = "ctc_head.safetensors"


class CTCHead(nn.Module):
    """CTC scoring of audio tokens [N, H] against a frozen embedding table [V, H] plus a blank."""

    def __init__(self, embedding: nn.Embedding, negatives: int = 8192) -> None:
        super().__init__()
        weight = embedding.weight
        self._embedding = [embedding]  # frozen and owned by the LLM: not a submodule
        self.vocab_size = int(weight.shape[0])
        self.negatives = int(negatives)
        self.blank = nn.Parameter(torch.zeros(weight.shape[1], dtype=torch.float32))
        self.log_scale = nn.Parameter(torch.zeros((), dtype=torch.float32))

    def logits(self, tokens: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """[N, H] -> [N, C + 1]: scores of ``candidates`` (default all ids), blank last."""
        table = self._embedding[0].weight.detach()
        if candidates is not None:
            table = table[candidates]
        table = torch.cat([table.to(tokens.dtype), self.blank.to(tokens.dtype)[None]], 0)  # [C + 1, H]
        return self.log_scale.exp().to(tokens.dtype) * tokens @ table.T

    def loss(self, tokens: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Summed CTC loss over the items that have a target, and their number of target tokens.

        Args:
            tokens: per item its audio tokens [N_i, H].
            targets: per item its transcript's token ids (empty: the item has no transcript
                and is skipped).
        """
        if len(tokens) != len(targets):
            raise ValueError(f"CTC: {len(tokens)} token sequences but {len(targets)} targets")
        keep = [i for i, t in enumerate(targets) if len(t)]
        # keeps the head in the graph of every step (DDP needs every parameter used)
        zero = 0.0 * (self.blank.sum() + self.log_scale)
        if not keep:
            return zero, 0
        device = tokens[0].device
        used = sorted({int(v) for i in keep for v in targets[i]})
        bad = [v for v in used if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"CTC target ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        extra = torch.randint(0, self.vocab_size, (self.negatives,)).tolist() if self.negatives else []
        candidates = used + sorted(set(extra) - set(used))
        where = {v: k for k, v in enumerate(candidates)}
        sizes = [tokens[i].shape[0] for i in keep]
        flat = torch.cat([tokens[i] for i in keep])  # [sum N, H]
        cand = torch.tensor(candidates, device=device)
        log_probs = self.logits(flat, cand).float().log_softmax(-1)  # [sum N, C + 1]
        longest = max(sizes)
        padded = log_probs.new_zeros(longest, len(keep), log_probs.shape[-1])  # [T, B, C + 1]
        for j, piece in enumerate(log_probs.split(sizes)):
            padded[: piece.shape[0], j] = piece
        flat_targets = torch.tensor([where[int(v)] for i in keep for v in targets[i]], device=device)
        target_lengths = torch.tensor([len(targets[i]) for i in keep], device=device)
        loss = F.ctc_loss(
            padded,
            flat_targets,
            torch.tensor(sizes, device=device),
            target_lengths,
            blank=len(candidates),
            reduction="sum",
            zero_infinity=True,  # a clip too short for its transcript adds nothing instead of inf
        )
        return loss + zero, int(target_lengths.sum())

    @torch.no_grad()
    def greedy(self, tokens: torch.Tensor) -> list[int]:
        """Best path over the whole vocabulary of one item's tokens [N, H]: ids, repeats and blanks removed."""
        best = self.logits(tokens).argmax(-1).tolist()
        out, previous = [], None
        for b in best:
            if b != previous and b != self.vocab_size:
                out.append(b)
            previous = b
        return out

    @torch.no_grad()
    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V + 1] float32 log-probabilities over the whole vocabulary, blank last."""
        return self.logits(tokens).float().log_softmax(-1)

    @torch.no_grad()
    def scorer(self, tokens: torch.Tensor, chunk: int = 256) -> CTCPrefixScorer:
        """The prefix scorer of one clip's audio tokens [N, H], holding O(N) numbers, not O(N V)."""
        tokens = tokens.detach()
        norms = torch.cat([self.logits(part).float().logsumexp(-1) for part in tokens.split(chunk)])  # [N]
        device = self._embedding[0].weight.device

        @torch.no_grad()  # called later, while decoding
        def scores(ids) -> torch.Tensor:  # [N, len(ids) + 1] log-probabilities, blank last
            return self.logits(tokens, torch.as_tensor(ids, dtype=torch.long, device=device)).float() - norms[:, None]

        blank = scores([])[:, -1].cpu().numpy()
        return CTCPrefixScorer.from_columns(blank, self.vocab_size, lambda ids: scores(ids)[:, :-1].cpu().numpy())


@dataclass(frozen=True)
class PrefixState:
    """CTC forward variables of one prefix: log-probabilities of the prefix having been read
    by frame t ending in a non-blank (``r_n``) or a blank (``r_b``), and its prefix score."""

    r_n: np.ndarray  # [T]
    r_b: np.ndarray  # [T]
    score: float


class CTCPrefixScorer:
    """Prefix scores of token sequences under one clip's CTC log-probabilities.

    Args:
        log_probs: [T, V + 1] log-probabilities of the clip's T audio tokens, blank last.

    :meth:`CTCHead.scorer` builds one without the [T, V + 1] table (for long clips it would
    take gigabytes): it keeps the audio tokens and computes a candidate's column when asked.
    """

    def __init__(self, log_probs: torch.Tensor | np.ndarray) -> None:
        lp = np.asarray(log_probs.detach().cpu() if isinstance(log_probs, torch.Tensor) else log_probs, np.float32)
        if lp.ndim != 2 or lp.shape[0] < 1 or lp.shape[1] < 2:
            raise ValueError(f"CTC log-probabilities must be [T >= 1, V + 1 >= 2], got {tuple(lp.shape)}")
        self.vocab_size = lp.shape[1] - 1
        self.num_frames = lp.shape[0]
        self.blank_log_probs = lp[:, -1]
        self._columns: Callable[[np.ndarray], np.ndarray] = lambda ids: lp[:, ids]

    @classmethod
    def from_columns(
        cls, blank_log_probs: np.ndarray, vocab_size: int, columns: Callable[[np.ndarray], np.ndarray]
    ) -> CTCPrefixScorer:
        """A scorer whose label columns come from ``columns(ids) -> [T, len(ids)]`` log-probabilities."""
        scorer = cls.__new__(cls)
        scorer.blank_log_probs = np.asarray(blank_log_probs, np.float32)
        scorer.num_frames = int(scorer.blank_log_probs.shape[0])
        scorer.vocab_size = int(vocab_size)
        scorer._columns = columns
        return scorer

    def initial(self) -> PrefixState:
        """The empty prefix: every frame so far blank; its prefix score is log 1."""
        r_b = np.cumsum(self.blank_log_probs, dtype=np.float32)
        return PrefixState(np.full(self.num_frames, -np.inf, np.float32), r_b, 0.0)

    def final_score(self, state: PrefixState) -> float:
        """Log-probability that the whole clip reads exactly this prefix (the score of stopping)."""
        return float(np.logaddexp(state.r_n[-1], state.r_b[-1]))

    def sequence_score(self, ids: Sequence[int]) -> float:
        """Log-probability that the whole clip reads exactly ``ids`` (CTC's sequence score)."""
        state, last = self.initial(), None
        for token in ids:
            state = self.extend(state, last, [int(token)])[0]
            last = int(token)
        return self.final_score(state)

    def extend(self, state: PrefixState, last: int | None, candidates: Sequence[int]) -> list[PrefixState]:
        """The states of ``prefix + c`` for each candidate id ``c`` (``last``: the prefix's last id, None if empty).

        Ids outside the CTC vocabulary get the score -inf.
        """
        cands = np.asarray(candidates, dtype=np.int64)
        inside = (cands >= 0) & (cands < self.vocab_size)
        lp = np.full((self.num_frames, len(cands)), -np.inf, np.float32)
        if inside.any():
            lp[:, inside] = self._columns(cands[inside])
        blank = self.blank_log_probs
        # phi[t]: the prefix read by frame t, in a way that the next frame may start a new label
        # c (a repeated label needs a blank in between, so only r_b counts for c == last)
        phi = np.repeat(np.logaddexp(state.r_n, state.r_b)[:, None], len(cands), axis=1)
        if last is not None:
            phi[:, cands == last] = state.r_b[:, None]
        r_n = np.full_like(lp, -np.inf)
        r_b = np.full_like(lp, -np.inf)
        if last is None:
            r_n[0] = lp[0]
        for t in range(1, self.num_frames):
            r_n[t] = np.logaddexp(r_n[t - 1], phi[t - 1]) + lp[t]
            r_b[t] = np.logaddexp(r_b[t - 1], r_n[t - 1]) + blank[t]
        with np.errstate(divide="ignore"):
            starts = np.concatenate([r_n[:1], phi[:-1] + lp[1:]], axis=0)  # label c begins at frame t
            scores = np.logaddexp.reduce(starts, axis=0)
        return [PrefixState(r_n[:, k].copy(), r_b[:, k].copy(), float(scores[k])) for k in range(len(cands))]
