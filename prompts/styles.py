"""Prompt styles: conversation -> segments (text pieces, BOS/EOS markers, audio slots)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from omnivox.errors import UserInputError


class Special(enum.Enum):
    """Markers a style puts between text pieces; the processor maps them to token ids."""

    BOS = "bos"
    EOS = "eos"
    AUDIO = "audio"  # one audio clip: expanded to that clip's number of audio tokens


Segment = str | Special


@dataclass(frozen=True)
class Message:
    """One turn of a conversation.

    Attributes:
        role: "system", "user" or "assistant".
        text: the turn's text.
        num_audio: how many audio clips this (user) turn carries; they are placed
            before the text in the style's audio wrapper.
    """

    role: Literal["system", "user", "assistant", "tool"]
    text: str
    num_audio: int = 0
    audio_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant", "tool"):
            raise UserInputError(f"message role must be system, user, assistant or tool, got {self.role!r}")
        if self.num_audio < 0:
            raise UserInputError(f"num_audio must be >= 0, got {self.num_audio}")
        if self.num_audio and self.role != "user":
            raise UserInputError(f"only user turns carry audio, got {self.num_audio} clip(s) on a {self.role} turn")
        if self.audio_labels and len(self.audio_labels) != self.num_audio:
            raise UserInputError(f"{len(self.audio_labels)} audio labels for {self.num_audio} clip(s)")

    def audio_head(self, index: int) -> str:
        """What goes before clip ``index``'s audio: its label (``"clip-1: "``) when it has one."""
        return f"{self.audio_labels[index]}: " if self.audio_labels else ""


@dataclass(frozen=True)
class PromptStyle:
    """Base class: subclasses define how turns become segments.

    Attributes:
        name: registry key, saved in the model folder.
        stop_tokens: token strings that end an answer (mapped to ids by the processor).
    """

    name: str = ""
    stop_tokens: tuple[str, ...] = field(default_factory=tuple)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> list[Segment]:
        """Segments for ``messages``; with ``add_generation_prompt`` the assistant's turn is opened."""
        raise NotImplementedError

    @staticmethod
    def check_order(messages: list[Message]) -> None:
        """Users and assistants alternate, starting with a user (after an optional system turn).

        Tool turns (the results of an assistant turn's tool calls) may follow an assistant turn
        or another tool turn, and take the place of a user turn; a user turn may follow them.
        """
        body = messages[1:] if messages and messages[0].role == "system" else messages
        if not body:
            raise UserInputError("a conversation needs at least one user turn")
        roles = [m.role for m in messages]
        for i, message in enumerate(body):
            before = body[i - 1].role if i else None
            if i == 0:
                ok = message.role == "user"
                expected = "user"
            elif message.role == "assistant":
                ok, expected = before in ("user", "tool"), "user or tool"
            elif message.role == "tool":
                ok, expected = before in ("assistant", "tool"), "assistant or tool"
            else:  # a user turn: after an answer, or after tool results (the user speaks before the model answers)
                ok, expected = before in ("assistant", "tool"), "assistant or tool"
            if not ok:
                where = "the first turn must be a user turn" if i == 0 else f"a {message.role} turn must follow {expected}"
                raise UserInputError(f"turn {i}: {where}; roles were {roles}")


@dataclass(frozen=True)
class SalmonnStyle(PromptStyle):
    """SALMONN's template: ``USER: <Speech><SpeechHere></Speech> {instruction}\\nASSISTANT:``.

    The first segment is BOS (SALMONN prepends the BOS embedding). Later turns follow
    Vicuna v1.1: the answer, then EOS, then ``USER: ...\\nASSISTANT:``. SALMONN has no
    system prompt; a system turn is put before the first ``USER:``.
    """

    name: str = "salmonn"
    stop_tokens: tuple[str, ...] = ("</s>",)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> list[Segment]:
        self.check_order(messages)
        segments: list[Segment] = [Special.BOS]
        for message in messages:
            if message.role == "system":
                segments.append(message.text.strip() + " ")
            elif message.role in ("user", "tool"):
                text = "USER: " if message.role == "user" else "USER: Tool result: "
                for k in range(message.num_audio):
                    segments += [text + message.audio_head(k) + "<Speech>", Special.AUDIO]
                    text = "</Speech>"
                # SALMONN's cli_inference strips the instruction and puts one space after </Speech>.
                segments.append(text + (" " if message.num_audio else "") + message.text.strip() + "\nASSISTANT:")
            else:
                segments += [" " + message.text.strip(), Special.EOS]
        if not add_generation_prompt and messages[-1].role == "user":
            raise UserInputError("the conversation ends with a user turn but no generation prompt was asked for")
        return segments


@dataclass(frozen=True)
class ChatMLStyle(PromptStyle):
    """ChatML (``<|im_start|>role\\n...<|im_end|>``), used by SmolLM2 and Qwen models.

    Audio clips come first in the user turn, each wrapped in ``<audio>...</audio>``.
    """

    name: str = "chatml"
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    default_system: str = "You are omnivox, a helpful assistant that listens to audio and answers briefly."

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> list[Segment]:
        self.check_order(messages)
        segments: list[Segment] = []
        if messages[0].role != "system" and self.default_system:
            segments.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for message in messages:
            head = f"<|im_start|>{message.role}\n"
            for k in range(message.num_audio):
                segments += [head + message.audio_head(k) + "<audio>", Special.AUDIO]
                head = "</audio>"
            segments.append(head + message.text.strip() + "<|im_end|>\n")
        if add_generation_prompt:
            segments.append("<|im_start|>assistant\n")
        return segments


PROMPT_STYLES: dict[str, PromptStyle] = {
    style.name: style
    for style in (
        SalmonnStyle(),
        ChatMLStyle(),
        # ChatML without the default system turn: ~17 fewer tokens per prompt, for small CPU models
        ChatMLStyle(name="chatml-bare", default_system=""),
    )
}


def get_prompt_style(name: str) -> PromptStyle:
    """The registered style called ``name``; a clear error lists the known ones."""
    try:
        return PROMPT_STYLES[name]
    except KeyError:
        raise UserInputError(f"unknown prompt style {name!r}; known: {sorted(PROMPT_STYLES)}") from None
