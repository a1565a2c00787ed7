"""The speech head ("talker"): a small autoregressive transformer that emits codec codes.

The LLM decides what is said; the talker says it. Its inputs are the phonemes of the text
(``decoders/phonemes.py``), optionally the LLM's final hidden states of the words (pooled
per word and added to each of the word's phonemes, so the LLM's reading of the sentence
can shape it), a voice, and a task. Its output is codec codes ``[B, K, T]`` frame by frame,
which a codec (``decoders/codec.py``) turns into audio while they are being made.

Layout::

    phonemes [B, N] (+ word states [B, N, H]) -> encoder (transformer) -> h [B, N, D]
        -> prior head mu [B, N, M]   (training: monotonic alignment to the target frames)
        -> duration head [B, N]     (log frames per phoneme, per voice; generation: how long each lasts)
    h expanded to frames by the durations (+ voice, task, position within the phoneme)
        (+ the previous frame's codes, when ``history``) -> causal transformer -> g [B, T, D]
        -> depth heads: codebook k from g_t and codebooks < k of the same frame

Why durations and not attention: the alignment is learned the way Glow-TTS learns it
(monotonic alignment search between the phonemes' predicted mel frames and the real ones),
which trains in minutes on CPU and cannot skip or repeat words at generation time. Why
depth heads: residual codebooks depend on the ones before them in the same frame.

``history`` (config): whether each frame also reads the codes of the frame before it. With
it the talker is autoregressive over frames as well; without it the frames depend on each
other only through the causal attention over their (text or source) inputs, and a frame's K
codes come from the depth heads as before. The nano talker has none: taught with the true
previous codes, it read held-out text well teacher-forced but fell into loops ("ooh, ooh",
"a sooner than a sooner than ...") on its own output; the same weights run without previous
codes took Piper joe's held-out sentences from 137 % to 32 % WER (recipes/nano_talker.toml).

Tasks on audio (``source_mels`` > 0; SpeechX / UniAudio style): noise suppression, speech
removal, dereverberation, target-speaker extraction. The output is frame-aligned with an input
clip, so the phoneme path is replaced by a source path: the input's normalised mel frames (the
codec's analysis) -> a bidirectional transformer -> one state per output frame, plus the task
row and, for target-speaker extraction (or a voice given by a clip), a prompt vector pooled
from an enrolment clip through the same encoder. The frame decoder and depth heads are shared
with text to speech::

    source frames [B, T, M] -> source encoder -> s [B, T, D] (+ task, + prompt vector)
        (+ the previous frame's codes) -> causal transformer -> depth heads (as above)

Token pattern: one step per frame; within a step the K codes come in codebook order from
the depth heads, each restricted to its own codebook's ids (``codebook_size`` logits per
head: no other id can be chosen). The number of frames is fixed by the durations before the
first frame is made (capped at ``max_frames``), so the length is bounded by the text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnivox.errors import CheckpointError, UserInputError


@dataclass(frozen=True)
class TalkerConfig:
    """Shape of a :class:`Talker`.

    Attributes:
        num_phonemes: phoneme vocabulary size (``decoders/phonemes.py``: ``len(PHONEMES)``).
        num_codebooks / codebook_size / n_mels: of the codec it speaks through.
        llm_hidden_size: width of the LLM states it reads (0: phonemes only).
        num_voices: rows of the named-voice table; num_tasks: rows of the task table.
        source_mels: mel bins of an input clip for tasks on audio (0: text to speech only);
            source_layers: layers of the encoder that reads it.
        history: each frame reads the previous frame's codes (see the module docstring).
        max_phoneme_frames: the longest a phoneme may last at generation time.
        position_buckets: frames-into-the-phoneme and frames-left positions are clipped here.
    """

    num_phonemes: int
    num_codebooks: int = 8
    codebook_size: int = 1024
    n_mels: int = 100
    llm_hidden_size: int = 0
    dim: int = 256
    heads: int = 4
    ffn: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.1
    num_voices: int = 64
    num_tasks: int = 8
    max_phoneme_frames: int = 40
    position_buckets: int = 32
    max_positions: int = 4096
    source_mels: int = 0
    source_layers: int = 2
    history: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "history":
                if not isinstance(value, bool):
                    raise CheckpointError(f"talker config: history must be true or false, got {value!r}")
            elif f.name == "dropout":
                if not 0 <= value < 1:
                    raise CheckpointError(f"talker config: dropout must be in [0, 1), got {value}")
            elif f.name in ("llm_hidden_size", "source_mels"):
                if not isinstance(value, int) or value < 0:
                    raise CheckpointError(f"talker config: {f.name} must be an integer >= 0, got {value!r}")
            elif not isinstance(value, int) or value < 1:
                raise CheckpointError(f"talker config: {f.name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise CheckpointError(f"talker config: dim ({self.dim}) must be a multiple of heads ({self.heads})")

    @classmethod
    def from_dict(cls, data: dict) -> TalkerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"talker config: unknown keys {unknown}")
        return cls(**data)


# ============================================================================================
# Monotonic alignment search
# ============================================================================================
@torch.no_grad()
def monotonic_alignment(score: torch.Tensor, num_phonemes: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Best monotonic path through ``score [B, N, T]`` (log-likelihood of frame t under phoneme n).

    Every frame belongs to one phoneme, phonemes come in order, each takes >= 1 frame, the path
    starts at (0, 0) and ends at (N_b - 1, T_b - 1). Returns durations ``[B, N]`` (frames per
    phoneme, 0 for padding), summing to ``num_frames``. Dynamic programming over frames, the
    phoneme axis vectorised (Glow-TTS's search; there is no maintained package for it).
    """
    b, n, t = score.shape
    s = score.double().cpu().numpy()
    out = np.zeros((b, n), dtype=np.int64)
    for i in range(b):
        ni, ti = int(num_phonemes[i]), int(num_frames[i])
        if ni > ti:
            raise UserInputError(f"cannot align {ni} phonemes to {ti} frames (each phoneme needs a frame)")
        value = np.full(ni, -np.inf)
        value[0] = s[i, 0, 0]
        moved = np.zeros((ti, ni), dtype=bool)  # moved[t, j]: frame t entered phoneme j from j - 1
        for f in range(1, ti):
            stay = value
            advance = np.concatenate([[-np.inf], value[:-1]])
            moved[f] = advance > stay
            value = np.maximum(stay, advance) + s[i, :ni, f]
        j = ni - 1
        for f in range(ti - 1, -1, -1):  # walk back from the last phoneme at the last frame
            out[i, j] += 1
            if f > 0 and moved[f, j]:
                j -= 1
    return torch.from_numpy(out).to(score.device)


def expand(states: torch.Tensor, durations: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat phoneme states by their durations.

    Args:
        states: ``[B, N, D]``; durations: ``[B, N]`` integer frames; frames: output length T.

    Returns:
        ``[B, T, D]`` states per frame (zeros past each row's end), the index of each frame's
        phoneme ``[B, T]`` and the frame's position inside its phoneme ``[B, T]``.
    """
    b, n, d = states.shape
    ends = durations.cumsum(-1)  # [B, N]
    t = torch.arange(frames, device=states.device)
    phoneme = torch.searchsorted(ends, t.expand(b, frames).contiguous(), right=True).clamp(max=n - 1)  # [B, T]
    starts = ends - durations
    position = t[None] - starts.gather(1, phoneme)
    valid = t[None] < ends[:, -1:]
    out = states.gather(1, phoneme[..., None].expand(b, frames, d)) * valid[..., None]
    return out, phoneme, position


# ============================================================================================
# Layers
# ============================================================================================
class Block(nn.Module):
    """Pre-norm transformer block; causal self-attention with an optional key/value cache."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
        cache: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x [B, T, D]``; ``mask [B, T]`` True where valid (non-causal use); ``cache`` holds
        ``[k, v]`` of earlier steps (each ``[B, heads, T', D / heads]``) and is extended in place."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, T]: keys that exist
        is_causal = causal and cache is None  # with a cache the new queries see every cached key
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout.p if self.training else 0.0
        )  # [B, h, T, D / h]
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.ff(self.norm2(x)))


# ============================================================================================
# The talker
# ============================================================================================
@dataclass
class TalkerLosses:
    total: torch.Tensor
    codes: torch.Tensor  # mean cross-entropy per code
    prior: torch.Tensor  # mean squared error of the aligned prior, per mel value
    duration: torch.Tensor  # mean squared error of log durations
    accuracy: torch.Tensor  # fraction of codebook-1 codes predicted right (teacher forcing)


class Talker(nn.Module):
    """See the module docstring."""

    def __init__(self, config: TalkerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.phoneme_embed = nn.Embedding(c.num_phonemes, c.dim)
        self.llm_proj = nn.Linear(c.llm_hidden_size, c.dim) if c.llm_hidden_size else None
        self.text_pos = nn.Embedding(c.max_positions, c.dim)
        self.frame_pos = nn.Embedding(c.max_positions, c.dim)
        self.encoder = nn.ModuleList(Block(c.dim, c.heads, c.ffn, c.dropout) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.dim)
        self.prior = nn.Linear(c.dim, c.n_mels)
        self.duration = nn.Sequential(
            nn.Conv1d(c.dim, c.dim, 3, padding=1), nn.GELU(), nn.Conv1d(c.dim, c.dim, 3, padding=1), nn.GELU(),
            nn.Conv1d(c.dim, 1, 1),
        )  # fmt: skip
        self.voice = nn.Embedding(c.num_voices, c.dim)
        # the duration head's own voice table (voices differ in pace); zeros: a talker grown from one
        # without it starts with the durations it had
        self.duration_voice = nn.Embedding(c.num_voices, c.dim)
        nn.init.zeros_(self.duration_voice.weight)
        self.task = nn.Embedding(c.num_tasks, c.dim)
        self.into_phoneme = nn.Embedding(c.position_buckets, c.dim)
        self.left_in_phoneme = nn.Embedding(c.position_buckets, c.dim)
        # previous frame's codes (row codebook_size is "no frame yet"), one table per codebook
        self.code_embed = nn.ModuleList(
            nn.Embedding(c.codebook_size + 1, c.dim) for _ in range(c.num_codebooks if c.history else 0)
        )
        self.decoder = nn.ModuleList(Block(c.dim, c.heads, c.ffn, c.dropout) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.dim)
        # depth: codebook k sees g_t plus the codes < k already chosen for frame t
        self.depth_embed = nn.ModuleList(nn.Embedding(c.codebook_size, c.dim) for _ in range(c.num_codebooks - 1))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.codebook_size))
            for _ in range(c.num_codebooks)
        )
        if c.source_mels:  # tasks on audio: an encoder of the input clip and of an enrolment clip
            self.source_in = nn.Linear(c.source_mels, c.dim)
            self.source_encoder = nn.ModuleList(Block(c.dim, c.heads, c.ffn, c.dropout) for _ in range(c.source_layers))
            self.source_norm = nn.LayerNorm(c.dim)
            self.prompt_proj = nn.Linear(c.dim, c.dim)

    # ------------------------------------------------------------------ text side
    def encode_text(self, phonemes: torch.Tensor, mask: torch.Tensor, word_states: torch.Tensor | None = None) -> torch.Tensor:
        """``phonemes [B, N]`` ids, ``mask [B, N]`` valid, ``word_states [B, N, H]`` (the LLM's state of
        each phoneme's word, or None) -> ``h [B, N, D]``."""
        c = self.config
        if phonemes.shape[1] > c.max_positions:
            raise UserInputError(f"{phonemes.shape[1]} phonemes is more than the talker's {c.max_positions}")
        x = self.phoneme_embed(phonemes) + self.text_pos(torch.arange(phonemes.shape[1], device=phonemes.device))
        if self.llm_proj is not None:
            if word_states is None:
                raise UserInputError("this talker reads the LLM's word states; none were given")
            x = x + self.llm_proj(word_states.to(x.dtype))
        for block in self.encoder:
            x = block(x, mask=mask)
        return self.encoder_norm(x) * mask[..., None]

    def log_durations(self, h: torch.Tensor, mask: torch.Tensor, voice: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` predicted log frames per phoneme of each row's ``voice [B]`` (from phoneme states
        the duration loss does not train)."""
        x = h.detach() + self.duration_voice(voice)[:, None]
        return self.duration(x.transpose(1, 2))[:, 0] * mask

    def frame_inputs(
        self, h: torch.Tensor, durations: torch.Tensor, frames: int, voice: torch.Tensor, task: torch.Tensor
    ) -> torch.Tensor:
        """Expanded phoneme states + voice + task + position inside the phoneme -> ``[B, T, D]``."""
        c = self.config
        x, phoneme, position = expand(h, durations, frames)
        left = durations.gather(1, phoneme) - 1 - position
        x = x + self.into_phoneme(position.clamp(0, c.position_buckets - 1))
        x = x + self.left_in_phoneme(left.clamp(0, c.position_buckets - 1))
        return x + (self.voice(voice) + self.task(task))[:, None]

    # ------------------------------------------------------------------ audio side
    def encode_source(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """An input clip's normalised mel frames ``[B, T, M]`` (``mask [B, T]`` valid) -> ``[B, T, D]``."""
        c = self.config
        if not c.source_mels:
            raise UserInputError("this talker does no tasks on audio (its source_mels is 0)")
        if frames.dim() != 3 or frames.shape[-1] != c.source_mels or mask.shape != frames.shape[:2]:
            raise UserInputError(f"source frames must be [B, T, {c.source_mels}] with a [B, T] mask, got "
                                 f"{tuple(frames.shape)} and {tuple(mask.shape)}")  # fmt: skip
        if frames.shape[1] > c.max_positions:
            raise UserInputError(f"{frames.shape[1]} source frames is more than the talker's {c.max_positions}")
        x = self.source_in(frames.to(self.source_in.weight.dtype))
        x = x + self.frame_pos(torch.arange(frames.shape[1], device=frames.device))
        for block in self.source_encoder:
            x = block(x, mask=mask)
        return self.source_norm(x) * mask[..., None]

    def prompt_vector(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """An enrolment clip's frames ``[B, T, M]`` -> one vector ``[B, D]`` (the mean of its encoded frames)."""
        h = self.encode_source(frames, mask)
        return self.prompt_proj(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(h.dtype))

    def source_inputs(self, source: torch.Tensor, source_mask: torch.Tensor, task: torch.Tensor,
                      prompt: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Per-frame decoder inputs of a task on audio: encoded source + task (+ prompt vector)."""
        x = self.encode_source(source, source_mask) + self.task(task)[:, None]
        if prompt is not None:
            if prompt_mask is None:
                raise UserInputError("a prompt clip needs its mask")
            x = x + self.prompt_vector(prompt, prompt_mask)[:, None]
        return x

    # ------------------------------------------------------------------ frames
    def previous_codes(self, codes: torch.Tensor, drop: float = 0.0) -> torch.Tensor:
        """``codes [B, K, T]`` -> embedding of each frame's previous codes ``[B, T, D]`` (start row first).

        ``drop`` (training only): the share of frames whose previous codes are hidden (replaced by
        the start row), so the talker cannot lean on copying the frame before: taught with the true
        previous codes only, it reads held-out text well but drifts into loops when it runs on its
        own output (measured: see the recipe). Zeros for a talker without ``history``."""
        b, k, t = codes.shape
        if not self.config.history:
            return codes.new_zeros((b, t, self.config.dim), dtype=self.frame_pos.weight.dtype)
        start = torch.full((b, k, 1), self.config.codebook_size, dtype=codes.dtype, device=codes.device)
        prev = torch.cat([start, codes[..., :-1]], dim=-1)
        if drop > 0 and self.training:
            hidden = torch.rand(b, 1, t, device=codes.device) < drop
            prev = prev.masked_fill(hidden, self.config.codebook_size)
        return sum(self.code_embed[i](prev[:, i]) for i in range(k))

    def depth_logits(self, g: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits of every codebook: ``g [B, T, D]``, ``codes [B, K, T]`` -> K x ``[B, T, C]``."""
        out, acc = [], g
        for k, head in enumerate(self.heads):
            out.append(head(acc))
            if k + 1 < len(self.heads):
                acc = acc + self.depth_embed[k](codes[:, k])
        return out

    def forward(
        self, phonemes: torch.Tensor, phoneme_mask: torch.Tensor, codes: torch.Tensor, frame_mask: torch.Tensor,
        target_frames: torch.Tensor, voice: torch.Tensor, task: torch.Tensor,
        word_states: torch.Tensor | None = None, prior_weight: float = 1.0, duration_weight: float = 1.0,
        code_dropout: float = 0.0,
    ) -> TalkerLosses:  # fmt: skip
        """Training losses.

        Args:
            phonemes / phoneme_mask: ``[B, N]``.
            codes: ``[B, K, T]`` target codes; frame_mask: ``[B, T]`` valid frames.
            target_frames: ``[B, T, M]`` the codec's normalised mel frames (what the codes quantise),
                the targets of the prior that the alignment is searched with.
            voice / task: ``[B]`` ids.
        """
        c = self.config
        if codes.shape[1] != c.num_codebooks or target_frames.shape[-1] != c.n_mels:
            raise UserInputError(
                f"talker expects {c.num_codebooks} codebooks and {c.n_mels} mel bins, got codes {tuple(codes.shape)}, "
                f"frames {tuple(target_frames.shape)}"
            )
        h = self.encode_text(phonemes, phoneme_mask, word_states)
        mu = self.prior(h)  # [B, N, M]
        # log-likelihood of frame t under phoneme n's unit Gaussian, up to a constant
        score = -0.5 * torch.cdist(mu.float(), target_frames.float()).pow(2)  # [B, N, T]
        score = score.masked_fill(~phoneme_mask[..., None], -1e9)
        durations = monotonic_alignment(score, phoneme_mask.sum(-1), frame_mask.sum(-1))
        aligned, _, _ = expand(mu, durations, codes.shape[-1])
        valid = frame_mask[..., None].float()
        prior = ((aligned - target_frames) ** 2 * valid).sum() / (valid.sum() * c.n_mels).clamp(min=1)
        log_d = self.log_durations(h, phoneme_mask, voice)
        target_log_d = torch.log(durations.float().clamp(min=1))
        duration = ((log_d - target_log_d) ** 2 * phoneme_mask).sum() / phoneme_mask.sum().clamp(min=1)

        ce, accuracy = self.code_losses(self.frame_inputs(h, durations, codes.shape[-1], voice, task), codes, frame_mask,
                                        code_dropout)  # fmt: skip
        total = ce + prior_weight * prior + duration_weight * duration
        return TalkerLosses(total, ce, prior, duration, accuracy)

    def code_losses(
        self, inputs: torch.Tensor, codes: torch.Tensor, frame_mask: torch.Tensor, code_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced code cross-entropy (mean over codebooks) and codebook-1 accuracy, from
        per-frame decoder inputs ``[B, T, D]`` and the target ``codes [B, K, T]`` (``code_dropout``:
        see :meth:`previous_codes`)."""
        c = self.config
        if codes.shape[-1] > c.max_positions:
            raise UserInputError(f"{codes.shape[-1]} frames is more than the talker's {c.max_positions}")
        x = inputs + self.previous_codes(codes, code_dropout)
        x = x + self.frame_pos(torch.arange(codes.shape[-1], device=x.device))
        for block in self.decoder:
            x = block(x, causal=True)
        g = self.decoder_norm(x)
        logits = self.depth_logits(g, codes)
        ce = torch.stack([
            F.cross_entropy(lg[frame_mask], codes[:, k][frame_mask]) for k, lg in enumerate(logits)
        ]).mean()  # fmt: skip
        accuracy = (logits[0].argmax(-1) == codes[:, 0])[frame_mask].float().mean()
        return ce, accuracy

    def forward_source(
        self, source: torch.Tensor, source_mask: torch.Tensor, codes: torch.Tensor, task: torch.Tensor,
        prompt: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None, code_dropout: float = 0.0,
    ) -> TalkerLosses:  # fmt: skip
        """Training losses of a task on audio: ``source [B, T, M]`` input frames (``source_mask``),
        the target ``codes [B, K, T]`` of the same frames, ``task [B]``, optional enrolment clip."""
        if codes.shape[1] != self.config.num_codebooks or codes.shape[-1] != source.shape[1]:
            raise UserInputError(f"codes {tuple(codes.shape)} must be [B, {self.config.num_codebooks}, T] for source "
                                 f"frames {tuple(source.shape)}")  # fmt: skip
        inputs = self.source_inputs(source, source_mask, task, prompt, prompt_mask)
        ce, accuracy = self.code_losses(inputs, codes, source_mask, code_dropout)
        zero = ce.new_zeros(())
        return TalkerLosses(ce, ce, zero, zero, accuracy)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def plan(
        self, phonemes: torch.Tensor, word_states: torch.Tensor | None = None, speed: float = 1.0,
        max_frames: int | None = None, voice: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One utterance ``phonemes [1, N]`` -> its states ``h [1, N, D]`` and durations ``[1, N]`` in
        ``voice`` (each in ``[1, max_phoneme_frames]``, divided by ``speed``, the total capped at ``max_frames``)."""
        if phonemes.dim() != 2 or phonemes.shape[0] != 1 or phonemes.shape[1] == 0:
            raise UserInputError(f"plan takes one utterance of phonemes shaped [1, N >= 1], got {tuple(phonemes.shape)}")
        if not 0.25 <= speed <= 4:
            raise UserInputError(f"speed must be in [0.25, 4], got {speed}")
        if not 0 <= int(voice) < self.config.num_voices:
            raise UserInputError(f"voice must be in [0, {self.config.num_voices}), got {voice}")
        mask = torch.ones_like(phonemes, dtype=torch.bool)
        h = self.encode_text(phonemes, mask, word_states)
        frames = torch.exp(self.log_durations(h, mask, torch.tensor([voice], device=h.device))) / speed
        durations = frames.round().long().clamp(1, self.config.max_phoneme_frames)
        limit = self.config.max_positions if max_frames is None else min(max_frames, self.config.max_positions)
        if int(durations.sum()) > limit:
            raise UserInputError(f"the speech would take {int(durations.sum())} frames, more than the limit of {limit}")
        return h, durations

    @torch.no_grad()
    def generate(
        self, phonemes: torch.Tensor, voice: int = 0, task: int = 0, word_states: torch.Tensor | None = None,
        speed: float = 1.0, temperature: float = 0.0, top_k: int = 0, max_frames: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        """Codes of one utterance, one frame at a time: yields ``[1, K, 1]`` per frame.

        ``temperature`` 0 picks the most likely code of each codebook; above 0 samples (from the
        ``top_k`` most likely when ``top_k`` > 0). Each head scores only its codebook's ids.
        """
        c = self.config
        for name, value, limit in (("voice", voice, c.num_voices), ("task", task, c.num_tasks)):
            if not 0 <= int(value) < limit:
                raise UserInputError(f"{name} must be in [0, {limit}), got {value}")
        if temperature < 0:
            raise UserInputError(f"temperature must be >= 0, got {temperature}")
        h, durations = self.plan(phonemes, word_states, speed, max_frames, voice)
        total = int(durations.sum())
        device = h.device
        x_all = self.frame_inputs(
            h, durations, total, torch.tensor([voice], device=device), torch.tensor([task], device=device)
        )  # [1, T, D]
        yield from self.decode_frames(x_all, temperature, top_k, generator)

    @torch.no_grad()
    def generate_from_source(
        self, source: torch.Tensor, task: int, prompt: torch.Tensor | None = None, temperature: float = 0.0,
        top_k: int = 0, generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:  # fmt: skip
        """Codes for a task on audio, one frame per input frame: ``source [1, T, M]`` the input
        clip's normalised mel frames, ``prompt [1, T', M]`` an enrolment clip's (or None); yields
        ``[1, K, 1]`` per frame, as :meth:`generate`."""
        c = self.config
        if not 0 <= int(task) < c.num_tasks:
            raise UserInputError(f"task must be in [0, {c.num_tasks}), got {task}")
        if temperature < 0:
            raise UserInputError(f"temperature must be >= 0, got {temperature}")
        if source.dim() != 3 or source.shape[0] != 1 or source.shape[1] == 0:
            raise UserInputError(f"source takes one clip shaped [1, T >= 1, M], got {tuple(source.shape)}")
        device = source.device
        mask = torch.ones(source.shape[:2], dtype=torch.bool, device=device)
        prompt_mask = None if prompt is None else torch.ones(prompt.shape[:2], dtype=torch.bool, device=device)
        x_all = self.source_inputs(source, mask, torch.tensor([task], device=device), prompt, prompt_mask)
        yield from self.decode_frames(x_all, temperature, top_k, generator)

    @torch.no_grad()
    def decode_frames(
        self, x_all: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
    ) -> Iterator[torch.Tensor]:
        """The frame loop: per-frame inputs ``[1, T, D]`` -> codes, ``[1, K, 1]`` per frame (KV cache)."""
        c = self.config
        total, device = x_all.shape[1], x_all.device
        caches: list[list[torch.Tensor]] = [[] for _ in self.decoder]
        prev = torch.full((1, c.num_codebooks, 1), c.codebook_size, dtype=torch.long, device=device)
        for t in range(total):
            x = x_all[:, t : t + 1]
            if c.history:  # the same order of sums as in training (code_losses)
                x = x + sum(self.code_embed[k](prev[:, k]) for k in range(c.num_codebooks))
            x = x + self.frame_pos(torch.tensor([t], device=device))
            for block, cache in zip(self.decoder, caches, strict=True):
                x = block(x, causal=True, cache=cache)
            acc = self.decoder_norm(x)  # [1, 1, D]
            frame = torch.empty(1, c.num_codebooks, 1, dtype=torch.long, device=device)
            for k, head in enumerate(self.heads):
                logits = head(acc)[0, 0]  # [C]: this codebook's ids only
                frame[0, k, 0] = _pick(logits, temperature, top_k, generator)
                if k + 1 < c.num_codebooks:
                    acc = acc + self.depth_embed[k](frame[:, k])
            prev = frame
            yield frame


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator))


def speak(
    talker: Talker, codec, phonemes: torch.Tensor, on_audio: Callable[[torch.Tensor], None] | None = None,
    chunk_frames: int = 5, **options,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Generate codes and decode them while they come: ``on_audio(wav [1, 1, n])`` gets each
    piece of audio as soon as it is final (every ``chunk_frames`` frames). Returns the codes
    ``[1, K, T]`` and the whole waveform ``[1, 1, S]``."""
    return stream_decode(talker.generate(phonemes, **options), codec, on_audio, chunk_frames)


def stream_decode(
    frames: Iterator[torch.Tensor], codec, on_audio: Callable[[torch.Tensor], None] | None = None, chunk_frames: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode codes ``[1, K, 1]`` as they come from ``frames`` through ``codec.stream()``, handing
    each final piece to ``on_audio`` every ``chunk_frames`` frames; returns (codes, waveform)."""
    stream = codec.stream()
    done, pieces, pending = [], [], []

    def emit(piece: torch.Tensor) -> None:
        pieces.append(piece)
        if on_audio is not None and piece.shape[-1]:
            on_audio(piece)

    for frame in frames:
        done.append(frame)
        pending.append(frame)
        if len(pending) == chunk_frames:
            emit(stream.push(torch.cat(pending, -1)))
            pending = []
    if pending:
        emit(stream.push(torch.cat(pending, -1)))
    emit(stream.flush())
    return torch.cat(done, -1), torch.cat(pieces, -1)
