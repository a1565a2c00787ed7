"""Window-level Q-Former: fuse encoder features and turn each time window into LLM tokens.

This is SALMONN's audio adapter, numerically identical to ``SALMONN._encode_auditory_feature``
(checked against the official code by ``tests/adapters/test_qformer.py``):

1. every encoder's features get their own LayerNorm (SALMONN: ``ln_speech`` on Whisper,
   ``ln_audio`` on BEATs), the shorter sequences are zero-padded in time to the longest
   *after* the norm, and all are concatenated on channels -> ``[B, T, sum(encoder_dims)]``;
2. the sequence is cut into windows of ``kernel`` frames every ``stride`` frames; trailing
   frames that do not fill a window are dropped (1500 frames at 17/17 -> 88 windows);
3. per window, ``queries_per_window`` learned queries go through a small BERT-style stack
   (post-LayerNorm; self-attention over the queries, cross-attention to the window's frames,
   feed-forward). This is BLIP-2's Q-Former on its query-only path: no word or position
   embeddings, no text feed-forward, the queries pass the embeddings LayerNorm first;
4. a Linear projects every query output to the LLM's hidden size; the windows are laid out
   in time order -> ``[B, W * Q, llm_hidden_size]``.

Module names are omnivox's own; ``convert/salmonn.py`` maps them to and from the official
state-dict names (``speech_Qformer.bert.encoder.layer.N...``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# One table for the feed-forward activation. "gelu" is BERT's exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": partial(F.gelu, approximate="none"),
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class QFormerConfig:
    """Geometry of the fusion + window Q-Former + projection. Defaults are SALMONN's.

    Attributes:
        encoder_dims: feature width of each encoder, in the order ``forward`` receives them
            (SALMONN: ``(1280, 768)`` = Whisper large-v2 then BEATs).
        hidden_size: Q-Former width (BERT-base: 768).
        num_layers: Q-Former layers (SALMONN: 2).
        num_heads: attention heads, in self- and cross-attention.
        intermediate_size: feed-forward inner width.
        layer_norm_eps: eps of the Q-Former's LayerNorms (BERT: 1e-12). The per-encoder input
            LayerNorms use PyTorch's default 1e-5, as SALMONN's ``nn.LayerNorm`` does.
        window_seconds: window length in seconds (SALMONN ``second_per_window``).
        stride_seconds: hop between windows in seconds (SALMONN ``second_stride``).
        queries_per_window: learned queries per window, i.e. LLM tokens per window.
        frame_rate: fused frames per second (Whisper's encoder runs at 50 Hz).
        cross_attention_every: layer ``i`` cross-attends when ``i % cross_attention_every == 0``.
        llm_hidden_size: output width (the LLM's embedding size; 4096 for Vicuna-7B, 5120 for 13B).
        hidden_act: feed-forward activation, a key of ``ACTIVATIONS``.
        dropout: BERT's hidden and attention-probability dropout, active only in training.
    """

    encoder_dims: tuple[int, ...]
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    window_seconds: float = 0.333333
    stride_seconds: float = 0.333333
    queries_per_window: int = 1
    frame_rate: float = 50.0
    cross_attention_every: int = 1
    llm_hidden_size: int = 4096
    hidden_act: str = "gelu"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        # JSON gives lists; keep the frozen config hashable and immutable.
        object.__setattr__(self, "encoder_dims", tuple(int(d) for d in self.encoder_dims))
        if not self.encoder_dims or any(d <= 0 for d in self.encoder_dims):
            raise ValueError(f"encoder_dims must be one positive width per encoder, got {self.encoder_dims}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "queries_per_window",
                     "cross_attention_every", "llm_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("layer_norm_eps", "window_seconds", "stride_seconds", "frame_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.kernel_frames < 1 or self.stride_frames < 1:
            raise ValueError(
                f"window of {self.window_seconds} s / stride {self.stride_seconds} s at {self.frame_rate} "
                f"frames/s gives kernel {self.kernel_frames} / stride {self.stride_frames} frames; both must be >= 1"
            )

    @property
    def kernel_frames(self) -> int:
        """Frames per window: ``round(frame_rate * window_seconds)`` (17 for SALMONN)."""
        return round(self.frame_rate * self.window_seconds)

    @property
    def stride_frames(self) -> int:
        """Frames between window starts: ``round(frame_rate * stride_seconds)`` (17 for SALMONN)."""
        return round(self.frame_rate * self.stride_seconds)

    @property
    def fused_dim(self) -> int:
        """Channels after concatenating all encoders (2048 for SALMONN)."""
        return sum(self.encoder_dims)

    @classmethod
    def salmonn(cls, llm_hidden_size: int = 4096) -> QFormerConfig:
        """SALMONN's adapter: Whisper large-v2 (1280) + BEATs (768), BERT-base 2-layer Q-Former."""
        return cls(encoder_dims=(1280, 768), llm_hidden_size=llm_hidden_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``encoder_dims`` as a list)."""
        out = dataclasses.asdict(self)
        out["encoder_dims"] = list(self.encoder_dims)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QFormerConfig:
        """Inverse of ``to_dict``; unknown keys are an error, missing ones take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QFormerConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)


class QFormerAttention(nn.Module):
    """Multi-head attention with BERT's biased projections; keys/values may be wider than queries.

    Submodules: ``q_proj``, ``k_proj``, ``v_proj`` (Linear), ``out_proj`` (BERT's ``output.dense``).
    """

    def __init__(self, hidden_size: int, kv_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_size, hidden_size)
        self.v_proj = nn.Linear(kv_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attend from ``x`` [N, Q, H] to ``context`` [N, K, C]; returns [N, Q, H] (before the residual)."""
        n, q_len, hidden = x.shape
        k_len = context.shape[1]
        q = self.q_proj(x).view(n, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # [N, nh, Q, hd]
        k = self.k_proj(context).view(n, k_len, self.num_heads, self.head_dim).transpose(1, 2)  # [N, nh, K, hd]
        v = self.v_proj(context).view(n, k_len, self.num_heads, self.head_dim).transpose(1, 2)  # [N, nh, K, hd]
        # Every frame of a window is real (SALMONN passes an all-ones mask), so no mask here.
        # Scale 1/sqrt(head_dim) as in BERT.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, q_len, hidden)  # [N, Q, H]
        return self.out_proj(out)


class QFormerFeedForward(nn.Module):
    """BERT's query feed-forward: ``down(act(up(x)))``; submodules ``up`` and ``down``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.act = ACTIVATIONS[hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, Q, H] -> [N, Q, H] (before the residual)."""
        return self.down(self.act(self.up(x)))


class QFormerLayer(nn.Module):
    """One post-LayerNorm Q-Former layer on the query path.

    ``x = self_attn_norm(x + self_attn(x))``; then, if the layer cross-attends,
    ``x = cross_attn_norm(x + cross_attn(x, frames))``; then ``x = ffn_norm(x + ffn(x))``.
    Dropout (training only) sits where BERT has it: on each sub-block's output before the residual.
    """

    def __init__(self, config: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.dropout = nn.Dropout(config.dropout)
        self.self_attn = QFormerAttention(h, h, config.num_heads, config.dropout)
        self.self_attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.cross_attn: QFormerAttention | None = None
        self.cross_attn_norm: nn.LayerNorm | None = None
        if has_cross_attention:
            self.cross_attn = QFormerAttention(h, config.fused_dim, config.num_heads, config.dropout)
            self.cross_attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn = QFormerFeedForward(h, config.intermediate_size, config.hidden_act)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, frames: Tensor) -> Tensor:
        """``x`` [N, Q, H] queries, ``frames`` [N, K, C] window frames -> [N, Q, H]."""
        x = self.self_attn_norm(x + self.dropout(self.self_attn(x, x)))
        if self.cross_attn is not None and self.cross_attn_norm is not None:
            x = self.cross_attn_norm(x + self.dropout(self.cross_attn(x, frames)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class AudioAdapter(nn.Module):
    """Encoder features -> LLM input vectors, SALMONN's window-level Q-Former.

    Submodules / state-dict names (official SALMONN name in brackets):

    - ``input_norms.{i}``: LayerNorm per encoder [``ln_speech`` (i=0), ``ln_audio`` (i=1)]
    - ``queries``: Parameter [1, Q, H] [``speech_query_tokens``]
    - ``query_norm``: LayerNorm [``speech_Qformer.bert.embeddings.LayerNorm``]
    - ``layers.{n}.self_attn.{q_proj,k_proj,v_proj,out_proj}``, ``layers.{n}.self_attn_norm``
      [``...layer.{n}.attention.self.{query,key,value}``, ``...attention.output.{dense,LayerNorm}``]
    - ``layers.{n}.cross_attn.*``, ``layers.{n}.cross_attn_norm`` [``...layer.{n}.crossattention.*``]
    - ``layers.{n}.ffn.{up,down}``, ``layers.{n}.ffn_norm``
      [``...intermediate_query.dense``, ``...output_query.{dense,LayerNorm}``]
    - ``projection``: Linear(H -> llm_hidden_size) [``speech_llama_proj``]
    """

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.input_norms = nn.ModuleList(nn.LayerNorm(d) for d in config.encoder_dims)
        self.queries = nn.Parameter(torch.empty(1, config.queries_per_window, config.hidden_size))
        self.query_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.query_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_every == 0)
            for i in range(config.num_layers)
        )
        self.projection = nn.Linear(config.hidden_size, config.llm_hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation (normal std 0.02, zero biases, unit LayerNorms), as SALMONN's fresh Q-Former."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.queries, std=0.02)

    # ---- token counting (usable before any audio is encoded) -------------------------------

    def num_windows(self, num_frames: int) -> int:
        """Windows for ``num_frames`` fused frames; trailing frames that fill no window are dropped.

        Raises ValueError when there are fewer frames than one window.
        """
        kernel, stride = self.config.kernel_frames, self.config.stride_frames
        if num_frames < kernel:
            raise ValueError(f"{num_frames} fused frames are fewer than one window of {kernel} frames")
        return (num_frames - kernel) // stride + 1

    def num_tokens(self, num_frames: int) -> int:
        """LLM tokens (``windows * queries_per_window``) for ``num_frames`` fused frames: 1500 -> 88."""
        return self.num_windows(num_frames) * self.config.queries_per_window

    def num_windows_covering(self, num_valid_frames: int, num_frames: int | None = None) -> int:
        """Windows that start inside the first ``num_valid_frames`` frames (i.e. hold some real audio).

        Args:
            num_valid_frames: frames carrying audio (the rest is padding), >= 1.
            num_frames: total fused frames; when given, the count is capped at ``num_windows(num_frames)``.
        """
        if num_valid_frames < 1:
            raise ValueError(f"num_valid_frames must be >= 1, got {num_valid_frames}")
        covering = max(1, math.ceil(num_valid_frames / self.config.stride_frames))
        if num_frames is not None:
            covering = min(covering, self.num_windows(num_frames))
        return covering

    def num_tokens_covering(self, num_valid_frames: int) -> int:
        """LLM tokens of the windows that hold some of the first ``num_valid_frames`` frames."""
        return self.num_windows_covering(num_valid_frames) * self.config.queries_per_window

    def frames_read(self, num_valid_frames: int) -> int:
        """Fused frames that the windows covering ``num_valid_frames`` frames read (the last window
        may reach past the audio: those frames are zero-padded, see :meth:`fuse`'s ``min_frames``)."""
        return (self.num_windows_covering(num_valid_frames) - 1) * self.config.stride_frames + self.config.kernel_frames

    def valid_frames(self, num_samples: int, sample_rate: int) -> int:
        """Fused frames that carry ``num_samples`` samples of audio at ``sample_rate`` (at least 1)."""
        return max(1, math.ceil(num_samples * self.config.frame_rate / sample_rate))

    @property
    def tokens_per_second(self) -> float:
        """LLM tokens per second of audio (SALMONN: 50 Hz frames, stride 17, 1 query: ~2.94)."""
        return self.config.frame_rate / self.config.stride_frames * self.config.queries_per_window

    # ---- forward ---------------------------------------------------------------------------

    def fuse(self, features: Sequence[Tensor], min_frames: int = 0) -> Tensor:
        """Normalise each encoder's features, zero-pad in time to the longest, concat on channels.

        Args:
            features: one tensor per encoder, ``[B, T_i, D_i]`` with ``D_i == encoder_dims[i]``.
            min_frames: zero-pad (after the norms) to at least this many frames.

        Returns:
            ``[B, max(max_i T_i, min_frames), sum(encoder_dims)]``.
        """
        dims = self.config.encoder_dims
        shapes = [tuple(f.shape) for f in features]
        if len(features) != len(dims):
            raise ValueError(f"expected {len(dims)} feature tensors (encoder_dims={dims}), got {len(features)}: {shapes}")
        if any(f.dim() != 3 for f in features) or any(s[2] != d for s, d in zip(shapes, dims, strict=True)):
            raise ValueError(f"features must be [B, T_i, D_i] with D_i = {dims}; got shapes {shapes}")
        if len({s[0] for s in shapes}) != 1:
            raise ValueError(f"features disagree on batch size: shapes {shapes}")
        num_frames = max(max(s[1] for s in shapes), min_frames)
        normed = []
        for norm, f in zip(self.input_norms, features, strict=True):
            f = norm(f)  # [B, T_i, D_i]; the norm comes before padding, so pad frames stay exactly 0
            normed.append(F.pad(f, (0, 0, 0, num_frames - f.shape[1])))  # [B, T, D_i]
        return torch.cat(normed, dim=-1)  # [B, T, sum(D_i)]

    def forward(
        self, features: Sequence[Tensor], frame_lengths: Tensor | None = None, min_frames: int = 0
    ) -> Tensor:
        """Encoder features -> LLM input vectors.

        Args:
            features: one tensor per encoder, ``[B, T_i, D_i]`` (Whisper [B, 1500, 1280], BEATs
                [B, T_b, 768]); time is aligned at the start, shorter ones are zero-padded.
            frame_lengths: optional ``[B]`` valid fused frames per item. ``None`` (SALMONN) keeps every
                window. When given, only the windows that cover each item's audio
                (``num_windows_covering``) are computed; the output has
                ``max_b num_windows_covering(frame_lengths[b]) * Q`` tokens and item ``b``'s tokens
                past its own count are zero. Covered windows are bit-for-bit what ``None`` gives.
            min_frames: zero-pad the fused frames to at least this many (see :meth:`fuse`), e.g. so
                that a window only partly covered by an encoder's frames is still computed.

        Returns:
            ``[B, W * Q, llm_hidden_size]``, windows in time order, the Q queries of a window adjacent.
        """
        x = self.fuse(features, min_frames)  # [B, T, C]
        batch, num_frames, channels = x.shape
        kernel, stride, q = self.config.kernel_frames, self.config.stride_frames, self.config.queries_per_window
        num_windows = self.num_windows(num_frames)
        windows = x.unfold(1, kernel, stride)  # [B, W, C, k]
        windows = windows.transpose(2, 3).reshape(batch * num_windows, kernel, channels)  # [B*W, k, C]

        if frame_lengths is None:
            out = self._encode_windows(windows)  # [B*W, Q, L]
            return out.reshape(batch, num_windows * q, -1)  # [B, W*Q, L]

        if frame_lengths.shape != (batch,):
            raise ValueError(f"frame_lengths must be [B] = [{batch}], got shape {tuple(frame_lengths.shape)}")
        lengths = frame_lengths.tolist()
        if any(n < 1 or n > num_frames for n in lengths):
            raise ValueError(f"frame_lengths must be in [1, {num_frames}] (fused frames), got {lengths}")
        covering = [self.num_windows_covering(int(n), num_frames) for n in lengths]
        kept_windows = max(covering)
        keep = torch.arange(num_windows, device=x.device)[None, :] < torch.tensor(covering, device=x.device)[:, None]
        keep = keep[:, :kept_windows]  # [B, W']
        windows = windows.view(batch, num_windows, kernel, channels)[:, :kept_windows]  # [B, W', k, C]
        encoded = self._encode_windows(windows[keep])  # [n_kept, Q, L]
        out = encoded.new_zeros(batch, kept_windows, q, encoded.shape[-1])  # [B, W', Q, L]
        out[keep] = encoded
        return out.reshape(batch, kept_windows * q, -1)  # [B, W'*Q, L]

    def _encode_windows(self, windows: Tensor) -> Tensor:
        """Q-Former + projection on independent windows: ``[N, k, C]`` -> ``[N, Q, llm_hidden_size]``."""
        # BLIP-2 applies the embeddings LayerNorm + dropout to the expanded queries, so dropout
        # masks differ per window in training.
        x = self.queries.expand(windows.shape[0], -1, -1)  # [N, Q, H]
        x = self.query_dropout(self.query_norm(x))  # [N, Q, H]
        for layer in self.layers:
            x = layer(x, windows)
        return self.projection(x)  # [N, Q, L]
