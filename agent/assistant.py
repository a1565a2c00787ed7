"""The model with the steps composed around it: what ``omnivox chat``, the evaluation and the demo answer with.

:class:`OmnivoxModel` answers every request the same way. A model folder may also name
steps that answer some requests otherwise; today one, the transcription step
(``agent/transcription.py``: joint CTC decoding and the Whisper transcriber). A folder with a
``talker/`` can also speak (``decoders/speech.py``): the LLM decides what is said, the speech
head says it. The assistant holds the model and its steps; callers that want the model alone
use the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnivox.agent.constrained import AnswerFormat
from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.loading import load_parts
from omnivox.agent.model import Clip, EncodedClip, OmnivoxModel
from omnivox.agent.tools import ToolCall
from omnivox.agent.transcriber import WhisperTranscriber
from omnivox.agent.transcription import TranscriptionStep
from omnivox.decoders.speech import TALKER_DIR, SpeechHead, read_talker_json
from omnivox.errors import UserInputError
from omnivox.prompts import Message, ToolSpec, clip_label, tools_text


def offer_tools(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[Message]:
    """The conversation as the model sees it when ``tools`` are offered.

    The tool list (``prompts.tools.tools_text``) is the system turn (after the caller's own
    system text, if any) and every clip is labelled ``clip-1``, ``clip-2``, ... in order, so
    the model can name them in calls.
    """
    out: list[Message] = []
    offered = tools_text(tools)
    if messages and messages[0].role == "system":
        out.append(Message("system", f"{messages[0].text.strip()}\n\n{offered}"))
        messages = messages[1:]
    else:
        out.append(Message("system", offered))
    clips = 0
    for message in messages:
        if message.num_audio:
            labels = tuple(clip_label(clips + k) for k in range(message.num_audio))
            message = replace(message, audio_labels=labels)
            clips += message.num_audio
        out.append(message)
    return out


class Assistant:
    """A model, its transcription step and its speech head.

    Args:
        model: the model.
        transcriber: the folder's Whisper transcriber (needs ``model.config.transcriber``), a
            function that loads it on first use, or None.
        speech: the folder's speech head, a function that loads it on first use, or None (the
            model answers in text only).
        speech_tasks: what a speech head that loads on first use was trained for (its
            ``talker.json`` tasks: ``tts``, ``ns``, ...); read from a loaded head otherwise.
    """

    def __init__(
        self, model: OmnivoxModel, transcriber: WhisperTranscriber | Callable[[], WhisperTranscriber] | None = None,
        speech: SpeechHead | Callable[[], SpeechHead] | None = None, speech_tasks: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        if transcriber is not None and model.config.transcriber is None:
            raise ValueError("config.transcriber is None: it holds the weights that combine the transcriber's scores")
        self.model = model
        self.transcription = TranscriptionStep(model, transcriber, model.config.transcriber)
        self._speech = speech
        self._speech_tasks = tuple(speech_tasks)

    @property
    def can_speak(self) -> bool:
        """The model folder has a speech head (it loads on the first request for audio)."""
        return self._speech is not None

    @property
    def speech_tasks(self) -> tuple[str, ...]:
        """The tasks the speech head does (``decoders/speech.py`` ``TASKS``); () when the model cannot speak."""
        if self._speech is None:
            return ()
        if isinstance(self._speech, SpeechHead):
            return tuple(self._speech.tasks)
        return self._speech_tasks

    @property
    def speech(self) -> SpeechHead:
        """The speech head (loaded now if it was not yet); a clear error when the folder has none."""
        if self._speech is None:
            raise UserInputError("this model folder cannot speak: it has no talker/ (see the README, 'Audio out')")
        if not isinstance(self._speech, SpeechHead):
            self._speech = self._speech()
        return self._speech

    def say(self, text: str, voice: str | None = None, on_audio: Callable[[np.ndarray], None] | None = None,
            **options: Any) -> Generation:  # fmt: skip
        """Text to speech: ``text`` spoken by the speech head (``SpeechHead.say``'s ``options``)."""
        spoken = self.speech.say(text, voice, on_audio=on_audio, **options)
        return Generation(text, [], "stop", source="talker", audio=spoken)

    def speak(self, answer: Generation, voice: str | None = None, on_audio: Callable[[np.ndarray], None] | None = None,
              **options: Any) -> Generation:  # fmt: skip
        """``answer`` with its text spoken (``answer.audio``); an answer that is task calls, or
        has no text, stays silent."""
        if answer.tool_calls or not answer.text.strip():
            return answer
        return replace(answer, audio=self.speech.say(answer.text, voice, on_audio=on_audio, **options))

    @property
    def transcriber(self) -> WhisperTranscriber | None:
        """The Whisper transcriber (loaded now if it was not yet), or None."""
        return self.transcription.transcriber

    @property
    def has_transcriber(self) -> bool:
        """A Whisper transcriber is configured (it loads on the first transcription request)."""
        return self.transcription.has_transcriber

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, transcriber: bool = True, **options) -> Assistant:
        """Load a model folder with its steps.

        Args:
            folder: the model folder.
            transcriber: False: without the Whisper transcriber; True: its weights load on the
                first transcription request.
            options: as :meth:`OmnivoxModel.from_pretrained` (device, dtype, quantization,
                lora_scale, merge_lora).
        """
        parts = load_parts(folder, transcriber=transcriber, **options)
        speech, tasks = None, ()
        if SpeechHead.present(folder):
            device, dtype = options.get("device") or "cpu", options.get("dtype") or torch.float32
            speech = lambda: SpeechHead.from_folder(folder, device, dtype)  # noqa: E731  (loads on first use)
            tasks = tuple(read_talker_json(Path(folder) / TALKER_DIR)["tasks"])
        return cls(OmnivoxModel.from_parts(parts), parts.transcriber, speech, tasks)

    def settings(self, **overrides) -> GenerationSettings:
        """The folder's default decoding with ``overrides``."""
        return self.model.config.generation.override(**overrides)

    def encode_clip(self, samples: np.ndarray | torch.Tensor) -> EncodedClip:
        return self.model.encode_clip(samples)

    def generate(
        self,
        conversations: Sequence[list[Message]],
        audio: Sequence[Sequence[Clip]],
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
        *,
        tools: Sequence[ToolSpec] | None = None,
        tool_choice: str = "auto",
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        formats: Sequence[AnswerFormat | None] | None = None,
        on_tool_call: Callable[[ToolCall], None] | None = None,
    ) -> list[Generation]:
        """Answers for a batch of conversations whose audio is encoded (:meth:`encode_clip`).

        Args:
            conversations, audio, settings, on_text: as :meth:`OmnivoxModel.generate`.
            tools: tools offered to every item (``ToolSpec``; ``Tool.spec()``); the tool list and
                clip labels are written into the conversation here (:func:`offer_tools`).
            tool_choice: "auto" (text or calls), "required" (calls), "none", or a tool's name.
            response_format: a JSON schema a text answer must follow.
            parallel_tool_calls: False: at most one call per answer.
            formats: instead of the three above, one :class:`AnswerFormat` (or None) per item.
            on_tool_call: called with each call once the answer is complete.

        Items with a format are decoded by the LLM under their grammar (``agent/constrained.py``;
        greedy or sampled, one beam); the rest go through the transcription step. A streamed
        answer that is calls sends no text.
        """
        settings = settings or self.model.config.generation
        if formats is None:
            one = None
            if tools or response_format is not None:
                one = AnswerFormat(tuple(tools or ()), tool_choice, response_format, parallel_tool_calls)
            formats = [one] * len(conversations)
        elif tools is not None or response_format is not None:
            raise UserInputError("give either formats or tools/tool_choice/response_format, not both")
        formats = list(formats)
        if len(formats) != len(conversations):
            raise UserInputError(f"{len(conversations)} conversations but {len(formats)} answer formats")
        guided = [i for i, f in enumerate(formats) if f is not None and f.constrained]
        if not guided:
            return self.transcription.generate(conversations, audio, settings, on_text)
        if on_text is not None and len(conversations) != 1:
            raise UserInputError(f"streaming needs a batch of one, got {len(conversations)} conversations")
        answers: dict[int, Generation] = {}
        rest = sorted(set(range(len(conversations))) - set(guided))
        if rest:
            out = self.transcription.generate([conversations[i] for i in rest], [audio[i] for i in rest], settings)
            answers.update(zip(rest, out, strict=True))
        prompts = [offer_tools(conversations[i], formats[i].tools) if formats[i].offers_tools else list(conversations[i])
                   for i in guided]  # fmt: skip
        out = self.model.generate(
            prompts,
            [audio[i] for i in guided],
            replace(settings, num_beams=1) if settings.num_beams != 1 else settings,
            _text_only(on_text) if on_text is not None else None,
            formats=[formats[i] for i in guided],
        )
        answers.update(zip(guided, out, strict=True))
        result = [answers[i] for i in range(len(conversations))]
        if on_tool_call is not None:
            for answer in result:
                for call in answer.tool_calls:
                    on_tool_call(call)
        return result

    def chat(
        self,
        prompt: str,
        audio: Sequence[np.ndarray] = (),
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
        **answer_format: Any,
    ) -> Generation:
        """One question about zero or more 16 kHz clips (``answer_format``: tools, tool_choice, response_format)."""
        clips = [self.encode_clip(a) for a in audio]
        return self.generate([[Message("user", prompt, num_audio=len(clips))]], [clips], settings, on_text, **answer_format)[0]


def _text_only(on_text: Callable[[str], None]) -> Callable[[str], None]:
    """Pass text on unless the answer is calls (its first character is ``<``: text cannot start so)."""
    state: dict[str, bool] = {}

    def piece(text: str) -> None:
        if "calls" not in state:
            state["calls"] = text.startswith("<")
        if not state["calls"]:
            on_text(text)

    return piece
