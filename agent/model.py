"""The assembled omnivox model: frozen encoders -> audio adapter -> LLM (with LoRA).

Parts are passed in (``OmnivoxModel(config, encoders, adapter, llm, tokenizer)``), so a
test builds one from tiny modules; :meth:`OmnivoxModel.from_pretrained` builds them from
a model folder (loaders in ``agent/loading.py``)::

    model-folder/
      config.json             OmnivoxConfig (encoders and base LLM by hub id or path)
      adapter.safetensors     AudioAdapter weights (LayerNorms, Q-Former, projection)
      lora/                   peft adapter (adapter_config.json, adapter_model.safetensors)
      tokenizer/              the tokenizer as used (e.g. with SALMONN's added [PAD])
      ctc_head.safetensors    optional: the CTC head for joint transcription decoding

Audio of any length is cut into windows (``AudioSettings``), encoded a few windows at a
time, and the audio tokens of all windows are given to the LLM in order. The model answers
every request the same way; steps that answer some requests otherwise (the Whisper
transcriber, ``agent/transcription.py``) are composed around it by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from omnivox.adapters.ctc import CTC_HEAD_FILE, CTCHead
from omnivox.adapters.lora import FoldedLora
from omnivox.adapters.qformer import AudioAdapter
from omnivox.agent.audio import load_audio, split_windows
from omnivox.agent.config import OmnivoxConfig
from omnivox.agent.constrained import AnswerFormat, GrammarCompiler, GrammarConstraint
from omnivox.agent.generation import CallbackStreamer, Generation, GenerationSettings
from omnivox.agent.llama import LlamaForCausalLM
from omnivox.agent.loading import ModelParts, Quantization, load_parts
from omnivox.agent.processor import OmnivoxProcessor
from omnivox.encoders.base import SAMPLE_RATE, AudioEncoder
from omnivox.errors import UserInputError
from omnivox.prompts import Message, get_prompt_style

log = logging.getLogger(__name__)


@dataclass
class WindowFeatures:
    """Frozen-encoder features of one audio window, as the adapter reads them.

    Attributes:
        features: one [T_e, D_e] tensor per encoder (in ``config.encoders`` order), cut to
            the frames the adapter reads.
        frame_length: valid fused frames (``trim_to_audio``), or None when every Q-Former
            window is kept.
        num_tokens: audio tokens the window gives the LLM.
    """

    features: list[torch.Tensor]
    frame_length: int | None
    num_tokens: int

    @property
    def signature(self) -> tuple:
        """Windows with equal signatures can be stacked into one adapter batch without padding."""
        return (tuple(tuple(f.shape) for f in self.features), self.frame_length is None)



@dataclass(frozen=True)
class EncodedClip:
    """One clip as the model and the steps around it use it.

    Attributes:
        tokens: [N, H] the audio tokens the LLM reads.
        samples: [S] the 16 kHz mono samples they were encoded from (what a step that reads the
            audio itself needs, e.g. the Whisper transcriber), or None for tokens made from
            cached features.
    """

    tokens: torch.Tensor
    samples: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


Clip = EncodedClip | torch.Tensor  # a bare [N, H] tensor: tokens without samples


def clip_tokens(clip: Clip) -> torch.Tensor:
    """The [N, H] audio tokens of a clip."""
    return clip.tokens if isinstance(clip, EncodedClip) else clip


class OmnivoxModel(nn.Module):
    """Frozen encoders + audio adapter + LLM, assembled from parts.

    Args:
        config: the composite config.
        encoders: one frozen encoder per ``config.encoders`` entry, same order.
        adapter: LayerNorm fusion + window Q-Former + projection.
        llm: a causal LM (optionally peft-wrapped).
        tokenizer: the LLM's tokenizer.
        folded_lora: a LoRA adapter already folded into ``llm``'s weights (no peft layers), so
            :meth:`set_lora_scale` can still rescale it.
    """

    def __init__(
        self,
        config: OmnivoxConfig,
        encoders: Sequence[AudioEncoder],
        adapter: AudioAdapter,
        llm: nn.Module,
        tokenizer,
        folded_lora: FoldedLora | None = None,
    ) -> None:
        super().__init__()
        if len(encoders) != len(config.encoders):
            raise ValueError(f"config lists {len(config.encoders)} encoders, got {len(encoders)}")
        dims = tuple(e.output_dim for e in encoders)
        if dims != tuple(config.qformer.encoder_dims):
            raise ValueError(f"encoder output dims {dims} do not match the Q-Former's {tuple(config.qformer.encoder_dims)}")
        hidden = llm.get_input_embeddings().weight.shape[-1]
        if hidden != config.qformer.llm_hidden_size:
            raise ValueError(f"the LLM's hidden size is {hidden}, the adapter projects to {config.qformer.llm_hidden_size}")
        window = round(config.audio.window_seconds * SAMPLE_RATE)
        for enc in encoders:
            if window > enc.max_samples:
                raise ValueError(
                    f"audio window {config.audio.window_seconds} s ({window} samples) exceeds what "
                    f"{type(enc).__name__} takes ({enc.max_samples} samples)"
                )
        self.config = config
        self.encoders = nn.ModuleList(encoders)
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer
        self.folded_lora = folded_lora
        self.processor = OmnivoxProcessor(tokenizer, get_prompt_style(config.prompt_style))
        self._grammar_compiler: GrammarCompiler | None = None  # built on the first constrained answer
        self._ctc_head: list[CTCHead] = []  # not a submodule: no part of the weights the trainer sees

    @property
    def ctc_head(self) -> CTCHead | None:
        """The folder's CTC head (frozen, for joint transcription decoding), or None."""
        return self._ctc_head[0] if self._ctc_head else None

    def set_ctc_head(self, head: CTCHead | None) -> None:
        """Use ``head`` (frozen) for joint transcription decoding; None: decode with the LLM alone."""
        self._ctc_head = [] if head is None else [head.requires_grad_(False)]


    # ------------------------------------------------------------------ audio
    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    def _window_bounds(self, num_samples: int) -> list[tuple[int, int]]:
        audio = self.config.audio
        return split_windows(
            num_samples, round(audio.window_seconds * SAMPLE_RATE), round(audio.overlap_seconds * SAMPLE_RATE)
        )

    def _prepare_clip(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        clip = torch.as_tensor(np.asarray(samples, dtype=np.float32)).reshape(-1)
        audio = self.config.audio
        if clip.numel() / SAMPLE_RATE > audio.max_seconds:
            raise UserInputError(
                f"audio is {clip.numel() / SAMPLE_RATE:.1f} s long, the limit is {audio.max_seconds:.0f} s "
                "(AudioSettings.max_seconds)"
            )
        shortest = round(audio.min_seconds * SAMPLE_RATE)
        if clip.numel() < shortest:
            clip = torch.nn.functional.pad(clip, (0, shortest - clip.numel()))
        return clip

    def _tokens_kept(self, valid_samples: int, produced: int) -> int:
        """Audio tokens of a window that go to the LLM.

        SALMONN's way (``trim_to_audio`` off): every token the window produced. Trimmed: the
        tokens of the adapter windows that cover the audio, the last partial one included (its
        missing frames are zero-padded, see ``AudioAdapter.frames_read``).
        """
        if not self.config.audio.trim_to_audio:
            return produced
        return self.adapter.num_tokens_covering(self.adapter.valid_frames(valid_samples, SAMPLE_RATE))

    @torch.no_grad()
    def encode_clip(self, samples: np.ndarray | torch.Tensor) -> EncodedClip:
        """One 16 kHz mono clip of any length, encoded: its [N, H] audio tokens (N grows with the
        windows) and its samples.

        Windows are encoded ``windows_per_batch`` at a time, so encoder memory does not grow
        with the length of the audio. The tokens are ``audio_tokens(encode_clip_features(samples))``.
        """
        tokens = self.audio_tokens(self.encode_clip_features(samples))
        flat = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else samples
        return EncodedClip(tokens, np.asarray(flat, dtype=np.float32).reshape(-1))

    @torch.no_grad()
    def encode_clip_features(self, samples: np.ndarray | torch.Tensor) -> list[WindowFeatures]:
        """The frozen encoders' features of every window of a clip, before the adapter.

        Each window keeps only the frames the adapter reads: with ``trim_to_audio`` the frames
        of the Q-Former windows that cover the audio, otherwise all frames. Feeding the result
        to :meth:`audio_tokens` gives exactly :meth:`encode_clip`; a training feature cache
        stores these.
        """
        clip = self._prepare_clip(samples)
        bounds = self._window_bounds(clip.numel())
        window = round(self.config.audio.window_seconds * SAMPLE_RATE)
        step = self.config.audio.windows_per_batch
        result: list[WindowFeatures] = []
        for first in range(0, len(bounds), step):
            group = bounds[first : first + step]
            lengths = torch.tensor([end - start for start, end in group])
            width = min(window, int(lengths.max()))
            waves = torch.zeros(len(group), width)  # [W, S]
            for i, (start, end) in enumerate(group):
                waves[i, : end - start] = clip[start:end]
            result += self._encode_window_features(waves, lengths)
        return result

    def _encode_window_features(self, waves: torch.Tensor, lengths: torch.Tensor) -> list[WindowFeatures]:
        """[W, S] windows -> W ``WindowFeatures``.

        Windows of different lengths go through the encoders separately so that no item
        is ever padded by another: a batch gives the same numbers as single items.
        """
        device, dtype = self.device, next(self.adapter.parameters()).dtype
        out: list[WindowFeatures | None] = [None] * len(lengths)
        for length in lengths.unique(sorted=False).tolist():
            idx = (lengths == length).nonzero().reshape(-1)
            w = waves[idx, :length].to(device)
            lens = lengths[idx].to(device)
            feats = [enc(w.to(next(enc.parameters()).dtype), lens).features.to(dtype) for enc in self.encoders]
            fused = max(f.shape[1] for f in feats)
            if not self.config.audio.trim_to_audio:
                tokens = self.adapter.num_tokens(fused)
                for j, i in enumerate(idx.tolist()):
                    out[i] = WindowFeatures([f[j] for f in feats], None, tokens)
                continue
            # only the adapter windows that cover audio are computed: keep the frames they read
            frames = self.adapter.valid_frames(length, SAMPLE_RATE)
            needed = min(fused, self.adapter.frames_read(frames))
            tokens = self._tokens_kept(length, self.adapter.num_tokens(fused))
            for j, i in enumerate(idx.tolist()):
                out[i] = WindowFeatures([f[j, :needed] for f in feats], frames, tokens)
        assert all(w is not None for w in out)
        return out  # type: ignore[return-value]

    def audio_tokens(self, windows: Sequence[WindowFeatures]) -> torch.Tensor:
        """Adapter on encoder features: the audio tokens of all ``windows`` in order, [N, H].

        Windows whose features have the same shapes go through the adapter together,
        ``windows_per_batch`` at a time; nothing is padded by another window. Gradients flow
        into the adapter when it trains (this method is not under ``no_grad``).
        """
        if not windows:
            raise ValueError("audio_tokens needs at least one window")
        device, dtype = self.device, next(self.adapter.parameters()).dtype
        step = self.config.audio.windows_per_batch
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(w.signature, []).append(i)
        pieces: list[torch.Tensor | None] = [None] * len(windows)
        for members in groups.values():
            for first in range(0, len(members), step):
                chunk = members[first : first + step]
                feats = [
                    torch.stack([windows[i].features[e] for i in chunk]).to(device=device, dtype=dtype)  # [G, T_e, D_e]
                    for e in range(len(windows[chunk[0]].features))
                ]
                lengths, min_frames = None, 0
                if windows[chunk[0]].frame_length is not None:
                    lengths = torch.tensor([windows[i].frame_length for i in chunk], device=device)
                    # the last covering window may reach past the encoders' frames: zero-pad to it
                    min_frames = max(self.adapter.frames_read(windows[i].frame_length) for i in chunk)
                tokens = self.adapter(feats, frame_lengths=lengths, min_frames=min_frames)  # [G, n, H]
                for j, i in enumerate(chunk):
                    if windows[i].num_tokens > tokens.shape[1]:
                        raise ValueError(
                            f"window {i} should give {windows[i].num_tokens} audio tokens, the adapter made {tokens.shape[1]}"
                        )
                    pieces[i] = tokens[j, : windows[i].num_tokens]
        return torch.cat(pieces, dim=0)  # type: ignore[arg-type]

    @torch.no_grad()
    def encode_audio(self, waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """The vectors the LLM sees for a batch of clips: [B, N, H].

        Args:
            waveform: [B, S] or [S] float samples (mono) at ``sample_rate``.
            sample_rate: resampled to 16 kHz when different.

        Clips longer than one window give more tokens; in a batch all clips have the same
        length S, so N is the same for all.
        """
        wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise UserInputError(f"waveform must be [B, S] or [S], got shape {tuple(wave.shape)}")
        clips = [load_audio(w.numpy(), sample_rate=sample_rate, max_seconds=None).samples for w in wave]
        return torch.stack([self.encode_clip(c).tokens for c in clips])

    def audio_token_count(self, num_samples: int) -> int:
        """How many audio tokens a 16 kHz clip of ``num_samples`` samples becomes."""
        clip = max(num_samples, round(self.config.audio.min_seconds * SAMPLE_RATE))
        per_window = self.adapter.num_tokens(self._encoder_frames())
        return sum(self._tokens_kept(end - start, per_window) for start, end in self._window_bounds(clip))

    def _encoder_frames(self) -> int:
        window = round(self.config.audio.window_seconds * SAMPLE_RATE)
        return max(enc.num_frames(window) for enc in self.encoders)

    # ------------------------------------------------------------- generation
    def build_inputs(self, conversations: Sequence[list[Message]], audio: Sequence[Sequence[Clip]]):
        """Left-padded ``inputs_embeds`` [B, T, H] and ``attention_mask`` [B, T] for a batch.

        Args:
            conversations: one message list per item.
            audio: per item, its clips (``EncodedClip`` or [N_i, H] tokens), in order of appearance.
        """
        if len(conversations) != len(audio):
            raise UserInputError(f"{len(conversations)} conversations but audio for {len(audio)}")
        embed = self.llm.get_input_embeddings()
        seqs = []
        for messages, clips in zip(conversations, audio, strict=True):
            tokens = [clip_tokens(c) for c in clips]
            prompt = self.processor.tokenize(list(messages), [t.shape[0] for t in tokens])
            seqs.append(self.processor.merge(prompt, tokens, embed))
        return self.processor.left_pad(seqs)

    @torch.no_grad()
    def generate_ids(
        self,
        conversations: Sequence[list[Message]],
        audio: Sequence[Sequence[Clip]],
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
        logits_processors: Sequence | None = None,
    ) -> list[list[int]]:
        """The ids the LLM produced per item, up to and including the first stop token (if it made one).

        Args:
            conversations: one message list per item, each ending with a user turn.
            audio: per item, its clips (``EncodedClip`` from :meth:`encode_clip`, or [N_i, H] tokens).
            settings: decoding; default the model folder's (``config.generation``).
            on_text: called with each new piece of text (batch of one, no beam search).
            logits_processors: callables ``(new_ids [rows, t], scores [rows, V]) -> scores`` applied
                at every step, as transformers' ``LogitsProcessor`` (e.g. the joint CTC decoder of
                ``agent/ctc_fusion.py``).
        """
        settings = settings or self.config.generation
        batch = self.build_inputs(conversations, audio)
        streamer = None
        if on_text is not None:
            if len(conversations) != 1 or settings.num_beams != 1:
                raise UserInputError("streaming needs a batch of one and num_beams 1")
            streamer = CallbackStreamer(self.tokenizer, on_text, self.processor.stop_ids).streamer
        stop = self.processor.stop_ids
        kwargs = dict(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            num_beams=settings.num_beams,
            do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty,
            length_penalty=settings.length_penalty,
            eos_token_id=stop,
            # finished rows are filled with this id and fed back in: it must exist in the LLM's vocabulary
            # (SALMONN's added [PAD] does not), so use the stop token
            pad_token_id=stop[0],
            streamer=streamer,
        )
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        if logits_processors:
            kwargs["logits_processor"] = list(logits_processors)
        out = self.llm.generate(**kwargs)  # [B, new]
        if streamer is not None:
            streamer.end()
        results = []
        for row in out.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            results.append(row[:end])
        return results

    def result(self, ids: list[int], answer_format: AnswerFormat | None = None) -> Generation:
        """The typed answer for the ids the LLM produced (see :meth:`generate_ids`).

        This is the one place that reads what the ids hold: text, or tool calls when tools were
        offered (``answer_format``) and the answer is calls; a new kind of output (codec tokens)
        is one more branch here and one more field of ``Generation``.
        """
        stopped = bool(ids) and ids[-1] in self.processor.stop_ids
        text = self.decode(ids)
        if answer_format is not None and answer_format.offers_tools and stopped:
            from omnivox.agent.tools import parse_calls

            calls = parse_calls(text)
            if calls is not None:
                return Generation("", list(ids), "tool_calls", tool_calls=calls)
        return Generation(text=text, token_ids=list(ids), finish_reason="stop" if stopped else "length")

    def constraint(self, formats: Sequence[AnswerFormat | None]) -> GrammarConstraint | None:
        """The logits processor holding each item to its answer format; None if none constrains."""
        grammars = [f.grammar() if f is not None else None for f in formats]
        if all(g is None for g in grammars):
            return None
        if self._grammar_compiler is None:
            vocab = self.llm.get_input_embeddings().weight.shape[0]
            out = self.llm.get_output_embeddings() if hasattr(self.llm, "get_output_embeddings") else None
            if out is not None and getattr(out, "weight", None) is not None:
                vocab = out.weight.shape[0]
            self._grammar_compiler = GrammarCompiler(self.tokenizer, vocab, self.processor.stop_ids[0])
        return GrammarConstraint(self._grammar_compiler, grammars)

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[list[Message]],
        audio: Sequence[Sequence[Clip]],
        settings: GenerationSettings | None = None,
        on_text: Callable[[str], None] | None = None,
        logits_processors: Sequence | None = None,
        formats: Sequence[AnswerFormat | None] | None = None,
    ) -> list[Generation]:
        """Answers for a batch of conversations whose audio is already encoded.

        Args: as :meth:`generate_ids`, and
            formats: per item, what its answer may be (tool calls, a JSON schema), enforced by
                constrained decoding (``agent/constrained.py``); the conversations must already
                offer the tools (``agent/assistant.py`` writes them in). Greedy or sampled
                decoding only (a grammar follows one row per item).
        """
        formats = list(formats) if formats is not None else [None] * len(conversations)
        if len(formats) != len(conversations):
            raise UserInputError(f"{len(conversations)} conversations but {len(formats)} answer formats")
        constraint = self.constraint(formats)
        if constraint is not None:
            settings = settings or self.config.generation
            if settings.num_beams != 1:
                raise UserInputError(f"constrained answers (tools, response_format) need num_beams 1, got {settings.num_beams}")
            logits_processors = [*(logits_processors or []), constraint]
        ids = self.generate_ids(conversations, audio, settings, on_text, logits_processors)
        return [self.result(i, f) for i, f in zip(ids, formats, strict=True)]

    @torch.no_grad()
    def score_answers(
        self, messages: list[Message], clips: Sequence[Clip], answers: Sequence[str]
    ) -> tuple[list[float], list[list[int]]]:
        """How likely the LLM finds each answer to one conversation, by teacher forcing.

        Args:
            messages: the conversation, ending with the user turn the answers reply to.
            clips: its clips (``EncodedClip`` or [N_i, H] tokens).
            answers: candidate answers.

        Returns:
            per answer, the summed log-probability of its tokens and the stop token, and those
            token ids (without the stop token).
        """
        if not answers:
            return [], []
        tokens = [clip_tokens(c) for c in clips]
        prompt = self.processor.tokenize(list(messages), [t.shape[0] for t in tokens])
        embed = self.llm.get_input_embeddings()
        context = self.processor.merge(prompt, tokens, embed)  # [T, H]
        stop = self.processor.stop_ids[0]
        ids = [self.tokenizer(a.strip(), add_special_tokens=False)["input_ids"] for a in answers]
        targets = [torch.tensor(i + [stop], device=context.device) for i in ids]
        if isinstance(self.llm, LlamaForCausalLM):
            return self._score_after_shared_context(context, targets), ids
        seqs = [torch.cat([context, embed(t)]) for t in targets]
        batch = self.processor.left_pad(seqs)
        # only the last positions predict answer tokens: the vocabulary projection of the others
        # (most of the context) would cost time and a [B, L, V] tensor for nothing
        keep = max(len(i) for i in ids) + 2
        logits = self.llm(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, logits_to_keep=keep
        ).logits  # [B, keep, V]
        scores = []
        for row, target in enumerate(targets):
            # the answer's n tokens sit at the row's last n positions; each is predicted one position earlier
            preds = logits[row, keep - len(target) - 1 : keep - 1].float().log_softmax(-1)  # [n, V]
            scores.append(float(preds.gather(1, target[:, None]).sum()))
        return scores, ids

    def _score_after_shared_context(self, context: torch.Tensor, targets: Sequence[torch.Tensor]) -> list[float]:
        """:meth:`score_answers` with omnivox's Llama runtime: the shared context [T, H] runs once and
        its KV cache serves every answer (right-padded: padding after an answer cannot reach it), so
        the context is not computed once per candidate. The same numbers up to float reordering."""
        first = self.llm(inputs_embeds=context[None], use_cache=True, logits_to_keep=1)  # [1, 1, V]: predicts token 0
        width = max(len(t) for t in targets)
        embed = self.llm.get_input_embeddings()
        answers = torch.zeros(len(targets), width, context.shape[-1], dtype=context.dtype, device=context.device)
        for row, target in enumerate(targets):
            answers[row, : len(target)] = embed(target)  # [n, H]
        rest = self.llm(inputs_embeds=answers, cache=first.cache.repeat(len(targets))).logits  # [B, width, V]
        scores = []
        for row, target in enumerate(targets):
            logits = torch.cat([first.logits[0], rest[row, : len(target) - 1]])  # [n, V]: position j predicts token j
            preds = logits.float().log_softmax(-1)
            scores.append(float(preds.gather(1, target[:, None]).sum()))
        return scores

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, cut at the first stop token."""
        stop = set(self.processor.stop_ids)
        for i, t in enumerate(ids):
            if t in stop:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


    # ------------------------------------------------------------------- LoRA
    def _lora_layers(self, purpose: str) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.llm.modules() if isinstance(m, LoraLayer)]
        if not layers:
            raise UserInputError(f"this model has no LoRA layers to {purpose}")
        return layers

    def set_lora_scale(self, scale: float) -> None:
        """Multiply the LoRA update by ``scale`` (1.0 = as trained; lower it under 8-bit)."""
        if scale < 0:
            raise UserInputError(f"LoRA scale must be >= 0, got {scale}")
        if self.folded_lora is not None:
            self.folded_lora.rescale(scale)
            return
        layers = self._lora_layers("scale")
        merged = any(layer.merged for layer in layers)
        if merged:  # the merged weights hold the old scale: take it out, rescale, merge again
            self.llm.unmerge_adapter()
        for layer in layers:
            for name in layer.lora_A:
                layer.set_scale(name, scale)
        if merged:
            self.llm.merge_adapter()

    def merge_lora(self) -> None:
        """Fold the LoRA update into the LLM's weights (inference: no extra matmuls per layer).

        peft keeps the LoRA matrices, so :meth:`set_lora_scale` still works (it unmerges and
        merges again). Not for quantized LLMs (the merge would round the update away).
        """
        if self.folded_lora is not None:
            return  # folded at load already
        self._lora_layers("merge")
        self.llm.merge_adapter()

    # -------------------------------------------------------------- save/load
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, adapter.safetensors, lora/, tokenizer/ (and the CTC head, if any) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / "config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter.state_dict().items()}
        save_file(state, folder / "adapter.safetensors", metadata={"format": "pt", "omnivox": "adapter"})
        if self.folded_lora is not None:
            self.folded_lora.save(folder / "lora")
        elif self.config.lora is not None:
            self.llm.save_pretrained(folder / "lora")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        if self.ctc_head is not None:
            head = {k: v.detach().contiguous().cpu() for k, v in self.ctc_head.state_dict().items()}
            save_file(head, folder / CTC_HEAD_FILE)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: Quantization = None,
        lora_scale: float = 1.0,
        merge_lora: bool = True,
    ) -> OmnivoxModel:
        """Load a model folder (see the module docstring for its layout; ``agent/loading.py``).

        ``merge_lora`` folds the LoRA update into the LLM weights (faster decoding on CPU,
        the same answers up to float rounding); it is skipped for quantized LLMs. A plain
        LoRA is folded without importing peft (:mod:`omnivox.adapters.lora`: a faster start);
        anything else goes through peft's merge. The folder's Whisper transcriber, if any, is
        not part of the model: ``omnivox.agent.assistant.Assistant.from_pretrained`` loads both.
        """
        parts = load_parts(
            folder, device=device, dtype=dtype, quantization=quantization, lora_scale=lora_scale, merge_lora=merge_lora
        )
        return cls.from_parts(parts)

    @classmethod
    def from_parts(cls, parts: ModelParts) -> OmnivoxModel:
        """The model from what :func:`omnivox.agent.loading.load_parts` loaded."""
        model = cls(parts.config, parts.encoders, parts.adapter, parts.llm, parts.tokenizer, folded_lora=parts.folded_lora)
        model.set_ctc_head(parts.ctc_head)
        if parts.folded_lora is not None:  # already folded at lora_scale
            return model.eval()
        if parts.config.lora is not None and parts.lora_scale != 1.0:
            model.set_lora_scale(parts.lora_scale)
        if parts.config.lora is not None and parts.merge_lora:
            model.merge_lora()
        return model.eval()
