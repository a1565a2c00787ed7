"""The speech head as a model folder holds it (decoders/speech.py): save/load, voices, streaming,
and every broken file named in its error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny
import torch

from omnivox.decoders.speech import SpeechHead
from omnivox.errors import CheckpointError, UserInputError


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    return tiny.add_speech_head(tmp_path_factory.mktemp("speech"))


def test_a_saved_head_loads_and_speaks_the_same_codes_as_the_talker_it_came_from(speech_dir) -> None:
    from omnivox.decoders.phonemes import phonemize

    head = SpeechHead.from_folder(speech_dir)
    assert SpeechHead.present(speech_dir) and not SpeechHead.present(speech_dir / "codec")
    assert head.voices == list(tiny.TINY_VOICES) and head.default_voice == tiny.TINY_VOICES[0]
    spoken = head.say("Hello there.")
    assert spoken.voice == tiny.TINY_VOICES[0] and spoken.sample_rate == 16_000
    assert spoken.codes.shape[0] == 3 and spoken.waveform.shape == (spoken.codes.shape[1] * 320,)
    assert spoken.waveform.dtype == np.float32 and np.all(np.abs(spoken.waveform) <= 1)
    frames = torch.cat(list(head.talker.generate(torch.tensor([phonemize("Hello there.").ids]), voice=0)), -1)
    assert torch.equal(frames[0], spoken.codes)
    # the codes decode to the waveform the head returned
    np.testing.assert_allclose(spoken.waveform, head.codec.decode(spoken.codes[None])[0, 0].clamp(-1, 1).numpy(), atol=1e-5)


def test_pieces_handed_to_on_audio_make_the_whole_answer_and_the_first_comes_early(speech_dir) -> None:
    head = SpeechHead.from_folder(speech_dir)
    pieces: list[np.ndarray] = []
    spoken = head.say("The quick brown fox jumps over the lazy dog.", on_audio=pieces.append, chunk_frames=3)
    assert len(pieces) > 3 and all(p.ndim == 1 for p in pieces)
    np.testing.assert_allclose(np.clip(np.concatenate(pieces), -1, 1), spoken.waveform, atol=1e-6)
    assert spoken.first_audio_s is not None and spoken.first_audio_s <= spoken.seconds_taken


def test_voices_by_full_or_short_name_and_sampling_is_repeatable_with_a_seed(speech_dir) -> None:
    head = SpeechHead.from_folder(speech_dir)
    assert head.voice_id(None) == 0 and head.voice_id("piper:joe") == 1 and head.voice_id("joe") == 1
    with pytest.raises(UserInputError, match="unknown voice 'alloy'.*piper:joe"):
        head.say("Hi.", "alloy")
    a = head.say("Good morning.", "joe", temperature=1.0, top_k=4, seed=3)
    b = head.say("Good morning.", "joe", temperature=1.0, top_k=4, seed=3)
    assert a.voice == "piper:joe" and torch.equal(a.codes, b.codes)
    with pytest.raises(UserInputError, match="no text"):
        head.say("   ")
    with pytest.raises(UserInputError, match="frames, more than the limit"):
        head.say("This sentence is far too long to be spoken in a tenth of a second.", max_seconds=0.1)


def _broken(src, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(src, folder)
    data = json.loads((folder / "talker" / "talker.json").read_text())
    edit(folder, data)
    if (folder / "talker" / "talker.json").exists():
        (folder / "talker" / "talker.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f, d: d.update(phonemes=d["phonemes"][:-1]), "phoneme table differs"),
        (lambda f, d: d.update(codec="elsewhere"), "names the codec folder 'elsewhere'"),
        (lambda f, d: d.update(default_voice="nobody"), "default_voice 'nobody' is not among voices"),
        (lambda f, d: d.update(voices=[]), "voices must be a non-empty list"),
        (lambda f, d: d["config"].update(dim=48), "does not fit"),
        (lambda f, d: d["config"].update(codebook_size=32), "does not fit|emits 3 x 32 codes"),
        (lambda f, d: (f / "talker" / "talker.safetensors").write_bytes(b"junk"), "cannot read .*talker.safetensors"),
        (lambda f, d: d["config"].update(bogus=1), "unknown keys \\['bogus'\\]"),
    ],
)
def test_broken_talker_folders_are_refused_with_the_file_and_the_fault(speech_dir, tmp_path, edit, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        SpeechHead.from_folder(_broken(speech_dir, tmp_path, edit))
