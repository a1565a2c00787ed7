"""Whisper's decoder as transcript proposer/scorer: parity with openai-whisper's beam search on random weights."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
import whisper

from omnivox.agent.transcriber import WhisperTranscriber
from omnivox.errors import CheckpointError, UserInputError

EOT = 50256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.make_whisper(tmp_path_factory.mktemp("wd") / "whisper.pt", n_vocab=51864, n_text_ctx=32)


def load(checkpoint, ends: bool, beam_size: int = 5, max_tokens: int = 12) -> WhisperTranscriber:
    """The tiny checkpoint; ``ends``: its end token looks like a likely text token, so hypotheses finish."""
    transcriber = WhisperTranscriber.from_checkpoint(checkpoint, beam_size=beam_size, max_tokens=max_tokens)
    if ends:
        with torch.no_grad():
            emb = transcriber.model.decoder.token_embedding.weight  # [V, D]
            probe = transcriber.encode(clip(0))
            top = transcriber.model.decoder(torch.tensor([transcriber.prefix]), probe)[0, -1].argmax()
            emb[EOT] = emb[top] + 0.5 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    return transcriber


def clip(seed: int) -> np.ndarray:
    if seed == 0:
        return tiny.tone_clip(2.0)
    return np.random.default_rng(seed).normal(0.0, 0.1, 16000 * (1 + seed)).astype(np.float32)


def official(transcriber: WhisperTranscriber, samples: np.ndarray, beam_size: int, max_tokens: int):
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(samples)))
    options = whisper.DecodingOptions(
        language="en", without_timestamps=True, beam_size=beam_size, fp16=False, sample_len=max_tokens
    )
    return whisper.decode(transcriber.model, mel, options)


@pytest.mark.parametrize("ends", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_hypothesis_equals_openai_whisper_beam_search(checkpoint, ends, seed):
    transcriber = load(checkpoint, ends)
    samples = clip(seed)
    hyps = transcriber.nbest(transcriber.encode(samples))
    result = official(transcriber, samples, beam_size=5, max_tokens=12)
    assert len(hyps) == 5
    assert list(hyps[0].tokens) == result.tokens
    assert hyps[0].text == result.text.strip()
    # openai-whisper reports the sum over the text tokens and the end, divided by their count.
    # Each log-prob is logit - logsumexp near 19 (ulp 1.9e-6), from logits the two searches build with
    # other kv-cache batch shapes: a few ulp per token, which need not cancel in the mean (3e-5 = 16 ulp).
    assert hyps[0].log_prob / (len(hyps[0].tokens) + 1) == pytest.approx(result.avg_logprob, abs=3e-5)
    ranks = [h.log_prob / len(h.tokens) for h in hyps]
    assert ranks == sorted(ranks, reverse=True)
    if ends:
        assert any(len(h.tokens) < 12 for h in hyps)  # the search really finished some hypotheses


@pytest.mark.parametrize("seed", [0, 1])
def test_search_scores_equal_teacher_forcing(checkpoint, seed):
    """The cache reordering of the search gives each hypothesis the score a plain forward pass gives."""
    transcriber = load(checkpoint, ends=True)
    features = transcriber.encode(clip(seed))
    hyps = transcriber.nbest(features)
    finished = [h for h in hyps if len(h.tokens) < 12]  # the others' scores lack the end token
    assert len(finished) >= 2
    forced = transcriber.score_tokens(features, [list(h.tokens) for h in finished])
    assert forced == pytest.approx([h.log_prob for h in finished], abs=1e-4)


def test_beam_of_one_is_greedy_decoding_without_cache(checkpoint):
    transcriber = load(checkpoint, ends=True, beam_size=1, max_tokens=8)
    features = transcriber.encode(clip(1))
    seq, total = list(transcriber.prefix), 0.0
    for step in range(8):
        logits = transcriber.model.decoder(torch.tensor([seq]), features)[:, -1]
        lp = transcriber._log_probs(logits, first=step == 0)[0]
        token = int(lp.argmax())
        seq.append(token)
        total += float(lp[token])
        if token == EOT:
            break
    (hyp,) = transcriber.nbest(features)
    text = seq[len(transcriber.prefix) :]
    assert list(hyp.tokens) == [t for t in text if t != EOT]
    assert hyp.log_prob == pytest.approx(total, abs=1e-4)


def test_text_scores(checkpoint):
    transcriber = load(checkpoint, ends=True)
    features = transcriber.encode(clip(0))
    hyp = transcriber.nbest(features)[0]
    texts = [hyp.text, "", "word " * 40, "at 5:20 pm"]
    scores = transcriber.score(features, texts)
    ids = [transcriber.tokenizer.encode(" " + hyp.text), [], [], transcriber.tokenizer.encode(" at 5:20 pm")]
    plain = transcriber.score_tokens(features, ids, search_rules=False)
    # score() leaves the too-long text out of its batch (3 rows, not 4): other GEMM shapes, so a few
    # ulp of the logits (~19, ulp 1.9e-6) per token; pytest's default rel 1e-6 gives plain[1] (-0.96) 1e-6.
    assert scores[0] == pytest.approx(plain[0], abs=1e-4) and scores[1] == pytest.approx(plain[1], abs=1e-4)
    assert scores[3] == pytest.approx(plain[3], abs=1e-4)
    assert scores[2] == float("-inf")  # longer than the 32 decoder positions
    # the search's rules: no end first, no bare ":" (a non-speech symbol); the plain distribution allows both
    ruled = transcriber.score_tokens(features, ids, search_rules=True)
    assert ruled[1] == float("-inf") and ruled[3] == float("-inf")
    assert all(np.isfinite(plain[i]) for i in (0, 1, 3))
    with torch.no_grad():  # by hand: log-softmax of the plain logits at each target
        seq = list(transcriber.prefix) + ids[3] + [EOT]
        logits = transcriber.model.decoder(torch.tensor([seq[:-1]]), features)[0].log_softmax(-1)
        n = len(transcriber.prefix)
        by_hand = sum(float(logits[n - 1 + k, t]) for k, t in enumerate(seq[n:]))
    assert plain[3] == pytest.approx(by_hand, abs=1e-4)


def test_long_form_transcribes_a_clip_over_one_window(checkpoint):
    transcriber = load(checkpoint, ends=True)
    samples = np.tile(tiny.tone_clip(2.0), 18)  # 36 s
    with pytest.raises(UserInputError, match="30 s"):
        transcriber.encode(samples)
    assert isinstance(transcriber.transcribe_long(samples), str)


def test_bad_checkpoints_and_settings(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        WhisperTranscriber.from_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable openai-whisper checkpoint"):
        WhisperTranscriber.from_checkpoint(junk)
    wrong = tmp_path / "wrong.pt"
    saved = torch.load(checkpoint, weights_only=True)
    saved["dims"]["n_text_state"] = 24
    torch.save(saved, wrong)
    with pytest.raises(CheckpointError, match="do not match its dims"):
        WhisperTranscriber.from_checkpoint(wrong)
    with pytest.raises(UserInputError, match="beam_size"):
        WhisperTranscriber.from_checkpoint(checkpoint, beam_size=0)
    with pytest.raises(UserInputError, match=r"max_tokens must be in \[1, 29\]"):  # 32 positions: 2 start, 1 end
        WhisperTranscriber.from_checkpoint(checkpoint, max_tokens=30)
