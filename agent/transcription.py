"""The transcription step: requests to transcribe a clip, answered with what reads speech best.

A model folder may carry two aids for transcripts besides the LLM: a CTC head
(``ctc_head.safetensors``, joint decoding in ``agent/ctc_fusion.py``) and a Whisper
transcriber (``TranscriberSettings``, ``agent/transcriber.py``). Neither belongs in the
model's generation path: this step decides which items of a batch ask for a transcript
(:func:`transcript_request`) and answers those with them; every other item goes to the model
as it is. :class:`omnivox.agent.assistant.Assistant` composes it around the model.

For a transcription request:

1. unless the transcriber answers alone (its ``llm_weight`` is 0), the LLM answers, decoded
   jointly with the CTC head when ``GenerationSettings.ctc_fusion_weight`` > 0;
2. with the transcriber (and ``use_transcriber``), Whisper's N best transcripts and the LLM's
   answer are the candidates, and the answer is the one with the highest weighted sum of
   Whisper, LLM and CTC log-probabilities (``TranscriberSettings``). Clips over 30 s get
   Whisper's long-form transcript.

Streaming: an answer the transcriber chooses is known only once every candidate is scored, so
it reaches ``on_text`` whole, at the end; every other answer streams token by token.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from omnivox.adapters.ctc import CTCPrefixScorer
from omnivox.agent.config import TranscriberSettings
from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.model import Clip, EncodedClip, OmnivoxModel, clip_tokens
from omnivox.agent.transcriber import WhisperTranscriber
from omnivox.errors import UserInputError
from omnivox.prompts import Message

log = logging.getLogger(__name__)

_TRANSCRIBE = re.compile(
    r"\b(transcri(be|bed|bing|ption|pt)|word for word|verbatim|dictat\w*|"
    r"write down (exactly |precisely )?what|what (is|was|are|were) (being |they |he |she )?(said|saying|spoken)|"
    r"what('s| is) said|what (does|did|do) (the |this )?(voice|speaker|person|man|woman|narrator|he|she|they|it) say)\b",
    re.IGNORECASE,
)
# answers that are not the words alone: a format, a summary, a translation, a question about them
_OTHER_ANSWER = re.compile(
    r"\b(json|list|bullet|one word|single word|summar\w*|translat\w*|how many|count|language|who|why|"
    r"colou?r|number of|yes or no|emotion|tone of)\b",
    re.IGNORECASE,
)
# "Reply in JSON as {"text": "..."}" and the like: the words alone, wrapped in a JSON object
_JSON_WRAP = re.compile(r"\b(reply|answer|respond|return|format|output)?\s*(in|as)\s+json\b[^.?!]*", re.IGNORECASE)
_JSON_KEY = re.compile(r'\{\s*"([^"]+)"\s*:')


def is_transcription_request(text: str) -> bool:
    """True for an instruction that asks for the spoken words alone ("Transcribe the speech.", "What is said?")."""
    return bool(_TRANSCRIBE.search(text)) and not _OTHER_ANSWER.search(text)


def is_json_transcription_request(text: str) -> bool:
    """True for a transcription request whose answer is to be a JSON object
    ('What is said? Reply in JSON as {"text": "..."}.')."""
    if not _JSON_WRAP.search(text):
        return False
    rest = _JSON_WRAP.sub(" ", re.sub(r"\{[^{}]*\}", " ", text))  # without the JSON clause and its example
    return is_transcription_request(rest) and "json" not in rest.lower()


@dataclass(frozen=True)
class TranscriptRequest:
    """A request for the words of one clip.

    Attributes:
        json_key: None for the words alone; else the answer is ``{json_key: words}`` as JSON (the
            key the instruction names, default "text").
    """

    json_key: str | None = None


def transcript_request(messages: Sequence[Message], clips: Sequence[Clip]) -> TranscriptRequest | None:
    """What a conversation asks for when its last turn is a user's asking to transcribe its one clip, else None."""
    last = messages[-1] if messages else None
    if last is None or last.role != "user" or len(clips) != 1:
        return None
    if is_transcription_request(last.text):
        return TranscriptRequest()
    if is_json_transcription_request(last.text):
        named = _JSON_KEY.search(last.text)
        return TranscriptRequest(named.group(1) if named else "text")
    return None


class TranscriptionStep:
    """Answers a batch: transcription requests with the CTC head and the Whisper transcriber, the rest by the model.

    Args:
        model: the model.
        transcriber: the folder's Whisper transcriber, a function that loads it (called on the
            first request it answers), or None.
        weights: how the transcriber's candidates are scored (the folder's ``config.transcriber``);
            required with a transcriber.
    """

    def __init__(
        self,
        model: OmnivoxModel,
        transcriber: WhisperTranscriber | Callable[[], WhisperTranscriber] | None = None,
        weights: TranscriberSettings | None = None,
    ) -> None:
        if transcriber is not None and weights is None:
            raise ValueError("a transcriber needs its TranscriberSettings (the weights that combine its scores)")
        self.model = model
        self.weights = weights
        self._transcriber = transcriber if isinstance(transcriber, WhisperTranscriber) else None
        self._load = None if isinstance(transcriber, WhisperTranscriber) else transcriber

    @property
    def has_transcriber(self) -> bool:
        """A transcriber is configured (loaded or not yet)."""
        return self._transcriber is not None or self._load is not None

    @property
    def transcriber(self) -> WhisperTranscriber | None:
        """The Whisper transcriber, loaded on first use; None without one."""
        if self._transcriber is None and self._load is not None:
            self._transcriber, self._load = self._load(), None
        return self._transcriber

    def generate(
        self,
        conversations: Sequence[list[Message]],
        audio: Sequence[Sequence[Clip]],
        settings: GenerationSettings,
        on_text: Callable[[str], None] | None = None,
    ) -> list[Generation]:
        """Answers for a batch, each as the model would give it alone (see the module docstring)."""
        if len(conversations) != len(audio):
            raise UserInputError(f"{len(conversations)} conversations but audio for {len(audio)}")
        if on_text is not None and len(conversations) != 1:
            raise UserInputError(f"streaming needs a batch of one, got {len(conversations)} conversations")
        requests = [transcript_request(m, c) for m, c in zip(conversations, audio, strict=True)]
        chosen = {i for i, r in enumerate(requests) if r is not None and self._transcriber_answers(audio[i], settings)}
        llm_items = [i for i in range(len(conversations)) if i not in chosen or self.weights.llm_weight > 0]
        scorers = {
            i: self.model.ctc_head.scorer(clip_tokens(audio[i][0]))
            for i in llm_items
            if requests[i] is not None and requests[i].json_key is None and self._fuses(settings)
        }
        answers: dict[int, Generation] = {}
        if llm_items:
            processors = []
            if scorers:
                from omnivox.agent.ctc_fusion import CTCFusion

                rows = [scorers.get(i) for i in llm_items]
                stop = self.model.processor.stop_ids
                processors.append(
                    CTCFusion(rows, settings.ctc_fusion_weight, settings.ctc_fusion_candidates, stop, settings.num_beams)
                )
            stream = on_text if not chosen else None  # a chosen transcript is sent whole below
            out = self.model.generate(
                [conversations[i] for i in llm_items], [audio[i] for i in llm_items], settings, stream, processors
            )
            answers.update(zip(llm_items, out, strict=True))
        for i in sorted(chosen):
            clip = audio[i][0]
            own = answers[i].text if i in answers else None
            text, details = self._choose(conversations[i], clip, requests[i], own, scorers.get(i))
            ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.model.processor.stop_ids[0]]
            answers[i] = Generation(text, ids, "stop", source="transcriber", details=details)
            if on_text is not None:
                on_text(text)
        return [answers[i] for i in range(len(conversations))]

    def _fuses(self, settings: GenerationSettings) -> bool:
        return settings.ctc_fusion_weight > 0 and self.model.ctc_head is not None

    def _transcriber_answers(self, clips: Sequence[Clip], settings: GenerationSettings) -> bool:
        """The transcriber chooses this request's answer (it needs the clip's samples)."""
        if not self.has_transcriber or not settings.use_transcriber:
            return False
        if not isinstance(clips[0], EncodedClip) or clips[0].samples is None:
            log.debug("a transcript request without the clip's samples: the LLM answers it")
            return False
        return True

    def _choose(
        self,
        messages: list[Message],
        clip: EncodedClip,
        request: TranscriptRequest,
        llm_answer: str | None,
        scorer: CTCPrefixScorer | None,
    ) -> tuple[str, dict]:
        """The transcript of one clip: Whisper's best candidates and the LLM's answer, scored.

        Args:
            messages: the conversation (for the LLM's score).
            clip: the clip (tokens and samples).
            request: what is asked (the words alone, or wrapped in JSON).
            llm_answer: what the LLM answered, or None when it was not asked (``llm_weight`` 0).
            scorer: the clip's CTC scorer when joint decoding already built it (else built here).

        Returns:
            the answer, and the candidates with their scores (for ``Generation.details``).
        """
        import whisper

        transcriber, weights, model = self.transcriber, self.weights, self.model
        key = request.json_key
        own = (llm_answer or "").strip()
        if key is not None:
            own, key = _json_value(own, key)

        def answer(text: str) -> str:
            return text if key is None else json.dumps({key: text}, ensure_ascii=False)

        samples = clip.samples
        if samples.shape[0] > whisper.audio.N_SAMPLES:
            return answer(transcriber.transcribe_long(samples)), {"long_form": True}
        features = transcriber.encode(samples)  # [1, n_audio_ctx, D]
        candidates = [c for c in dict.fromkeys([h.text for h in transcriber.nbest(features)] + [own]) if c]
        if len(candidates) < 2:
            text = answer(candidates[0] if candidates else "")
            return text, {"candidates": candidates}
        total = np.zeros(len(candidates))
        if weights.whisper_weight:
            total += weights.whisper_weight * np.asarray(transcriber.score(features, candidates))
        if weights.llm_weight:
            scores, _ = model.score_answers(messages, [clip], [answer(c) for c in candidates])
            total += weights.llm_weight * np.asarray(scores)
        if weights.ctc_rescore_weight and model.ctc_head is not None:
            scorer = model.ctc_head.scorer(clip.tokens) if scorer is None else scorer
            ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
            total += weights.ctc_rescore_weight * np.asarray([scorer.sequence_score(i) for i in ids])
        with np.errstate(invalid="ignore"):
            best = int(np.argmax(np.where(np.isnan(total), -np.inf, total)))
        log.debug("transcript candidates %s, scores %s", candidates, total.round(2).tolist())
        return answer(candidates[best]), {"candidates": candidates, "scores": total.tolist()}


def _json_value(answer: str, key: str) -> tuple[str, str]:
    """The words of an answer that should be ``{key: words}``, and the key to answer with: the
    answer's own single string value and key when it is such an object, else no words and ``key``."""
    try:
        parsed = json.loads(answer)
    except json.JSONDecodeError:
        return "", key
    if isinstance(parsed, dict) and len(parsed) == 1:
        ((name, value),) = parsed.items()
        if isinstance(value, str):
            return value.strip(), name
    return "", key
