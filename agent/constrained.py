"""Constrained decoding: tool calls that always parse and validate, and answers held to a JSON schema.

The grammar of an answer is written in llguidance's Lark dialect and enforced token by token by
llguidance (a maintained library: its Earley parser and token trie compute, each step, the set of
tokens that keep the output inside the grammar; DESIGN §11 measured it at ~0.5 ms a token on this
stack). Nothing here masks JSON by hand; this module only writes grammars and applies the masks.

What the grammar allows (``tool_choice``):

- ``"auto"``: a text answer, or one or more calls ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (``prompts/tools.py``), each call's JSON held to its tool's schema. A text answer may not begin
  with ``<``: that is how a call and text are told apart on the first character, without a
  second pass;
- ``"required"``: one or more calls (up to ``MAX_CALLS``; one with ``parallel_tool_calls`` False);
  a tool's name: one call of that tool;
- ``"none"``: text (or, with a ``response_format`` schema, JSON of that schema).

The JSON is written with the separators ``json.dumps`` uses (``", "``, ``": "``), properties in
schema order: the form the model was trained on and the form :func:`prompts.tools.call_text` writes.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omnivox.errors import UserInputError
from omnivox.prompts.tools import CALL_CLOSE, CALL_OPEN, ToolSpec

log = logging.getLogger(__name__)

TOOL_CHOICES = ("none", "auto", "required")
# the form the model writes JSON in (json.dumps' default separators, no free whitespace)
JSON_FORM = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _lark_string(text: str) -> str:
    return json.dumps(text)


def _guided(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(schema))
    out["x-guidance"] = {**JSON_FORM, **out.get("x-guidance", {})}
    return out


def call_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema of one call of ``spec``: ``{"name": <its name>, "arguments": <its schema>}``."""
    arguments = dict(spec.parameters) or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": spec.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


MAX_CALLS = 8  # calls in one answer, at most (a loop of calls would otherwise run to max_new_tokens)


def answer_grammar(
    tools: Sequence[ToolSpec] = (),
    tool_choice: str = "auto",
    response_format: Mapping[str, Any] | None = None,
    parallel_tool_calls: bool = True,
) -> str | None:
    """The Lark grammar of an answer, or None when nothing constrains it (no tools, no schema).

    ``parallel_tool_calls`` False: at most one call an answer (OpenAI's flag); else up to ``MAX_CALLS``.
    """
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise UserInputError(f"tool names must be unique, got {names}")
    if tool_choice not in TOOL_CHOICES and tool_choice not in names:
        raise UserInputError(f"tool_choice must be one of {list(TOOL_CHOICES)} or an offered tool's name {names}, "
                             f"got {tool_choice!r}")  # fmt: skip
    if tool_choice == "required" and not tools:
        raise UserInputError("tool_choice 'required' needs at least one tool")
    calls = tool_choice != "none" and bool(tools)
    if not calls and response_format is None:
        return None
    rules = []
    if response_format is not None:
        text = "text"
        rules.append(f"text: %json {json.dumps(_guided(response_format))}")
    else:
        text = "TEXT"
        rules.append(r"TEXT: /[^<\s][\s\S]*/")  # text may not begin with "<" (nor with blanks before one)
    if not calls:
        return "\n".join([f"start: {text}", *rules])
    chosen = [t for t in tools if tool_choice in ("auto", "required") or t.name == tool_choice]
    bodies = []
    for k, spec in enumerate(chosen):
        rules.append(f"call_{k}: %json {json.dumps(_guided(call_schema(spec)))}")
        bodies.append(f"call_{k}")
    rules.append(f"call: {_lark_string(CALL_OPEN)} ({' | '.join(bodies)}) {_lark_string(CALL_CLOSE)}")
    calls_rule = "calls: call" + "".join(" call?" for _ in range(MAX_CALLS - 1)) if parallel_tool_calls else "calls: call"
    rules.append(calls_rule)
    if tool_choice == "auto":
        start = f"start: {text} | calls"
    elif tool_choice == "required":
        start = "start: calls"
    else:
        start = "start: call"
    return "\n".join([start, *rules])


@dataclass(frozen=True)
class AnswerFormat:
    """What one answer may be: tools offered and how (``tool_choice``), and a JSON schema for text."""

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"
    response_format: Mapping[str, Any] | None = None
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        # written once (it raises on a bad choice); the dataclass is frozen, the grammar derived from it
        grammar = answer_grammar(self.tools, self.tool_choice, self.response_format, self.parallel_tool_calls)
        object.__setattr__(self, "_grammar", grammar)

    @property
    def offers_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        return self.offers_tools or self.response_format is not None

    def grammar(self) -> str | None:
        """The Lark grammar of the answer (:func:`answer_grammar`), or None when nothing constrains it."""
        return self._grammar


class GrammarCompiler:
    """Builds llguidance matchers for one tokenizer; the token trie is built once (~0.3 s).

    Args:
        tokenizer: a tokenizer with ``backend_tokenizer`` (a ``tokenizers.Tokenizer``): omnivox's
            :class:`TextTokenizer` or a transformers fast tokenizer.
        vocab_size: the LLM's logits width (may exceed the tokenizer's size).
        stop_id: the id that ends an answer (allowed once the grammar is complete).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_id: int) -> None:
        import llguidance

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UserInputError(f"constrained decoding needs a fast tokenizer, got {type(tokenizer).__name__}")
        self.vocab_size = vocab_size
        self.stop_id = stop_id
        self._lltokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=stop_id)
        self._cache: dict[str, str] = {}

    def matcher(self, grammar: str):
        """A fresh matcher for ``grammar`` (compiled grammars are cached by text)."""
        import llguidance

        compiled = self._cache.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
            error = llguidance.LLMatcher.validate_grammar(compiled, self._lltokenizer)
            if error:
                raise UserInputError(f"cannot constrain decoding to this schema: {error.strip()}")
            self._cache[grammar] = compiled
        matcher = llguidance.LLMatcher(self._lltokenizer, compiled)
        if matcher.is_error():
            raise UserInputError(f"cannot constrain decoding to this schema: {matcher.get_error()}")
        return matcher


class GrammarConstraint:
    """A logits processor that keeps each row inside its grammar (rows without one are left alone).

    A plain callable ``(new_ids [rows, t], scores [rows, V]) -> scores`` like the other processors
    of :meth:`OmnivoxModel.generate_ids`; one row per item (no beam search).

    Args:
        compiler: the tokenizer's :class:`GrammarCompiler`.
        grammars: per row, a Lark grammar or None.
    """

    def __init__(self, compiler: GrammarCompiler, grammars: Sequence[str | None]) -> None:
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)

        self.compiler = compiler
        self.matchers = [compiler.matcher(g) if g is not None else None for g in grammars]
        self.words = (compiler.vocab_size + 31) // 32
        self._bitmask = np.zeros((len(grammars), self.words), dtype=np.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        self._seen = 0

    def __call__(self, new_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import llguidance.numpy as llnp

        rows, steps = new_ids.shape
        if rows != len(self.matchers):
            raise ValueError(f"the constraint has {len(self.matchers)} rows, decoding has {rows} (beam search?)")
        if steps > self._seen:
            last = new_ids[:, -1].tolist()
            for row, matcher in enumerate(self.matchers):
                if matcher is not None and not matcher.is_stopped():
                    if not matcher.consume_token(int(last[row])):
                        raise RuntimeError(f"row {row}: token {last[row]} left the grammar ({matcher.get_error()})")
            self._seen = steps
        constrained = [r for r, m in enumerate(self.matchers) if m is not None]
        if not constrained:
            return scores
        self._bitmask.fill(0)
        for row in constrained:
            matcher = self.matchers[row]
            if matcher.is_stopped():
                stop = self.compiler.stop_id  # the grammar is complete: only the stop token is left
                self._bitmask[row, stop // 32] = np.array([1 << (stop % 32)], dtype=np.uint32).view(np.int32)[0]
            else:
                llnp.fill_next_token_bitmask(matcher, self._bitmask, row)
        words = torch.from_numpy(self._bitmask[constrained])  # [R, W] int32
        allowed = ((words[:, :, None] >> self._shifts) & 1).bool().reshape(len(constrained), -1)  # [R, 32 W]
        vocab = scores.shape[-1]
        allowed = allowed[:, :vocab]
        if allowed.shape[1] < vocab:  # logits wider than the tokenizer: the extra ids are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(len(constrained), vocab - allowed.shape[1])], dim=1)
        index = torch.tensor(constrained, device=scores.device)
        rows_scores = scores[index]
        scores[index] = rows_scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        return scores
