"""The speech head (decoders/talker.py) at toy sizes: alignment search, expansion, losses,
frame-by-frame generation restricted to each codebook, streaming through a codec."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from omnivox.decoders.codec import MelCodec, MelCodecConfig
from omnivox.decoders.phonemes import PHONEME_ID, PHONEMES, phonemize
from omnivox.decoders.talker import Talker, TalkerConfig, expand, monotonic_alignment, speak, stream_decode
from omnivox.errors import UserInputError

TINY = TalkerConfig(
    num_phonemes=len(PHONEMES), num_codebooks=3, codebook_size=16, n_mels=8, dim=32, heads=4, ffn=64,
    encoder_layers=1, decoder_layers=2, dropout=0.0, num_voices=4, num_tasks=2, max_phoneme_frames=6,
    max_positions=256,
)  # fmt: skip


def test_alignment_search_finds_the_best_monotonic_path() -> None:
    # 3 phonemes, 7 frames: frames 0-1 like phoneme 0, 2-4 like phoneme 1, 5-6 like phoneme 2
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    score = torch.full((1, 3, 7), -5.0)
    score[0, owner, torch.arange(7)] = 0.0
    assert monotonic_alignment(score, torch.tensor([3]), torch.tensor([7])).tolist() == [[2, 3, 2]]
    # a phoneme the frames never resemble still gets its one frame; padding gets none
    score = torch.zeros(2, 4, 6)
    score[:, 1] = -100.0
    durations = monotonic_alignment(score, torch.tensor([3, 4]), torch.tensor([6, 5]))
    assert durations[0, 1] == 1 and durations[1, 1] == 1
    assert durations.sum(-1).tolist() == [6, 5] and durations[0, 3] == 0
    with pytest.raises(UserInputError, match="cannot align 4 phonemes to 3 frames"):
        monotonic_alignment(torch.zeros(1, 4, 3), torch.tensor([4]), torch.tensor([3]))


def test_expand_repeats_states_by_duration() -> None:
    states = torch.arange(3.0)[None, :, None].expand(1, 3, 2)
    out, phoneme, position = expand(states, torch.tensor([[2, 1, 3]]), 8)
    assert out[0, :, 0].tolist() == [0, 0, 1, 2, 2, 2, 0, 0]  # zeros past the end
    assert phoneme[0, :6].tolist() == [0, 0, 1, 2, 2, 2]
    assert position[0, :6].tolist() == [0, 1, 0, 0, 1, 2]


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phonemes = torch.randint(3, len(PHONEMES), (2, 5), generator=g)
    phoneme_mask = torch.tensor([[True] * 5, [True] * 4 + [False]])
    codes = torch.randint(0, 16, (2, 3, 12), generator=g)
    frame_mask = torch.tensor([[True] * 12, [True] * 9 + [False] * 3])
    frames = torch.randn(2, 12, 8, generator=g)
    return phonemes, phoneme_mask, codes, frame_mask, frames, torch.tensor([0, 3]), torch.tensor([1, 0])


def test_losses_are_finite_and_train_every_part() -> None:
    torch.manual_seed(0)
    talker = Talker(TINY)
    losses = talker(*_batch())
    for name in ("total", "codes", "prior", "duration"):
        assert torch.isfinite(getattr(losses, name)), name
    assert losses.codes.item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=0.3)  # near uniform at init
    losses.total.backward()
    untouched = [n for n, p in talker.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # the start row of the code tables is the only row of frame 0; every table is used
    assert not [n for n in untouched if not n.startswith(("llm_proj", "text_pos", "frame_pos"))], untouched


def test_a_talker_learns_one_utterance_by_heart() -> None:
    torch.manual_seed(0)
    talker = Talker(TINY)
    batch = _batch()
    opt = torch.optim.Adam(talker.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        losses = talker(*batch)
        first = first if first is not None else losses.codes.item()
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    assert losses.codes.item() < 0.2 * first
    assert losses.accuracy.item() > 0.9


def test_generation_emits_valid_codes_frame_by_frame_and_streams_through_a_codec() -> None:
    torch.manual_seed(0)
    talker = Talker(TINY).eval()
    codec = MelCodec(MelCodecConfig(n_mels=8, num_codebooks=3, codebook_size=16, dim=16, intermediate_dim=32,
                                    num_layers=2, kernel_size=3, upsample=2)).eval()  # fmt: skip
    phonemes = torch.tensor([phonemize("Hello there.").ids])
    _, durations = talker.plan(phonemes)
    frames = list(talker.generate(phonemes, voice=1, temperature=0.0))
    assert len(frames) == int(durations.sum()) and all(f.shape == (1, 3, 1) for f in frames)
    codes = torch.cat(frames, -1)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    # greedy is deterministic; sampling with a seed too
    assert torch.equal(torch.cat(list(talker.generate(phonemes, voice=1)), -1), codes)
    a = torch.cat(list(talker.generate(phonemes, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(1))), -1)
    b = torch.cat(list(talker.generate(phonemes, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(1))), -1)
    assert torch.equal(a, b)

    heard = []
    spoken, wav = speak(talker, codec, phonemes, on_audio=heard.append, chunk_frames=2, voice=1)
    assert torch.equal(spoken, codes)
    assert wav.shape[-1] == codes.shape[-1] * 320
    torch.testing.assert_close(torch.cat(heard, -1), wav)
    torch.testing.assert_close(wav, codec.decode(codes), atol=1e-5 * float(wav.abs().max()), rtol=0)
    assert len(heard) > 2  # audio arrived before the last frame was made


def test_generation_refuses_bad_requests() -> None:
    talker = Talker(TINY).eval()
    phonemes = torch.tensor([[PHONEME_ID["h"], PHONEME_ID["i"]]])
    with pytest.raises(UserInputError, match="voice must be in \\[0, 4\\), got 9"):
        next(talker.generate(phonemes, voice=9))
    with pytest.raises(UserInputError, match="speed must be in"):
        next(talker.generate(phonemes, speed=0))
    with pytest.raises(UserInputError, match="more than the limit of 1"):
        next(talker.generate(phonemes, max_frames=1))
    with pytest.raises(UserInputError, match="one utterance"):
        talker.plan(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(UserInputError, match="nothing speakable"):
        phonemize("... !")


# ----------------------------------------------------------------------------- tasks on audio
SOURCE = replace(TINY, source_mels=8, source_layers=1)


def _codec():
    return MelCodec(MelCodecConfig(n_mels=8, num_codebooks=3, codebook_size=16, dim=16, intermediate_dim=32,
                                   num_layers=2, kernel_size=3)).eval()  # fmt: skip


def test_a_talker_learns_to_clean_a_clip_by_heart_and_generates_its_codes_from_the_noisy_one() -> None:
    """Noise suppression in miniature: the input is a clip's frames plus noise, the target the
    codes of the clean frames; after training, greedy generation from the noisy frames gives
    exactly the clean clip's codes, and the same code path decodes them."""
    torch.manual_seed(0)
    codec = _codec()
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 20, 8, generator=g)
    noisy = clean + 0.5 * torch.randn(2, 20, 8, generator=g)
    codes = codec.quantize(clean)  # [2, 3, 20]
    mask = torch.ones(2, 20, dtype=torch.bool)
    talker = Talker(SOURCE)
    opt = torch.optim.Adam(talker.parameters(), lr=3e-3)
    for _ in range(200):
        losses = talker.forward_source(noisy, mask, codes, torch.tensor([1, 1]))
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    assert losses.accuracy.item() == 1.0
    talker.eval()
    made = torch.cat(list(talker.generate_from_source(noisy[:1], task=1)), -1)
    assert torch.equal(made, codes[:1])
    heard: list[torch.Tensor] = []
    spoken, wav = stream_decode(talker.generate_from_source(noisy[1:], task=1), codec, heard.append, chunk_frames=4)
    assert torch.equal(spoken, codes[1:]) and len(heard) > 3
    torch.testing.assert_close(wav, codec.decode(codes[1:]), atol=1e-5 * float(wav.abs().max()), rtol=0)


def test_an_enrolment_clip_steers_the_output_and_bad_sources_are_refused() -> None:
    torch.manual_seed(0)
    talker = Talker(SOURCE).eval()
    source = torch.randn(1, 10, 8)
    with torch.no_grad():
        mask = torch.ones(1, 10, dtype=torch.bool)
        plain = talker.source_inputs(source, mask, torch.tensor([1]))
        a = talker.source_inputs(source, mask, torch.tensor([1]), torch.randn(1, 7, 8), torch.ones(1, 7, dtype=torch.bool))
        b = talker.source_inputs(source, mask, torch.tensor([1]), torch.randn(1, 7, 8), torch.ones(1, 7, dtype=torch.bool))
    assert not torch.allclose(a, plain) and not torch.allclose(a, b)
    # padding in the enrolment clip does not change its vector
    clip = torch.randn(1, 5, 8)
    padded = torch.cat([clip, torch.randn(1, 3, 8)], 1)
    with torch.no_grad():
        v1 = talker.prompt_vector(clip, torch.ones(1, 5, dtype=torch.bool))
        v2 = talker.prompt_vector(padded, torch.tensor([[True] * 5 + [False] * 3]))
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserInputError, match=r"source frames must be \[B, T, 8\]"):
        talker.encode_source(torch.randn(1, 10, 5), torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(UserInputError, match="task must be in"):
        next(talker.generate_from_source(source, task=99))
    with pytest.raises(UserInputError, match="source_mels is 0"):
        Talker(TINY).encode_source(source, torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(UserInputError, match=r"codes .* must be \[B, 3, T\]"):
        talker.forward_source(source, torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 3, 9, dtype=torch.long), torch.tensor([0]))


def test_code_dropout_hides_previous_frames_in_training_only() -> None:
    torch.manual_seed(0)
    talker = Talker(TINY)
    codes = torch.randint(0, 16, (2, 3, 12))
    start = talker.previous_codes(torch.full((2, 3, 1), 0))[:, :1]  # the start row's embedding [2, 1, D]
    hidden = talker.previous_codes(codes, drop=0.999999)
    torch.testing.assert_close(hidden, start.expand_as(hidden))
    some = talker.previous_codes(codes, drop=0.5)
    same = torch.isclose(some, talker.previous_codes(codes)).all(-1)  # [2, T]: frames left as they were
    assert 0 < int(same.sum()) < same.numel()
    talker.eval()
    torch.testing.assert_close(talker.previous_codes(codes, drop=0.9), talker.previous_codes(codes))


def test_a_talker_without_history_decodes_what_it_is_taught_and_ignores_earlier_codes() -> None:
    torch.manual_seed(0)
    talker = Talker(replace(TINY, history=False)).double().eval()
    assert len(talker.code_embed) == 0
    phonemes = torch.tensor([phonemize("Hello there.").ids])
    codes = torch.cat(list(talker.generate(phonemes, voice=2)), -1)  # greedy, frame by frame with a cache
    h, durations = talker.plan(phonemes, voice=2)
    x = talker.frame_inputs(h, durations, codes.shape[-1], torch.tensor([2]), torch.tensor([0]))

    def teacher_forced(c: torch.Tensor) -> list[torch.Tensor]:
        y = x + talker.previous_codes(c) + talker.frame_pos(torch.arange(c.shape[-1]))
        for block in talker.decoder:
            y = block(y, causal=True)
        return talker.depth_logits(talker.decoder_norm(y), c)

    logits = teacher_forced(codes)
    assert torch.equal(torch.stack([lg.argmax(-1)[0] for lg in logits]), codes[0])
    # other codes in earlier frames change nothing in a frame's codebook-1 scores
    other = codes.clone()
    other[..., :-1] = (other[..., :-1] + 5) % 16
    torch.testing.assert_close(teacher_forced(other)[0], logits[0], rtol=0, atol=1e-12)


def test_durations_depend_on_the_voice() -> None:
    torch.manual_seed(0)
    talker = Talker(TINY).eval()
    phonemes = torch.tensor([phonemize("Hello there, how are you?").ids])
    mask = torch.ones_like(phonemes, dtype=torch.bool)
    h = talker.encode_text(phonemes, mask)

    def log_d(voice: int) -> torch.Tensor:
        return talker.log_durations(h, mask, torch.tensor([voice]))

    torch.testing.assert_close(log_d(0), log_d(1), rtol=0, atol=0)  # a fresh voice table is zeros: every voice alike
    with torch.no_grad():
        talker.duration_voice.weight[1].normal_(0, 1.0)
    assert (log_d(0) - log_d(1)).abs().max() > 1e-3
    with pytest.raises(UserInputError, match="voice must be in \\[0, 4\\), got 4"):
        talker.plan(phonemes, voice=4)
    with pytest.raises(Exception, match="history must be true or false"):
        replace(TINY, history=1)
