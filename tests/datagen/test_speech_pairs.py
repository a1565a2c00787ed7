"""`omnivox data tts`: clean read speech in named voices (espeak-ng voices here: fast, always installed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omnivox.datagen.generate import SPLITS, SynthOptions, generate
from omnivox.datagen.speech_pairs import TTSOptions, generate_tts
from omnivox.datagen.text import BUILTIN_SENTENCES, sentence_split
from omnivox.errors import UserInputError
from omnivox.training.talker import clean_speech_items

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not on PATH (apt-get install espeak-ng)")

VOICES = ("espeak:en-us+m1", "espeak:en-gb+f2")
OPTS = TTSOptions(voices=VOICES, weights=(3.0, 1.0), fortune_dir=None, sentences=BUILTIN_SENTENCES, validation_items=0.2,
                  test_items=0.2, held_out_sentences=0.15, progress=False)  # fmt: skip
HOURS = 0.02  # 18 items


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tts") / "a"
    generate_tts(out, HOURS, seed=1, workers=1, options=OPTS)
    return out


def test_same_seed_same_bytes_with_any_worker_count_and_resume_extends(corpus: Path, tmp_path: Path) -> None:
    generate_tts(tmp_path / "b", HOURS, seed=1, workers=2, options=OPTS)
    assert _digest(corpus) == _digest(tmp_path / "b")
    generate_tts(tmp_path / "b", 2 * HOURS, seed=1, workers=1, options=OPTS)  # more hours: the first items stay
    grown = _digest(tmp_path / "b")
    assert all(grown[k] == v for k, v in _digest(corpus).items() if k.startswith(("items/", "audio/")))
    assert sum(k.startswith("items/") for k in grown) == 2 * sum(k.startswith("items/") for k in _digest(corpus))


def test_items_are_clean_single_voice_speech_with_held_out_sentences(corpus: Path) -> None:
    summary = json.loads((corpus / "dataset.json").read_text())
    lines = {s: [json.loads(x) for x in (corpus / f"{s}.jsonl").read_text().splitlines()] for s in SPLITS}
    assert sum(len(v) for v in lines.values()) == summary["items"] == 18
    assert lines["train"] and lines["validation"] + lines["test"]
    for split, items in lines.items():
        for item in items:
            meta = item["metadata"]
            assert item["task"] == "tts" and item["answer"] == meta["text"] and meta["text"] in item["instruction"]
            assert meta["voice"]["voice"] in VOICES and meta["voice"]["speed"] == OPTS.speed
            # validation and test speak only the held-out sentences; train never does
            assert sentence_split(meta["text"], OPTS.held_out_sentences) == split
            audio, rate = sf.read(corpus / item["audio"], dtype="float32")
            assert rate == 16_000 and abs(audio.size / rate - item["duration"]) < 1e-3
            seg = meta["segments"][0]
            lead = audio[: int(seg["onset"] * rate)]
            assert len(meta["segments"]) == 1 and float(np.abs(lead).max(initial=0)) == 0.0  # silence before speech
            rms = 20 * np.log10(np.sqrt(np.mean(audio[int(seg["onset"] * rate) : int(seg["offset"] * rate)] ** 2)))
            assert -30 < rms < -18.5  # -20 dBFS, or lower where the peak limit pulled it down
    # the speech head's trainer takes every item
    assert len(clean_speech_items(corpus, "train")) == len(lines["train"])
    counts = {v: sum(i["metadata"]["voice"]["voice"] == v for s in SPLITS for i in lines[s]) for v in VOICES}
    assert counts[VOICES[0]] > counts[VOICES[1]]  # weights 3:1


def test_bad_requests_name_the_fault(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="voice 'espeak:nobody' is not available"):
        generate_tts(tmp_path / "x", HOURS, options=TTSOptions(voices=("espeak:nobody",), fortune_dir=None, sentences=BUILTIN_SENTENCES))
    with pytest.raises(UserInputError, match="unknown engine 'festival'"):
        generate_tts(tmp_path / "x", HOURS, options=TTSOptions(voices=("festival:kal",), fortune_dir=None, sentences=BUILTIN_SENTENCES))
    with pytest.raises(UserInputError, match="weights"):
        TTSOptions(voices=VOICES, weights=(1.0,))
    with pytest.raises(UserInputError, match="other settings"):
        generate_tts(corpus, HOURS, seed=2, options=OPTS)
    synth = tmp_path / "synth"
    generate(synth, 0.002, seed=0, options=SynthOptions(engines=("espeak",), fortune_dir=None, sentences=BUILTIN_SENTENCES,
                                                          progress=False, task_shares={"task_calls": 0.0}))  # fmt: skip
    with pytest.raises(UserInputError, match="folder of its own"):
        generate_tts(synth, HOURS, options=OPTS)
