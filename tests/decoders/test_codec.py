"""Codecs (decoders/codec.py): the interface, the nano MelCodec (streaming equals whole decode,
save/load), EnCodec through transformers on a tiny random model saved in the HF format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from omnivox.decoders.codec import (
    CodesError,
    EncodecCodec,
    MelCodec,
    MelCodecConfig,
    load_codec,
    load_mel_codec,
    save_mel_codec,
)
from omnivox.errors import AudioInputError, CheckpointError, UserInputError

TINY = MelCodecConfig(n_mels=16, num_codebooks=3, codebook_size=32, dim=16, intermediate_dim=32, num_layers=2, kernel_size=5)
TINY_UP = MelCodecConfig(**{**TINY.__dict__, "upsample": 2})  # pieces of 160 samples, 640-sample windows


def tiny_mel_codec(seed: int = 0, config: MelCodecConfig = TINY) -> MelCodec:
    torch.manual_seed(seed)
    codec = MelCodec(config).eval()
    with torch.no_grad():  # random weights and codebooks of a size that makes audible output
        for p in codec.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        codec.codebooks.copy_(torch.randn_like(codec.codebooks))
    return codec


def speechy(seconds: float, seed: int = 0) -> torch.Tensor:
    """A [1, 1, S] clip: a gliding harmonic tone under noise, amplitude-modulated like syllables."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16_000 * seconds)) / 16_000
    f0 = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 16_000
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t).clamp(min=0)
    return (0.2 * voiced * envelope + 0.01 * torch.randn(t.shape, generator=g))[None, None]


# ----------------------------------------------------------------------------- MelCodec
def test_mel_codec_shapes_rates_and_code_range() -> None:
    codec = tiny_mel_codec()
    wav = torch.cat([speechy(1.01, 0), speechy(1.01, 1)])  # 16160 samples: 50.5 frames -> 51
    codes = codec.encode(wav)
    assert codes.shape == (2, 3, 51) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    assert codec.frame_rate == 50 and codec.samples_per_frame == 320
    assert codec.bitrate == 50 * 3 * 5
    assert codec.decode(codes).shape == (2, 1, 51 * 320)
    assert MelCodec(MelCodecConfig()).bitrate == 4000  # the nano codec: 8 x 1024 codes at 50 Hz


def test_mel_codec_quantiser_is_residual_nearest_neighbour() -> None:
    codec = tiny_mel_codec()
    z = torch.randn(1, 7, 16)
    codes = codec.quantize(z)
    residual = z[0]
    for k in range(3):  # each codebook takes the codeword nearest to what the earlier ones left
        expected = torch.cdist(residual, codec.codebooks[k]).argmin(-1)
        assert torch.equal(codes[0, k], expected)
        residual = residual - codec.codebooks[k][expected]
    torch.testing.assert_close(codec.dequantize(codes)[0], z[0] - residual)


def test_mel_codec_encoder_is_causal() -> None:
    """Frame t depends only on samples before (t + 1) * hop: changing the future keeps earlier codes."""
    codec = tiny_mel_codec()
    wav = speechy(1.0)
    changed = wav.clone()
    changed[..., 8000:] = torch.randn(8000) * 0.3
    a, b = codec.encode(wav), codec.encode(changed)
    assert torch.equal(a[..., :25], b[..., :25])
    assert not torch.equal(a[..., 25:], b[..., 25:])


@pytest.mark.parametrize("config", [TINY, TINY_UP], ids=["upsample1", "upsample2"])
@pytest.mark.parametrize("pieces", [[1, 1, 1, 97], [2, 3, 5, 7, 11, 72], [100], [4] * 25, [0, 60, 0, 40]])
def test_mel_codec_stream_equals_whole_decode(pieces: list[int], config: MelCodecConfig) -> None:
    codec = tiny_mel_codec(config=config)
    codes = codec.encode(torch.cat([speechy(2.0, 0), speechy(2.0, 1)]))
    whole = codec.decode(codes)
    stream, out, start = codec.stream(), [], 0
    for n in pieces:
        chunk = stream.push(codes[..., start : start + n])
        assert chunk.shape[:2] == (2, 1)
        out.append(chunk)
        start += n
    out.append(stream.flush())
    streamed = torch.cat(out, -1)
    assert streamed.shape == whole.shape
    # the same sums in a different order (convolutions over shorter inputs): float32 rounding only
    torch.testing.assert_close(streamed, whole, atol=1e-5 * float(whole.abs().max()), rtol=0)


@pytest.mark.parametrize(("config", "held_back"), [(TINY, 1280 - 320), (TINY_UP, 640 - 160)])
def test_mel_codec_stream_gives_audio_before_the_end(config: MelCodecConfig, held_back: int) -> None:
    codec = tiny_mel_codec(config=config)
    codes = codec.encode(speechy(1.0))
    stream = codec.stream()
    first = stream.push(codes[..., :5])
    # 5 frames = 1600 samples; the last synthesis window's overlap waits for the next frames
    assert first.shape[-1] == 5 * 320 - held_back
    assert codec.decode(codes).shape[-1] == 50 * 320
    assert first.abs().max() > 0


def test_mel_codec_save_load_round_trip(tmp_path: Path) -> None:
    codec = tiny_mel_codec()
    save_mel_codec(codec, tmp_path / "codec")
    loaded = load_codec(tmp_path / "codec")
    assert isinstance(loaded, MelCodec) and loaded.config == TINY
    wav = speechy(0.5)
    assert torch.equal(loaded.encode(wav), codec.encode(wav))
    torch.testing.assert_close(loaded.decode(codec.encode(wav)), codec.decode(codec.encode(wav)), atol=0, rtol=0)


def test_mel_codec_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    folder = save_mel_codec(tiny_mel_codec(), tmp_path / "codec")
    config = json.loads((folder / "codec.json").read_text())
    (folder / "codec.json").write_text(json.dumps({**config, "dim": 24}))
    with pytest.raises(CheckpointError, match=r"dwconv.bias has shape \(16,\), the config needs \(24,\)"):
        load_mel_codec(folder)
    (folder / "codec.json").write_text(json.dumps({**config, "layers": 3}))
    with pytest.raises(CheckpointError, match=r"unknown keys \['layers'\]"):
        load_mel_codec(folder)
    (folder / "codec.json").write_text(json.dumps({**config, "n_fft": 1000}))
    with pytest.raises(CheckpointError, match="n_fft \\(1000\\) must be a multiple of hop_length \\(320\\)"):
        load_mel_codec(folder)
    (folder / "codec.json").write_text(json.dumps(config))
    (folder / "codec.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .*codec.safetensors"):
        load_mel_codec(folder)
    with pytest.raises(CheckpointError, match="neither codec.json nor a readable config.json"):
        load_codec(tmp_path)


def test_codes_and_audio_are_checked_with_the_numbers() -> None:
    codec = tiny_mel_codec()
    with pytest.raises(CodesError, match=r"this codec has 3 codebooks, the codes have 2 \(shape \(1, 2, 4\)\)"):
        codec.decode(torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(CodesError, match=r"codes must lie in \[0, 32\), got values from 32 to 32"):
        codec.decode(torch.full((1, 3, 4), 32))
    with pytest.raises(CodesError, match="must be integers, got torch.float32"):
        codec.decode(torch.zeros(1, 3, 4))
    with pytest.raises(CodesError, match=r"shaped \[B, K, T\], got \(3, 4\)"):
        codec.stream().push(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(AudioInputError, match=r"\[B, 1, samples\], got \(1, 2, 100\)"):
        codec.encode(torch.zeros(1, 2, 100))
    with pytest.raises(AudioInputError, match="NaN or infinite"):
        codec.encode(torch.full((1, 1, 100), float("nan")))
    with pytest.raises(AudioInputError, match="empty clip"):
        codec.encode(torch.zeros(1, 1, 0))
    assert codec.decode(torch.zeros(1, 3, 0, dtype=torch.long)).shape == (1, 1, 0)


# ----------------------------------------------------------------------------- EnCodec
@pytest.fixture(scope="module")
def encodec_folder(tmp_path_factory) -> Path:
    """A tiny random EncodecModel (24 kHz, 75 Hz, 1024 codes, 1.5 / 3 kbps) saved in the HF format."""
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(
        target_bandwidths=[1.5, 3.0], sampling_rate=24_000, audio_channels=1, num_filters=2, num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 2], codebook_size=1024, hidden_size=8, num_lstm_layers=1, use_causal_conv=True,
        chunk_length_s=None, overlap=None, normalize=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EncodecModel(config)
    with torch.no_grad():  # transformers' init leaves the (inference-only) codebooks at zero
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
    folder = tmp_path_factory.mktemp("encodec")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("bandwidth", "codebooks"), [(None, 4), (1.5, 2), (3.0, 4)])
def test_encodec_codec_matches_the_transformers_model(encodec_folder: Path, bandwidth, codebooks: int) -> None:
    from transformers import EncodecModel

    codec = load_codec(encodec_folder, bandwidth=bandwidth)
    assert isinstance(codec, EncodecCodec)
    assert (codec.sample_rate, codec.frame_rate, codec.codebook_size, codec.num_codebooks) == (24_000, 75, 1024, codebooks)
    assert codec.bitrate == 750 * codebooks and codec.samples_per_frame == 320 and codec.causal
    reference = EncodecModel.from_pretrained(encodec_folder).eval()
    wav = torch.randn(2, 1, 24_000) * 0.1
    codes = codec.encode(wav)
    assert codes.shape == (2, codebooks, 75)
    with torch.no_grad():
        expected = reference.encode(wav, bandwidth=codec.bandwidth).audio_codes[0]
        assert torch.equal(codes, expected)
        assert len(codes.unique()) > 1  # the random codebooks are in use
        torch.testing.assert_close(codec.decode(codes), reference.decode(expected[None], [None])[0])


def test_encodec_stream_returns_every_sample(encodec_folder: Path) -> None:
    codec = load_codec(encodec_folder)
    codes = codec.encode(torch.randn(1, 1, 24_000) * 0.1)
    stream = codec.stream()
    pieces = [stream.push(codes[..., i : i + 10]) for i in range(0, 75, 10)] + [stream.flush()]
    assert [p.shape[-1] for p in pieces] == [3200] * 7 + [1600, 0]


def test_encodec_refusals(encodec_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"bandwidth 6.0 kbps is not one of this EnCodec model's \[1.5, 3.0\]"):
        load_codec(encodec_folder, bandwidth=6.0)
    config = json.loads((encodec_folder / "config.json").read_text())
    chunked = tmp_path / "chunked"
    chunked.mkdir()
    for f in encodec_folder.iterdir():
        (chunked / f.name).write_bytes(f.read_bytes())
    (chunked / "config.json").write_text(json.dumps({**config, "chunk_length_s": 1.0, "overlap": 0.01}))
    with pytest.raises(CheckpointError, match="encodes in 1.0 s chunks"):
        load_codec(chunked)
    (chunked / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    with pytest.raises(CheckpointError, match="model_type is 'whisper'; codecs supported: encodec"):
        load_codec(chunked)


def test_reference_phase_makes_steady_tones_at_any_bin() -> None:
    """A constant spectrum (one bin, constant predicted phase) must give a steady sinusoid at that
    bin's frequency, not a signal periodic in the hop (what phases without the reference make)."""
    from omnivox.evaluation.codec import tone_pitch

    codec = MelCodec(TINY_UP)
    bins = TINY_UP.synth_n_fft // 2 + 1
    for k in (11, 27, 70):  # 275, 675, 1750 Hz: none a multiple of the 100 Hz piece rate
        log_mag = torch.full((1, 200, bins), -30.0)
        log_mag[..., k] = 0.0
        spectra, _ = codec.spectra(log_mag, torch.full((1, 200, bins), 0.3))
        audio = codec.overlap_add(codec.frames_to_audio(spectra))[0, 640:-640].numpy()
        assert tone_pitch(audio) == pytest.approx(k * 16_000 / TINY_UP.synth_n_fft, rel=1e-3)
        envelope = torch.from_numpy(audio).abs().unfold(0, 160, 160).max(-1).values
        assert float(envelope.min()) > 0.9 * float(envelope.max())  # steady, no beating between pieces
