"""Whisper's own text decoder as a transcript proposer and scorer.

A small audio LLM trained on synthetic voices reads real speech poorly, while the Whisper
checkpoint whose encoder it already uses carries a decoder trained on 680k hours of real
speech. :class:`WhisperTranscriber` gives that decoder two jobs for transcription requests
(composed around the model by ``agent/transcription.py``; settings in ``TranscriberSettings``):

* **propose**: beam search over one 30 s window returns the N best transcripts with their
  log-probabilities (openai-whisper's ``decode`` keeps only the best one, so the search is
  written here, on openai-whisper's model and key/value cache hooks);
* **score**: the log-probability of any text (e.g. the audio LLM's own answer), by teacher
  forcing, so that candidates from both models are compared on the same scale.

Clips longer than one window are transcribed by openai-whisper's long-form ``transcribe``.
Weights: any openai-whisper checkpoint (``{"dims", "model_state_dict"}``, an official name),
including the ``ct2-whisper:`` conversion of the bundled tiny.en.
"""

from __future__ import annotations

import logging
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnivox.errors import CheckpointError, UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transcript:
    """One hypothesis: its text, Whisper token ids (without the start sequence and end token) and
    ``log_prob``, the summed log-probability of the ids and the end token."""

    text: str
    tokens: tuple[int, ...]
    log_prob: float


class WhisperTranscriber:
    """Beam search and scoring with an openai-whisper model (encoder + decoder), English.

    Args:
        model: an openai-whisper ``Whisper`` (in eval mode).
        beam_size: hypotheses kept in the search, and returned by :meth:`nbest`.
        max_tokens: most text tokens of one window's transcript (None: openai-whisper's own
            limit, half the decoder's positions: 224).
    """

    def __init__(
        self, model, beam_size: int = 5, max_tokens: int | None = None, source: Path | None = None
    ) -> None:
        from whisper.tokenizer import get_tokenizer

        if beam_size < 1:
            raise UserInputError(f"beam_size must be >= 1, got {beam_size}")
        self.model = model.eval().requires_grad_(False)
        self.source = source  # the checkpoint file the weights came from (None: an official name)
        self.beam_size = int(beam_size)
        multilingual = model.dims.n_vocab >= 51865
        self.tokenizer = get_tokenizer(
            multilingual, num_languages=getattr(model, "num_languages", 99), language="en", task="transcribe"
        )
        tok = self.tokenizer
        self.prefix = tuple(tok.sot_sequence_including_notimestamps)
        limit = model.dims.n_text_ctx - len(self.prefix) - 1  # the start sequence and the end fit too
        max_tokens = model.dims.n_text_ctx // 2 if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise UserInputError(f"max_tokens must be in [1, {limit}] for this checkpoint, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.eot = tok.eot
        # no special token but the end, no timestamp, no non-speech symbol (openai-whisper's "-1" default)
        suppress = set(tok.non_speech_tokens) | {tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech, tok.no_timestamps}
        suppress |= {tok.transcribe, tok.translate}
        suppress |= set(range(tok.timestamp_begin, model.dims.n_vocab))
        self._suppress = torch.tensor(sorted(t for t in suppress if t < model.dims.n_vocab and t != tok.eot))
        self._blank = torch.tensor(tok.encode(" ") + [tok.eot])  # not as the first token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def check_source(path: str | Path) -> None:
        """Raise CheckpointError unless ``path`` is an existing file or an official openai-whisper name
        (what :meth:`from_checkpoint` accepts), without reading any weights."""
        import whisper

        name = str(path)
        if not Path(name).expanduser().is_file() and name not in whisper.available_models():
            raise CheckpointError(
                f"Whisper transcriber {name!r} not found: pass an openai-whisper .pt file (with 'dims'), "
                f"a ct2-whisper: folder, or one of {whisper.available_models()}"
            )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", beam_size: int = 5, max_tokens: int | None = None
    ) -> WhisperTranscriber:
        """Load an openai-whisper file or official name (float32 on CPU; Whisper's own dtype rules on GPU)."""
        import whisper
        from whisper.model import ModelDimensions, Whisper

        from omnivox.encoders.base import weights_loaded_after
        from omnivox.encoders.whisper import read_openai_checkpoint

        cls.check_source(path)
        name = str(path)
        file = Path(name).expanduser()
        if file.is_file():
            checkpoint = read_openai_checkpoint(file)
            try:
                with weights_loaded_after():  # every parameter comes from the file, strictly
                    model = Whisper(ModelDimensions(**checkpoint["dims"]))
                model.load_state_dict(checkpoint["model_state_dict"], strict=True)
            except (TypeError, RuntimeError) as err:
                raise CheckpointError(f"{file}: weights do not match its dims {checkpoint['dims']}: {err}") from err
            model = model.to(device)
        else:  # an official name (check_source)
            try:
                model = whisper.load_model(name, device=str(device))
            except (urllib.error.URLError, OSError, RuntimeError) as err:
                raise CheckpointError(
                    f"could not load the openai-whisper weights {name!r} ({type(err).__name__}: {err}); "
                    "offline, pass the path of the .pt file instead of the name"
                ) from err
        if next(model.parameters()).device.type == "cpu":
            model = model.float()  # the converted tiny.en is stored in float16
        return cls(model, beam_size=beam_size, max_tokens=max_tokens, source=file if file.is_file() else None)

    # ----------------------------------------------------------------------------- audio
    @torch.no_grad()
    def encode(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[1, n_audio_ctx, D] encoder states of a 16 kHz clip of at most 30 s, padded to 30 s as Whisper was trained."""
        import whisper

        audio = torch.as_tensor(np.asarray(samples, dtype=np.float32)).reshape(-1)
        if audio.numel() > whisper.audio.N_SAMPLES:
            raise UserInputError(f"one Whisper window holds {whisper.audio.N_SAMPLES} samples (30 s), got {audio.numel()}")
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), self.model.dims.n_mels)  # [n_mels, 3000]
        param = next(self.model.parameters())
        return self.model.encoder(mel[None].to(device=param.device, dtype=param.dtype))

    # ----------------------------------------------------------------------------- search
    def _log_probs(self, logits: torch.Tensor, first: bool) -> torch.Tensor:
        """[N, V] log-probabilities of the next token, with the suppressed tokens ruled out."""
        logits = logits.float().clone()
        logits[:, self._suppress.to(logits.device)] = float("-inf")
        if first:
            logits[:, self._blank.to(logits.device)] = float("-inf")
        return logits.log_softmax(-1)

    @torch.no_grad()
    def nbest(self, features: torch.Tensor) -> list[Transcript]:
        """The ``beam_size`` best transcripts of one window, best first (by log-probability per token,
        openai-whisper's ranking).

        Args:
            features: [1, n_audio_ctx, D] from :meth:`encode`.
        """
        if features.dim() != 3 or features.shape[0] != 1:
            raise ValueError(f"expected the [1, T, D] states of one window, got {tuple(features.shape)}")
        beam = self.beam_size
        audio = features.expand(beam, -1, -1)
        cache, hooks = self.model.install_kv_cache_hooks()
        live: list[tuple[tuple[int, ...], float]] = [(self.prefix, 0.0)]
        done: dict[tuple[int, ...], float] = {}  # finished sequences, ending in the end token
        try:
            tokens = torch.tensor([self.prefix] * beam, device=features.device)  # [beam, L]: always `beam` rows
            for step in range(self.max_tokens):
                logits = self.model.decoder(tokens if step == 0 else tokens[:, -1:], audio, kv_cache=cache)
                log_probs = self._log_probs(logits[:, -1], first=step == 0)  # [beam, V]
                scores: dict[tuple[int, ...], tuple[float, int]] = {}
                for row, (seq, total) in enumerate(live):
                    top = log_probs[row].topk(beam + 1)
                    for lp, tok in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                        if lp != float("-inf"):
                            scores[seq + (tok,)] = (total + lp, row)
                # as openai-whisper: endings ranked above the last kept live hypothesis are finished
                live, sources = [], []
                for seq, (total, row) in sorted(scores.items(), key=lambda kv: -kv[1][0]):
                    if seq[-1] == self.eot:
                        if len(done) < beam:
                            done[seq] = total
                        continue
                    live.append((seq, total))
                    sources.append(row)
                    if len(live) == beam:
                        break
                if len(done) >= beam or not live:
                    break
                # rows follow their parents (spare rows repeat the first): reorder the self-attention
                # caches; the cross-attention ones hold the same window in every row
                pad = beam - len(live)
                index = torch.tensor(sources + sources[:1] * pad, device=features.device)
                for module, value in cache.items():
                    if value.shape[1] != audio.shape[1]:
                        cache[module] = value[index]
                tokens = torch.tensor([seq for seq, _ in live] + [live[0][0]] * pad, device=features.device)
        finally:
            for hook in hooks:
                hook.remove()
        for seq, total in live:  # out of tokens: the best unfinished ones fill up (their score lacks the end)
            if len(done) >= beam:
                break
            done[seq + (self.eot,)] = total
        hyps = [
            Transcript(self.tokenizer.decode(list(seq[len(self.prefix) : -1])).strip(), seq[len(self.prefix) : -1], total)
            for seq, total in done.items()
        ]
        return sorted(hyps, key=lambda h: -h.log_prob / max(1, len(h.tokens)))

    def score(self, features: torch.Tensor, texts: list[str]) -> list[float]:
        """Summed log-probability of each text (its tokens and the end token) given one window,
        under the model's own distribution: not the search's token rules, which would rule out
        texts that tokenise with a symbol the search never emits (the ":" of "5:20").

        Args:
            features: [1, n_audio_ctx, D] from :meth:`encode`.
            texts: the candidate transcripts; one longer than the decoder's positions scores -inf.
        """
        sequences = [self.tokenizer.encode(" " + t.strip()) if t.strip() else [] for t in texts]
        return self.score_tokens(features, sequences, search_rules=False)

    @torch.no_grad()
    def score_tokens(self, features: torch.Tensor, sequences: list[list[int]], search_rules: bool = True) -> list[float]:
        """Summed log-probability of each token sequence and the end token after it (teacher forcing).

        Args:
            features: [1, n_audio_ctx, D] from :meth:`encode`.
            sequences: text token ids, without the start sequence and the end token.
            search_rules: score as :meth:`nbest` does (suppressed tokens, no blank first: a
                sequence that breaks the rules scores -inf); False: the plain distribution.
        """
        seqs = [list(self.prefix) + list(s) + [self.eot] for s in sequences]
        out = [float("-inf")] * len(seqs)  # a text longer than the decoder's positions cannot be read from 30 s
        fits = [i for i, s in enumerate(seqs) if len(s) <= self.model.dims.n_text_ctx]
        if not fits:
            return out
        width = max(len(seqs[i]) for i in fits)
        ids = torch.full((len(fits), width), self.eot, dtype=torch.long, device=features.device)  # [N, W]
        for row, i in enumerate(fits):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        logits = self.model.decoder(ids[:, :-1], features.expand(len(fits), -1, -1))  # [N, W - 1, V]
        n = len(self.prefix)
        for row, i in enumerate(fits):
            target = torch.tensor(seqs[i][n:], device=logits.device)  # [m]: text tokens and the end
            predicted = logits[row, n - 1 : n - 1 + len(target)]  # [m, V]: the logits before each target
            if search_rules:
                first = self._log_probs(predicted[:1], first=True)  # no blank first
                log_probs = torch.cat([first, self._log_probs(predicted[1:], first=False)])
            else:
                log_probs = predicted.float().log_softmax(-1)
            out[i] = float(log_probs.gather(1, target[:, None]).sum())
        return out

    @torch.no_grad()
    def transcribe_long(self, samples: np.ndarray) -> str:
        """A clip of any length, by openai-whisper's long-form ``transcribe`` (beam search, no fallback
        temperatures, each window on its own)."""
        result = self.model.transcribe(
            np.asarray(samples, dtype=np.float32),
            language="en",
            task="transcribe",
            beam_size=self.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            fp16=False,
            verbose=None,
        )
        return str(result["text"]).strip()
