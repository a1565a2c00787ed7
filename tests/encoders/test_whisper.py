"""WhisperEncoder: both checkpoint layouts, the SALMONN log-mel, lengths and errors (tiny models)."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from whisper.model import ModelDimensions
from whisper_names import hf_to_openai_state_dict

from omnivox.encoders.base import EncoderOutput
from omnivox.encoders.whisper import WhisperEncoder, WhisperLogMel
from omnivox.errors import CheckpointError

N_CTX = 50  # tiny window: 50 frames = 100 mel frames = 16000 samples (1 s)
D_MODEL = 32

def tiny_hf_whisper(n_mels: int = 80, seed: int = 0) -> WhisperForConditionalGeneration:
    """A 2-layer d_model 32 Whisper with every weight random (biases and LayerNorms too)."""
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=n_mels,
        d_model=D_MODEL,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=4 * D_MODEL,  # openai-whisper fixes the MLP at 4 x d_model
        decoder_ffn_dim=4 * D_MODEL,
        max_source_positions=N_CTX,
        max_target_positions=16,
        pad_token_id=56,
        bos_token_id=56,
        eos_token_id=56,
        decoder_start_token_id=57,
    )
    model = WhisperForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1.0 + noise if "layer_norm.weight" in name else noise)
    return model


def openai_dims(config: WhisperConfig) -> ModelDimensions:
    return ModelDimensions(
        n_mels=config.num_mel_bins,
        n_audio_ctx=config.max_source_positions,
        n_audio_state=config.d_model,
        n_audio_head=config.encoder_attention_heads,
        n_audio_layer=config.encoder_layers,
        n_vocab=config.vocab_size,
        n_text_ctx=config.max_target_positions,
        n_text_state=config.d_model,
        n_text_head=config.decoder_attention_heads,
        n_text_layer=config.decoder_layers,
    )


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny weights as an HF folder, an HF ``WhisperModel`` folder and an openai-whisper ``.pt``."""
    root = tmp_path_factory.mktemp("tiny_whisper")
    model = tiny_hf_whisper()
    model.save_pretrained(root / "hf")
    model.model.save_pretrained(root / "hf_base")
    checkpoint = {
        "dims": dataclasses.asdict(openai_dims(model.config)),
        "model_state_dict": hf_to_openai_state_dict(model.state_dict()),
    }
    torch.save(checkpoint, root / "tiny.pt")
    whisper.load_model(str(root / "tiny.pt"), device="cpu")  # the file is a valid openai-whisper checkpoint
    return {"hf": root / "hf", "hf_base": root / "hf_base", "openai": root / "tiny.pt"}


def speech_like(num_samples: int, seed: int = 0) -> torch.Tensor:
    """[S] a chirp plus noise with a slow envelope: broadband, with a real dynamic range."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16_000
    chirp = torch.sin(2 * torch.pi * (200 + 1500 * t) * t)
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t)
    return 0.3 * envelope * chirp + 0.02 * torch.randn(num_samples, generator=generator)


# --------------------------------------------------------------------------- log-mel parity
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers_and_openai_whisper(n_mels: int) -> None:
    audio = speech_like(7 * 16_000).numpy()  # 7 s, padded to 30 s as SALMONN does
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    reference = extractor(
        audio, sampling_rate=16_000, return_tensors="pt"
    ).input_features  # [1, n_mels, 3000]

    padded = torch.zeros(1, 480_000)
    padded[0, : audio.size] = torch.from_numpy(audio)
    ours = WhisperLogMel(n_mels)(padded)
    assert ours.shape == (1, n_mels, 3000)
    # 1e-5 holds on any CPU because all three run the same torch.stft on the same samples: its
    # rounding (2.5e-5 at the quietest bins against float64) cancels. Only the 201-term non-negative
    # mel sum may reorder: 2 * 201 u relative, 3e-6 after log10 / 4. Another FFT would need more.
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)

    openai = whisper.log_mel_spectrogram(padded[0], n_mels=n_mels)  # [n_mels, 3000]
    torch.testing.assert_close(ours[0], openai, atol=1e-5, rtol=0)


def test_encoder_log_mel_pads_like_the_feature_extractor(tiny_checkpoints: dict[str, Path]) -> None:
    encoder = WhisperEncoder.from_pretrained(tiny_checkpoints["openai"])
    audio = speech_like(9_000)
    # The tiny window is 1 s: the feature extractor with chunk_length=1 pads to the same 16000 samples.
    reference = WhisperFeatureExtractor(chunk_length=1)(
        audio.numpy(), sampling_rate=16_000, return_tensors="pt"
    )
    waveforms = torch.zeros(1, 12_000)
    waveforms[0, :9_000] = audio
    mel = encoder.log_mel(waveforms, torch.tensor([9_000]))
    assert mel.shape == (1, 80, 2 * N_CTX)
    torch.testing.assert_close(mel, reference.input_features, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- loading and parity
def test_openai_and_hf_checkpoints_give_the_same_features(tiny_checkpoints: dict[str, Path]) -> None:
    encoders = {kind: WhisperEncoder.from_pretrained(path) for kind, path in tiny_checkpoints.items()}
    assert (
        encoders["openai"].kind == "openai"
        and encoders["hf"].kind == "hf"
        and encoders["hf_base"].kind == "hf"
    )
    waveforms = torch.stack([speech_like(16_000, seed=1), speech_like(16_000, seed=2)])
    waveforms[1, 7_000:] = 0
    lengths = torch.tensor([16_000, 7_000])

    outputs = {kind: encoder(waveforms, lengths) for kind, encoder in encoders.items()}
    reference = outputs["openai"]
    assert isinstance(reference, EncoderOutput)
    assert reference.features.shape == (2, N_CTX, D_MODEL)
    assert reference.features.std() > 0.1  # not a degenerate constant
    for kind in ("hf", "hf_base"):
        diff = (outputs[kind].features - reference.features).abs().max().item()
        assert diff < 1e-4, f"{kind} vs openai: max abs diff {diff}"
        assert torch.equal(outputs[kind].lengths, reference.lengths)


def test_features_equal_the_hf_encoder_on_the_extractor_output(tiny_checkpoints: dict[str, Path]) -> None:
    """End to end as SALMONN: WhisperFeatureExtractor -> HF encoder last_hidden_state."""
    encoder = WhisperEncoder.from_pretrained(tiny_checkpoints["openai"])
    hf = WhisperForConditionalGeneration.from_pretrained(tiny_checkpoints["hf"]).eval()
    audio = speech_like(11_000, seed=3)
    mel = WhisperFeatureExtractor(chunk_length=1)(audio.numpy(), sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        expected = hf.model.encoder(mel.input_features).last_hidden_state
    ours = encoder(audio[None], torch.tensor([11_000])).features
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_interface_attributes_and_frozen(tiny_checkpoints: dict[str, Path]) -> None:
    encoder = WhisperEncoder.from_pretrained(tiny_checkpoints["hf"])
    assert (encoder.output_dim, encoder.frame_rate, encoder.max_samples) == (D_MODEL, 50.0, N_CTX * 320)
    assert encoder.n_mels == 80
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder).train()
    assert not parent[0].training and not encoder.backbone.training


def test_batch_equals_items_and_lengths(tiny_checkpoints: dict[str, Path]) -> None:
    encoder = WhisperEncoder.from_pretrained(tiny_checkpoints["openai"])
    items = [speech_like(16_000, seed=4), speech_like(5_000, seed=5), speech_like(1, seed=6)]
    waveforms = torch.zeros(3, 16_000)
    for i, item in enumerate(items):
        waveforms[i, : item.numel()] = item
    lengths = torch.tensor([16_000, 5_000, 1])
    batch = encoder(waveforms, lengths)
    assert batch.lengths.tolist() == [50, 16, 1]  # ceil(samples / 320)
    for i, item in enumerate(items):
        single = encoder(item[None], lengths[i : i + 1])
        torch.testing.assert_close(batch.features[i], single.features[0], atol=1e-5, rtol=0)
    # Samples past an item's length are ignored, even if the caller left garbage there.
    noisy = waveforms.clone()
    noisy[1, 5_000:] = 1.0
    torch.testing.assert_close(encoder(noisy, lengths).features, batch.features)


@pytest.mark.parametrize("kind", ["openai", "hf"])
def test_bfloat16_weights(tiny_checkpoints: dict[str, Path], kind: str) -> None:
    encoder32 = WhisperEncoder.from_pretrained(tiny_checkpoints[kind])
    encoder16 = WhisperEncoder.from_pretrained(tiny_checkpoints[kind], dtype=torch.bfloat16)
    assert encoder16.mel.filters.dtype == torch.float32  # the log-mel stays float32
    waveforms, lengths = speech_like(8_000)[None], torch.tensor([8_000])
    out16 = encoder16(waveforms, lengths).features
    assert out16.dtype == torch.bfloat16
    rel = (out16.float() - encoder32(waveforms, lengths).features).norm() / out16.float().norm()
    assert rel < 0.05
    # Casting a float32 encoder later (e.g. with its parent model) works the same way.
    torch.nn.Sequential(encoder32).to(torch.bfloat16)
    assert encoder32.mel.filters.dtype == torch.float32
    torch.testing.assert_close(encoder32(waveforms, lengths).features, out16)


# --------------------------------------------------------------------------- errors
def test_bad_inputs_raise_with_numbers(tiny_checkpoints: dict[str, Path]) -> None:
    encoder = WhisperEncoder.from_pretrained(tiny_checkpoints["openai"])
    with pytest.raises(ValueError, match=r"at most 16000 samples.*got 16001"):
        encoder(torch.zeros(1, 16_001), torch.tensor([16_001]))
    with pytest.raises(ValueError, match=r"expects waveforms \[B, S\]"):
        encoder(torch.zeros(16_000), torch.tensor([16_000]))
    with pytest.raises(ValueError, match="lengths must be"):
        encoder(torch.zeros(2, 100), torch.tensor([100]))
    # A longer padded tensor is fine as long as the lengths fit the window.
    assert encoder(torch.zeros(1, 20_000), torch.tensor([16_000])).features.shape == (1, N_CTX, D_MODEL)


def test_missing_and_malformed_checkpoints(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        WhisperEncoder.from_pretrained(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not found"):
        WhisperEncoder.from_pretrained("models/nope.pt")  # relative, owner/name-like: still a missing file
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable openai-whisper checkpoint"):
        WhisperEncoder.from_pretrained(garbage)
    no_dims = tmp_path / "no_dims.pt"
    torch.save({"model_state_dict": {}}, no_dims)
    with pytest.raises(CheckpointError, match="'dims' and 'model_state_dict'"):
        WhisperEncoder.from_pretrained(no_dims)
    wrong = tmp_path / "wrong_dims.pt"
    checkpoint = torch.load(tiny_checkpoints["openai"], weights_only=True)
    checkpoint["dims"]["n_audio_state"] = 48
    torch.save(checkpoint, wrong)
    with pytest.raises(CheckpointError, match="do not match its dims"):
        WhisperEncoder.from_pretrained(wrong)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        WhisperEncoder.from_pretrained(tmp_path / "empty_dir")


def test_official_name_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(url: str, root: str, in_memory: bool) -> str:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(whisper, "_download", offline)
    with pytest.raises(CheckpointError, match=r"could not download.*'tiny\.en'.*pass its path"):
        WhisperEncoder.from_pretrained("tiny.en", download_root=tmp_path)


def test_hub_id_that_cannot_be_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not load the Hugging Face Whisper checkpoint"):
        WhisperEncoder.from_pretrained("omnivox-tests/no-such-whisper")


def test_log_mel_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        WhisperLogMel(80)(torch.zeros(3, 2, 100))


def test_log_mel_on_real_speech(speech_fixtures: dict[Path, str]) -> None:
    """The 16 kHz clips, padded to 30 s: our log-mel equals WhisperFeatureExtractor's."""
    import soundfile

    extractor = WhisperFeatureExtractor()
    mel = WhisperLogMel(80)
    checked = 0
    for path in speech_fixtures:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
        if rate != 16_000:
            continue
        audio = np.ascontiguousarray(audio[:480_000, 0])
        padded = torch.zeros(1, 480_000)
        padded[0, : audio.size] = torch.from_numpy(audio)
        reference = extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
        torch.testing.assert_close(mel(padded), reference, atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 1, "no 16 kHz clip among the speech fixtures"


@pytest.mark.parametrize("kind", ["openai", "hf"])
def test_unpadded_mode_equals_padded_on_a_full_window(tiny_checkpoints: dict[str, Path], kind: str) -> None:
    padded = WhisperEncoder.from_pretrained(tiny_checkpoints[kind])
    unpadded = WhisperEncoder.from_pretrained(tiny_checkpoints[kind], pad_to_window=False)
    wave = speech_like(padded.max_samples, seed=4)[None]
    lengths = torch.tensor([padded.max_samples])
    torch.testing.assert_close(unpadded(wave, lengths).features, padded(wave, lengths).features, rtol=1e-5, atol=1e-5)


def test_unpadded_mode_encodes_only_the_audio(tiny_checkpoints: dict[str, Path]) -> None:
    openai = WhisperEncoder.from_pretrained(tiny_checkpoints["openai"], pad_to_window=False)
    hf = WhisperEncoder.from_pretrained(tiny_checkpoints["hf"], pad_to_window=False)
    assert openai.max_samples >= 9600
    wave = torch.stack([speech_like(9600, seed=5), torch.nn.functional.pad(speech_like(3200, seed=6), (0, 6400))])
    lengths = torch.tensor([9600, 3200])
    out = openai(wave, lengths)
    assert out.features.shape == (2, 30, openai.output_dim)  # 0.6 s at 50 Hz, not the whole window
    assert out.lengths.tolist() == [30, 10] and openai.num_frames(9600) == 30
    torch.testing.assert_close(hf(wave, lengths).features, out.features, rtol=1e-5, atol=1e-5)
    # an item padded inside a batch equals the same item encoded alone with the batch's frame count
    alone = openai(wave[1:], torch.tensor([9600]))
    torch.testing.assert_close(out.features[1:], alone.features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filters_are_transformers_filters(n_mels):
    from transformers.audio_utils import mel_filter_bank

    from omnivox.encoders.whisper import slaney_mel_filters

    reference = mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )  # fmt: skip
    ours = slaney_mel_filters(201, n_mels, 16000)
    assert np.array_equal(ours, reference)  # the same float64 operations in the same order
