"""A multi-turn conversation about audio, with each clip encoded once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from omnivox.agent.model import GenerationSettings, OmnivoxModel
from omnivox.prompts import Message


class ChatSession:
    """Keeps the turns and the encoded audio of a conversation.

    Clips added with :meth:`add_audio` are encoded at once and attached to the next user
    turn; later turns reuse the stored audio tokens instead of encoding again.
    """

    def __init__(self, model: OmnivoxModel, settings: GenerationSettings | None = None) -> None:
        self.model = model
        self.settings = settings or GenerationSettings.for_model(model.config)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its audio."""
        self.messages: list[Message] = []
        self.audio: list[torch.Tensor] = []  # [N_i, H] per clip, in order of appearance
        self._pending = 0

    def add_audio(self, samples: np.ndarray) -> int:
        """Encode a 16 kHz mono clip for the next question; returns its number of audio tokens."""
        tokens = self.model.encode_clip(samples)
        self.audio.append(tokens)
        self._pending += 1
        return tokens.shape[0]

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` in the context of the previous turns and all clips so far."""
        turn = Message("user", question, num_audio=self._pending)
        answer = self.model.generate([[*self.messages, turn]], [self.audio], self.settings, on_text=on_text)[0]
        self.messages += [turn, Message("assistant", answer)]
        self._pending = 0
        return answer
