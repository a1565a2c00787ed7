"""A multi-turn conversation about audio, with each clip encoded once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from omnivox.agent.assistant import Assistant
from omnivox.agent.generation import Generation, GenerationSettings
from omnivox.agent.model import EncodedClip
from omnivox.prompts import Message


class ChatSession:
    """Keeps the turns and the encoded audio of a conversation.

    Clips added with :meth:`add_audio` are encoded at once and attached to the next user
    turn; later turns reuse the stored clips instead of encoding again.
    """

    def __init__(self, assistant: Assistant, settings: GenerationSettings | None = None) -> None:
        self.assistant = assistant
        self.settings = settings or assistant.model.config.generation
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its audio."""
        self.messages: list[Message] = []
        self.audio: list[EncodedClip] = []  # in order of appearance
        self._pending = 0

    def add_audio(self, samples: np.ndarray) -> int:
        """Encode a 16 kHz mono clip for the next question; returns its number of audio tokens."""
        clip = self.assistant.encode_clip(samples)
        self.audio.append(clip)
        self._pending += 1
        return clip.num_tokens

    def ask_generation(self, question: str, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer ``question`` in the context of the previous turns and all clips so far."""
        turn = Message("user", question, num_audio=self._pending)
        answer = self.assistant.generate([[*self.messages, turn]], [self.audio], self.settings, on_text=on_text)[0]
        self.messages += [turn, Message("assistant", answer.text)]
        self._pending = 0
        return answer

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """The text of :meth:`ask_generation`'s answer."""
        return self.ask_generation(question, on_text).text
