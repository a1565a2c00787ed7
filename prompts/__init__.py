"""Prompt styles as data, in one registry.

A prompt style turns a conversation into a list of *segments*: plain text pieces and
special markers (:class:`Special`). The processor tokenizes every text piece on its own,
without special tokens, and puts the special ids and the audio placeholders between
them. Tokenizing pieces separately is what SALMONN does around ``<SpeechHere>``, so a
SALMONN conversion reproduces the official token ids exactly.

The style's name is saved in the model folder's ``config.json``; adding a style means
adding one class and one line to :data:`PROMPT_STYLES`.
"""

from omnivox.prompts.styles import (
    PROMPT_STYLES,
    ChatMLStyle,
    Message,
    PromptStyle,
    SalmonnStyle,
    Segment,
    Special,
    get_prompt_style,
)
from omnivox.prompts.tools import (
    ToolSpec,
    call_text,
    calls_text,
    clip_label,
    result_text,
    signature,
    tools_text,
)

__all__ = [
    "PROMPT_STYLES",
    "ChatMLStyle",
    "Message",
    "PromptStyle",
    "SalmonnStyle",
    "Segment",
    "Special",
    "get_prompt_style",
    "ToolSpec",
    "call_text",
    "calls_text",
    "clip_label",
    "result_text",
    "signature",
    "tools_text",
]
