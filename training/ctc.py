"""CTC over the LLM's own vocabulary on the audio tokens: a fast alignment objective.

The LLM reads audio tokens as input embeddings. Stage ``ctc`` (and the optional auxiliary
``ctc_weight`` of the other stages) scores every audio token against the LLM's input
embedding table, ``logits = exp(log_scale) * token @ [E; blank]^T``, and trains the adapter
with CTC on the tokens of the clip's transcript. Audio tokens of speech are pulled towards
the embeddings of the words said, so that the frozen LLM meets something close to text; the
LLM is not run at all, which makes a step ~10x cheaper than the language-model loss on CPU.

The softmax runs over a sampled candidate set — every token of the batch's targets plus
``negatives`` random ids from the whole vocabulary (fresh each step) — instead of all
49,152 rows (the full softmax would cost more than the adapter itself).

The head has two trainable numbers of its own (a blank vector and a log scale); they are
not part of the model folder's format and are kept next to it as ``ctc_head.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def transcript_of(metadata: dict) -> str | None:
    """The spoken text of a synthetic item (``metadata["text"]``), or None for clips without speech."""
    text = metadata.get("text") if isinstance(metadata, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None
