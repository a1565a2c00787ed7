"""Streaming generated text piece by piece, without importing transformers.

:class:`TextStreamer` is transformers' ``generation/streamers.py`` ``TextStreamer`` (v5) line for
line, so a streamed answer comes out in the same pieces with either: the token ids so far are
decoded as a whole each step, and only text that later tokens cannot change is passed on to
:meth:`TextStreamer.on_finalized_text` (up to a newline, CJK characters, whole letters / digits /
spaces, else up to the last space, which also holds back a half-decoded UTF-8 character).
It works with any generate that calls ``put(ids)`` / ``end()`` (``agent/llama.py``'s and
transformers'), and any tokenizer with ``decode(ids, **kwargs)``. :class:`StopText` cuts streamed
text at ``stop`` strings (the server's and the LangChain model's ``stop``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any


class TextStreamer:
    """Decodes the ids that ``put`` receives and passes finished text to :meth:`on_finalized_text`.

    Args:
        tokenizer: anything with ``decode(ids, **decode_kwargs) -> str``.
        skip_prompt: ignore the first ``put`` (the prompt ids, when generate gets ids).
        decode_kwargs: passed to ``decode`` (e.g. ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: Any) -> None:
        """Receive the next ids ([1, n] or [n]; a batch of more than one is refused)."""
        if len(value.shape) > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        elif len(value.shape) > 1:
            value = value[0]

        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return

        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)

        # after a newline, start over but keep the last token as context (it may carry a leading space)
        if text.endswith("\n"):
            printable_text = text[self.print_len :]
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache[-1], **self.decode_kwargs))
        # CJK characters are whole words: pass them on at once
        elif len(text) > 0 and self._is_chinese_char(ord(text[-1])):
            printable_text = text[self.print_len :]
            self.print_len += len(printable_text)
        # letters (with their marks), digits and spaces go at once, so text without spaces streams too;
        # symbols wait for the next space (they may start formatting, or be half a character: "\ufffd")
        elif all(char.isspace() or unicodedata.category(char)[0] in "LMN" for char in text[self.print_len :]):
            printable_text = text[self.print_len :]
            self.print_len += len(printable_text)
        else:
            printable_text = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(printable_text)

        self.on_finalized_text(printable_text)

    def end(self) -> None:
        """Flush what is held back."""
        if len(self.token_cache) > 0:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable_text = text[self.print_len :]
            self.token_cache = []
            self.print_len = 0
        else:
            printable_text = ""

        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable_text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Where finished text goes: stdout here; subclasses override it."""
        print(text, flush=True, end="" if not stream_end else None)

    @staticmethod
    def _is_chinese_char(cp: int) -> bool:
        """Whether code point ``cp`` is in a CJK Unified Ideographs block (not Hangul, Hiragana or Katakana)."""
        return (
            0x4E00 <= cp <= 0x9FFF
            or 0x3400 <= cp <= 0x4DBF
            or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F
            or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F
        )


class StopText:
    """Cuts text at the first of the ``stop`` strings, also when it arrives in pieces.

    :meth:`feed` returns what is safe to send: text that might be the start of a stop string is
    held back until the next piece shows whether it is. Empty stop strings are ignored.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
            return out
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """What is still held back (nothing once a stop string was found)."""
        out, self.held = self.held, ""
        return "" if self.stopped else out
