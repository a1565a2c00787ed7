"""The model with the steps composed around it: what ``omnivox chat``, the evaluation and the demo answer with.

:class:`OmnivoxModel` answers every request the same way. A model folder may also name
steps that answer some requests otherwise; today one, the transcription step
(``agent/transcription.py``: joint CTC decoding and the Whisper transcriber). The assistant
holds the model and its steps; callers that want the model alone use the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.loading import load_parts
from omnivox.agent.model import Clip, EncodedClip, OmnivoxModel
from omnivox.agent.transcriber import WhisperTranscriber
from omnivox.agent.transcription import TranscriptionStep
from omnivox.prompts import Message


class Assistant:
    """A model and its transcription step.

    Args:
        model: the model.
        transcriber: the folder's Whisper transcriber (needs ``model.config.transcriber``), a
            function that loads it on first use, or None.
    """

    def __init__(
        self, model: OmnivoxModel, transcriber: WhisperTranscriber | Callable[[], WhisperTranscriber] | None = None
    ) -> None:
        if transcriber is not None and model.config.transcriber is None:
            raise ValueError("config.transcriber is None: it holds the weights that combine the transcriber's scores")
        self.model = model
        self.transcription = TranscriptionStep(model, transcriber, model.config.transcriber)

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
        return cls(OmnivoxModel.from_parts(parts), parts.transcriber)

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
    ) -> list[Generation]:
        """Answers for a batch of conversations whose audio is encoded (:meth:`encode_clip`)."""
        return self.transcription.generate(conversations, audio, settings or self.model.config.generation, on_text)

    def chat(
        self,
        prompt: str,
        audio: Sequence[np.ndarray] = (),
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """One question about zero or more 16 kHz clips."""
        clips = [self.encode_clip(a) for a in audio]
        return self.generate([[Message("user", prompt, num_audio=len(clips))]], [clips], settings, on_text)[0]
