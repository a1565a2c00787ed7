"""Joint CTC / LLM decoding of transcripts.

When a model folder carries its CTC head (``ctc_head.safetensors``) and the decoding settings
give ``ctc_fusion_weight > 0``, a request to transcribe one clip is decoded with the LLM's scores
fused with the CTC prefix scores of that clip (:class:`omnivox.adapters.ctc.CTCPrefixScorer`):
each step, the LLM's ``ctc_candidates`` most likely next tokens (and the stop token) are
rescored as

    (1 - w) * log p_LLM(c | prefix) + w * (log p_CTC(prefix + c ...) - log p_CTC(prefix ...))

and every other token is ruled out; the stop token's CTC term is the probability that the
clip reads exactly the prefix. Summed over the steps, the CTC terms telescope to the CTC
score of the whole answer, as in hybrid CTC/attention ASR (Watanabe et al. 2017). A small
LLM that would otherwise complete a sentence from its first words is held to what the audio
frames carry; greedy decoding and beam search both go through it.

Only transcription requests are fused (the transcription step, ``agent/transcription.py``,
decides which items those are): any other answer (a caption, a count, JSON) is not a
reading of the audio token by token, and CTC would penalise it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from omnivox.adapters.ctc import CTCPrefixScorer, PrefixState


class CTCFusion:
    """A logits processor fusing CTC prefix scores into the rows that transcribe a clip.

    A plain callable ``(input_ids [rows, t], scores [rows, V]) -> scores``, as transformers'
    ``LogitsProcessor`` interface asks (subclassing it would import transformers on every
    start).

    Args:
        scorers: per batch item, the CTC scorer of its clip, or None to leave the item's rows alone.
        weight: ``w`` above, in (0, 1].
        candidates: how many of the LLM's best next tokens are rescored each step.
        stop_ids: the ids that end an answer (the first is the one rescored as "stop").
        num_beams: rows per item (generate repeats each item ``num_beams`` times).
    """

    def __init__(
        self,
        scorers: Sequence[CTCPrefixScorer | None],
        weight: float,
        candidates: int,
        stop_ids: Sequence[int],
        num_beams: int = 1,
    ) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"CTC weight must be in (0, 1], got {weight}")
        if candidates < 1:
            raise ValueError(f"CTC candidates must be >= 1, got {candidates}")
        if not stop_ids:
            raise ValueError("CTC fusion needs the stop token ids")
        self.scorers = list(scorers)
        self.weight = float(weight)
        self.candidates = int(candidates)
        self.stop = int(stop_ids[0])
        self.stop_ids = {int(s) for s in stop_ids}
        self.num_beams = int(num_beams)
        self._prompt_length: int | None = None
        self._states: list[dict[tuple[int, ...], PrefixState]] = [
            {(): s.initial()} if s is not None else {} for s in self.scorers
        ]

    def _state(self, item: int, prefix: tuple[int, ...]) -> PrefixState:
        """The CTC state of ``prefix`` (kept from the step that chose it; rebuilt if it was not)."""
        states = self._states[item]
        state = states.get(prefix)
        if state is None:
            parent = self._state(item, prefix[:-1])
            state = self.scorers[item].extend(parent, prefix[-2] if len(prefix) > 1 else None, [prefix[-1]])[0]
            states[prefix] = state
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]  # ids before the first new token (0 with inputs_embeds)
        rows = input_ids.shape[0]
        if rows != len(self.scorers) * self.num_beams:
            raise ValueError(f"CTC fusion set up for {len(self.scorers)} items x {self.num_beams} beams, got {rows} rows")
        out = scores.clone()
        log_probs = scores.float().log_softmax(-1)
        kept: list[dict[tuple[int, ...], PrefixState]] = [{} for _ in self.scorers]
        for row in range(rows):
            item = row // self.num_beams
            scorer = self.scorers[item]
            if scorer is None:
                continue
            prefix = tuple(int(t) for t in input_ids[row, self._prompt_length :].tolist())
            if self.stop_ids.intersection(prefix):
                continue  # a finished row: generate pads it, whatever the scores say
            state = self._state(item, prefix)
            top = torch.topk(log_probs[row], min(self.candidates, log_probs.shape[-1])).indices.tolist()
            words = [c for c in dict.fromkeys(top) if c not in self.stop_ids]
            extended = scorer.extend(state, prefix[-1] if prefix else None, words)
            ctc = [s.score - state.score for s in extended] + [scorer.final_score(state) - state.score]
            ids = words + [self.stop]
            llm = log_probs[row, ids].cpu().numpy().astype(np.float64)
            fused = (1.0 - self.weight) * llm + self.weight * np.asarray(ctc, dtype=np.float64)
            if not np.isfinite(fused).any():  # the audio holds none of the candidates: leave the LLM alone
                continue
            out[row] = float("-inf")
            out[row, ids] = torch.as_tensor(fused, dtype=out.dtype, device=out.device)
            for word, new in zip(words, extended, strict=True):
                kept[item][prefix + (word,)] = new
            kept[item][prefix] = state
        for item, states in enumerate(kept):  # keep only the live prefixes' states
            if self.scorers[item] is not None:
                self._states[item] = states or self._states[item]
        return out
