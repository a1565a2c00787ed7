"""`omnivox eval --suite speech-out` on a tiny random speech head and a tiny espeak `data tts` corpus,
with the real Whisper tiny.en reading both the source recordings and the model's speech."""

from __future__ import annotations

import json
import shutil

import pytest
import tiny

from omnivox.agent import cli
from omnivox.datagen.speech_pairs import TTSOptions, generate_tts
from omnivox.datagen.text import BUILTIN_SENTENCES

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not on PATH (apt-get install espeak-ng)")


def test_speech_out_suite_scores_every_voice_beside_its_source(tmp_path, capsys) -> None:
    data = tmp_path / "tts"
    opts = TTSOptions(voices=("espeak:en-us+m1",), fortune_dir=None, sentences=BUILTIN_SENTENCES, validation_items=0.2,
                      test_items=0.4, held_out_sentences=0.15, progress=False)  # fmt: skip
    generate_tts(data, 0.008, seed=0, options=opts)
    folder = tiny.add_speech_head(tmp_path / "model")
    (folder / "config.json").write_text("{}")  # a model folder by name; the suite loads the speech head alone
    out = tmp_path / "eval"
    assert cli.main(["eval", "--suite", "speech-out", "--model", str(folder), "--data", str(data), "--limit", "2",
                     "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert len(results["items"]) == 2 and set(results["voices"]) == {tiny.TINY_VOICES[0]}  # the source voice is not the model's
    voice = results["voices"][tiny.TINY_VOICES[0]]
    assert voice["sources"] == ["espeak:en-us+m1"] and voice["sentences"] == 2
    assert voice["wer_source"] <= 0.5  # Whisper reads espeak-ng's clean speech of a built-in sentence
    assert 0 <= voice["wer_model"] and voice["real_time_factor"] > 0 and voice["first_audio_ms_median"] > 0
    for item in results["items"]:
        assert item["first_audio_s"] <= item["speak_seconds"]
        assert item["similarity"] is None or -1.0 <= item["similarity"] <= 1.0
    assert (out / "spectrograms.png").read_bytes()[:4] == b"\x89PNG" and len(list((out / "samples").glob("*.wav"))) == 2
    assert "WER source voice" in table and tiny.TINY_VOICES[0] in table
    assert cli.main(["eval", "--suite", "speech-out", "--model", str(folder)]) == 2
    assert "needs --data" in capsys.readouterr().err
