"""Conversations + audio embeddings -> LLM input embeddings.

Text pieces of a prompt style are tokenized one by one without special tokens (as
SALMONN does around ``<SpeechHere>``); each audio slot is expanded to as many placeholder
positions as its clip has audio tokens, and the embeddings of those positions are
replaced by the audio vectors. The number of placeholders is checked against the
features with both numbers in the error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnivox.errors import UserInputError
from omnivox.prompts import Message, PromptStyle, Special


@dataclass
class TokenizedPrompt:
    """One tokenized conversation.

    Attributes:
        input_ids: [T] token ids; audio positions hold ``audio_id`` (replaced by features).
        audio_mask: [T] True where an audio vector goes.
    """

    input_ids: torch.Tensor
    audio_mask: torch.Tensor


@dataclass
class PromptBatch:
    """Left-padded batch of LLM inputs.

    Attributes:
        inputs_embeds: [B, T, H]
        attention_mask: [B, T] (0 on left padding)
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor


class OmnivoxProcessor:
    """Tokenizes conversations in a prompt style and merges audio embeddings into them."""

    def __init__(self, tokenizer, style: PromptStyle) -> None:
        self.tokenizer = tokenizer
        self.style = style
        # Any valid id works for audio positions: their embeddings are replaced.
        self.audio_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        ids = []
        for token in self.style.stop_tokens:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise UserInputError(
                    f"prompt style {self.style.name!r} stops at {token!r}, which the tokenizer does not know"
                )
            ids.append(int(token_id))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    def _special_id(self, marker: Special) -> int:
        token_id = self.tokenizer.bos_token_id if marker is Special.BOS else self.tokenizer.eos_token_id
        if token_id is None:
            raise UserInputError(f"prompt style {self.style.name!r} needs a {marker.value} token; the tokenizer has none")
        return int(token_id)

    def tokenize(self, messages: list[Message], audio_token_counts: list[int]) -> TokenizedPrompt:
        """Token ids of a conversation with each audio slot expanded to its clip's token count.

        Args:
            messages: the conversation; user turns say how many clips they carry.
            audio_token_counts: tokens of each clip, in the order the clips appear.
        """
        segments = self.style.render(messages)
        slots = sum(1 for s in segments if s is Special.AUDIO)
        if slots != len(audio_token_counts):
            raise UserInputError(
                f"audio clips and audio placeholders do not match: placeholders {slots}, clips {len(audio_token_counts)}"
            )
        ids: list[int] = []
        mask: list[bool] = []
        clip = 0
        for segment in segments:
            if segment is Special.AUDIO:
                n = audio_token_counts[clip]
                clip += 1
                ids += [self.audio_id] * n
                mask += [True] * n
            elif isinstance(segment, Special):
                ids.append(self._special_id(segment))
                mask.append(False)
            elif segment:
                piece = self.tokenizer(segment, add_special_tokens=False)["input_ids"]
                ids += piece
                mask += [False] * len(piece)
        return TokenizedPrompt(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))

    @staticmethod
    def merge(
        prompt: TokenizedPrompt, audio_embeds: list[torch.Tensor], embed_tokens: torch.nn.Module
    ) -> torch.Tensor:
        """Input embeddings [T, H] of one prompt with the audio vectors in their slots.

        Args:
            prompt: ids and audio mask, [T] each.
            audio_embeds: one [N_i, H] tensor per clip, in slot order.
            embed_tokens: the LLM's input embedding table.
        """
        embeds = embed_tokens(prompt.input_ids.to(embed_tokens.weight.device))  # [T, H]
        n_tokens = int(prompt.audio_mask.sum())
        features = torch.cat(audio_embeds, dim=0) if audio_embeds else embeds.new_zeros(0, embeds.shape[-1])
        if n_tokens != features.shape[0]:
            raise ValueError(
                f"Audio features and audio tokens do not match: tokens: {n_tokens}, features {features.shape[0]}"
            )
        if features.shape[-1] != embeds.shape[-1]:
            raise ValueError(f"audio features have width {features.shape[-1]}, the LLM embeds {embeds.shape[-1]}")
        embeds = embeds.clone()
        embeds[prompt.audio_mask.to(embeds.device)] = features.to(embeds.dtype)
        return embeds

    @staticmethod
    def left_pad(sequences: list[torch.Tensor]) -> PromptBatch:
        """Stack [T_i, H] sequences into a left-padded batch (zeros under the padding)."""
        longest = max(s.shape[0] for s in sequences)
        first = sequences[0]
        embeds = first.new_zeros(len(sequences), longest, first.shape[-1])  # [B, T, H]
        mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=first.device)
        for i, seq in enumerate(sequences):
            embeds[i, longest - seq.shape[0] :] = seq
            mask[i, longest - seq.shape[0] :] = 1
        return PromptBatch(embeds, mask)
