"""The feature cache feeds the adapter exactly what encode_clip computes."""

from __future__ import annotations

from dataclasses import replace

import tiny
import torch

from omnivox.agent.model import OmnivoxModel
from omnivox.training.build import FeatureGeometry
from omnivox.training.features import FeatureCache


def _geometry(model: OmnivoxModel) -> FeatureGeometry:
    q = model.config.qformer
    return FeatureGeometry(model.config.encoders, model.config.audio, q.frame_rate, q.kernel_frames, q.stride_frames, q.queries_per_window)


def test_cached_features_give_identical_tokens(tiny_folder, tmp_path):
    model = OmnivoxModel.from_pretrained(tiny_folder)
    clips = {"short.wav": tiny.tone_clip(1.7, 400.0), "long.wav": tiny.tone_clip(31.0, 900.0, seed=4)}
    for trim in (True, False):
        m = model if trim else OmnivoxModel(
            replace(model.config, audio=replace(model.config.audio, trim_to_audio=False)),
            list(model.encoders), model.adapter, model.llm, model.tokenizer,
        )
        exact = FeatureCache(tmp_path / "cache", _geometry(m), "float32")
        half = FeatureCache(tmp_path / "cache", _geometry(m), "float16")
        assert exact.folder != half.folder  # the key covers dtype and audio settings
        for name, samples in clips.items():
            windows = m.encode_clip_features(samples)
            exact.write(name, windows)
            half.write(name, windows)
        reopened = FeatureCache(tmp_path / "cache", _geometry(m), "float32")  # reads the index from disk
        for name, samples in clips.items():
            expected = m.encode_clip(samples).tokens
            assert expected.shape[0] == reopened.num_tokens(name)
            assert torch.equal(m.audio_tokens(reopened.load(name)), expected)
            torch.testing.assert_close(m.audio_tokens(half.load(name)), expected, rtol=0.02, atol=0.02)
        assert reopened.missing(["long.wav", "other.wav"]) == ["other.wav"]
    # trimming keeps only the frames of covering windows: 1.7 s -> 85 frames -> 5 windows of 17
    short = model.encode_clip_features(clips["short.wav"])
    assert [f.shape[0] for f in short[0].features] == [85, 80] and short[0].num_tokens == 5
    long = model.encode_clip_features(clips["long.wav"])
    # a full 30 s window: 1500 frames -> 88 whole windows + 1 covering the last 4 frames (zero-padded)
    assert [w.num_tokens for w in long] == [89, 3]
