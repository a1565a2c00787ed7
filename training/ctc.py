"""CTC over the LLM's own vocabulary on the audio tokens: a fast alignment objective.

The LLM reads audio tokens as input embeddings. Stage ``ctc`` (and the optional auxiliary
``ctc_loss_weight`` of the other stages) scores every audio token against the LLM's input
embedding table, ``logits = exp(log_scale) * token @ [E; blank]^T``, and trains the adapter
with CTC on the tokens of the clip's transcript. Audio tokens of speech are pulled towards
the embeddings of the words said, so that the frozen LLM meets something close to text; the
LLM is not run at all, which makes a step ~10x cheaper than the language-model loss on CPU.

The softmax runs over a sampled candidate set — every token of the batch's targets plus
``negatives`` random ids from the whole vocabulary (fresh each step) — instead of all
49,152 rows (the full softmax would cost more than the adapter itself).

The head itself lives in ``adapters/ctc.py`` (transcription decoding uses it too). It has
two trainable numbers of its own (a blank vector and a log scale), kept in the model folder
as ``ctc_head.safetensors``.
"""

from __future__ import annotations

from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead

__all__ = ["CTC_HEAD_FILE", "CTCHead", "transcript_of"]


def transcript_of(metadata: dict) -> str | None:
    """The spoken text of a synthetic item (``metadata["text"]``), or None for clips without speech."""
    text = metadata.get("text") if isinstance(metadata, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None
