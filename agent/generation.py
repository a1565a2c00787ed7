"""What decoding is asked for (:class:`GenerationSettings`) and what it gives (:class:`Generation`).

A model folder may store its default decoding (``config.json``'s ``"generation"``): it is read
into the same typed :class:`GenerationSettings` a caller passes, so a folder cannot hold a
setting a caller could not.

:class:`Generation` is the one result type of :meth:`OmnivoxModel.generate`: the text, the task
calls (filled in one place, :meth:`OmnivoxModel.result`, from the ids the LLM produced) and,
when speech is asked for, the audio the speech head made of the text (``Assistant.speak``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from omnivox.errors import CheckpointError, UserInputError

if TYPE_CHECKING:
    from omnivox.agent.tools import ToolCall
    from omnivox.decoders.speech import SpokenAudio


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. The defaults are SALMONN's reference decoding (beam 4, no sampling).

    SALMONN passes ``min_length=1``, but under transformers 4.28 its ``generate`` counts a
    leading BOS id in that length, so the end token may come first; ``min_new_tokens=0``
    reproduces that.

    ``ctc_fusion_weight`` > 0 decodes transcription requests jointly with the folder's CTC head,
    when it has one (``agent/ctc_fusion.py``): each step the LLM's ``ctc_fusion_candidates``
    best next tokens are rescored. ``use_transcriber`` lets the folder's Whisper transcriber
    answer transcription requests, when it has one (``TranscriberSettings``); False: the LLM
    answers them like any other request. Both act in the transcription step
    (``agent/transcription.py``), which decides what a transcription request is.
    """

    max_new_tokens: int = 200
    num_beams: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    ctc_fusion_weight: float = 0.0
    ctc_fusion_candidates: int = 8
    use_transcriber: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = {"int": int, "bool": bool, "float": (int, float)}[f.type]
            if (isinstance(value, bool) and f.type != "bool") or not isinstance(value, wanted):
                raise UserInputError(f"{f.name} must be {'a number' if f.type == 'float' else f.type}, got {value!r}")
        if self.max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UserInputError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.temperature <= 0:
            raise UserInputError(f"sampling needs temperature > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.ctc_fusion_weight <= 1:
            raise UserInputError(f"ctc_fusion_weight must be in [0, 1], got {self.ctc_fusion_weight}")
        if self.ctc_fusion_candidates < 1:
            raise UserInputError(f"ctc_fusion_candidates must be >= 1, got {self.ctc_fusion_candidates}")

    @classmethod
    def greedy(cls, **overrides) -> GenerationSettings:
        return replace(cls(num_beams=1), **overrides)

    def override(self, **overrides) -> GenerationSettings:
        """These settings with ``overrides`` applied (a bad value raises UserInputError)."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise UserInputError(f"unknown decoding settings {unknown}; known: {sorted(f.name for f in fields(self))}")
        return replace(self, **overrides)

    @classmethod
    def from_dict(cls, data: Any, source: str = "generation") -> GenerationSettings:
        """Settings from a JSON object of fields (a model folder's defaults); errors name ``source``."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source} must be an object of decoding settings, got {type(data).__name__}")
        try:
            return cls().override(**data)
        except UserInputError as err:
            raise CheckpointError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a model folder stores)."""
        default = asdict(type(self)())
        return {k: v for k, v in asdict(self).items() if v != default[k]}


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class Generation:
    """One answer of the model.

    Attributes:
        text: the answer's text (without the stop token).
        token_ids: the ids the LLM produced, up to and including the first stop token.
        finish_reason: "stop" when the LLM ended the answer, "length" when ``max_new_tokens`` did,
            "tool_calls" when the answer is calls (``tool_calls``).
        source: what produced the text: "llm", or the step that answered instead (e.g.
            "transcriber" when the Whisper transcriber chose a transcript).
        details: what that step wants a caller to see (e.g. the transcript candidates and scores).
        tool_calls: the calls the model made (``agent/tools.py``), in order; ``text`` is then "".
        audio: the answer spoken (``decoders/speech.py``: waveform, sample rate, codes), when
            speech was asked for; None otherwise.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    source: str = "llm"
    details: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[ToolCall] = field(default_factory=list)
    audio: SpokenAudio | None = None


class CallbackStreamer:
    """Streams decoded text pieces of a single sequence to a callback (transformers' streamer API).

    Text after a stop token is never sent (generate may go on emitting pad ids).
    """

    def __init__(self, tokenizer, callback: Callable[[str], None], stop_ids: Sequence[int]) -> None:
        from omnivox.agent.streaming import TextStreamer

        outer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    callback(text)

            def put(self, value: torch.Tensor) -> None:
                if outer.stopped:
                    return
                ids = value.reshape(-1).tolist()
                if any(i in outer.stop_ids for i in ids):
                    outer.stopped = True
                    return
                super().put(value)

        self.stop_ids = set(stop_ids)
        self.stopped = False
        self.streamer = _Streamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
