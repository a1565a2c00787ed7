"""Tests of omnivox.encoders.beats: parity with the official BEATs code, fbank, checkpoints.

Fixtures in ``tests/encoders/data`` (made by running the official ``microsoft/unilm/beats`` code
with a port of torchaudio's Kaldi fbank, random weights, fixed seeds):

* ``beats_tiny_{iter3,cpt,prenorm}.pt``: official-format checkpoints of tiny models (iter3
  architecture; the same fine-tuned with a 5-class predictor; a pre-norm variant);
* ``beats_ref.npz``: a padded batch (lengths 7000 and 4100 samples, int16) and the official
  outputs for each checkpoint, with and without the padding mask;
* ``fbank_ref.npz``: a waveform and ``torchaudio.compliance.kaldi.fbank(..., num_mel_bins=128)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from omnivox.encoders.beats import (
    BEATs,
    BeatsConfig,
    BeatsEncoder,
    build_beats,
    kaldi_fbank,
    kaldi_mel_banks,
    load_beats_checkpoint,
    save_checkpoint,
)
from omnivox.errors import CheckpointError

DATA = Path(__file__).parent / "data"
CHECKPOINTS = ("iter3", "cpt", "prenorm")
TINY = BeatsConfig(
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    embed_dim=16,
    conv_pos=16,
    conv_pos_groups=4,
)
# Every key of the official BEATsConfig.
OFFICIAL_CFG_KEYS = {
    "input_patch_size",
    "embed_dim",
    "conv_bias",
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_attention_heads",
    "activation_fn",
    "layer_wise_gradient_decay_ratio",
    "layer_norm_first",
    "deep_norm",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_layerdrop",
    "dropout_input",
    "conv_pos",
    "conv_pos_groups",
    "relative_position_embedding",
    "num_buckets",
    "max_distance",
    "gru_rel_pos",
    "finetuned_model",
    "predictor_dropout",
    "predictor_class",
}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    with np.load(DATA / "beats_ref.npz") as ref:
        out = {key: torch.from_numpy(ref[key]) for key in ref.files}
    out["source"] = out.pop("waveform_int16").float() / 32768.0  # [2, 7000]
    return out


def padding_mask(lengths: torch.Tensor, num_samples: int) -> torch.Tensor:
    return torch.arange(num_samples)[None, :] >= lengths[:, None]


def tiny_encoder(seed: int = 0, **overrides) -> BeatsEncoder:
    cfg = BeatsConfig(**{**TINY.to_dict(), **overrides})
    return BeatsEncoder(build_beats(cfg, seed=seed))


# ------------------------------------------------------------------------------------ config
def test_default_config_is_iter3_and_has_all_official_fields():
    cfg = BeatsConfig()
    assert set(cfg.to_dict()) == OFFICIAL_CFG_KEYS
    assert (
        cfg.encoder_layers,
        cfg.encoder_embed_dim,
        cfg.encoder_ffn_embed_dim,
        cfg.encoder_attention_heads,
    ) == (
        12,
        768,
        3072,
        12,
    )
    assert (cfg.input_patch_size, cfg.embed_dim, cfg.conv_bias, cfg.deep_norm, cfg.layer_norm_first) == (
        16,
        512,
        False,
        True,
        False,
    )
    assert (cfg.num_buckets, cfg.max_distance, cfg.gru_rel_pos, cfg.conv_pos, cfg.conv_pos_groups) == (
        320,
        800,
        True,
        128,
        16,
    )


def test_from_dict_reads_official_cfg_and_warns_on_unknown_keys(caplog):
    official = torch.load(DATA / "beats_tiny_cpt.pt", weights_only=True)["cfg"]
    with caplog.at_level(logging.WARNING, logger="omnivox.encoders.beats"):
        cfg = BeatsConfig.from_dict({**official, "some_future_field": 3})
    assert "some_future_field" in caplog.text
    assert cfg.to_dict() == {k: official[k] for k in OFFICIAL_CFG_KEYS}
    assert cfg.finetuned_model and cfg.predictor_class == 5


def test_from_dict_missing_keys_take_the_official_class_defaults(caplog):
    cfg = BeatsConfig().to_dict()
    del cfg["max_distance"], cfg["gru_rel_pos"]
    with caplog.at_level(logging.WARNING, logger="omnivox.encoders.beats"):
        parsed = BeatsConfig.from_dict(cfg)
    assert (parsed.max_distance, parsed.gru_rel_pos) == (1280, False)  # the official BEATsConfig defaults
    assert "max_distance" in caplog.text


def test_from_dict_coerces_ints_and_rejects_wrong_types():
    parsed = BeatsConfig.from_dict({**BeatsConfig().to_dict(), "dropout": 0, "deep_norm": 1})
    assert parsed.dropout == 0.0 and isinstance(parsed.dropout, float) and parsed.deep_norm is True
    with pytest.raises(TypeError, match="encoder_layers must be an int, got '12'"):
        BeatsConfig.from_dict({**BeatsConfig().to_dict(), "encoder_layers": "12"})
    with pytest.raises(TypeError, match="deep_norm must be a bool"):
        BeatsConfig.from_dict({**BeatsConfig().to_dict(), "deep_norm": "yes"})
    with pytest.raises(TypeError, match="must be a dict"):
        BeatsConfig.from_dict([("encoder_layers", 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder_attention_heads": 5}, "not divisible by encoder_attention_heads 5"),
        ({"conv_pos_groups": 5}, "not divisible by conv_pos_groups 5"),
        ({"layer_norm_first": True}, "deep_norm"),
        ({"activation_fn": "swish"}, "activation_fn must be one of"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\]"),
        ({"input_patch_size": -1}, "input_patch_size must be > 0"),
        ({"max_distance": 10}, "max_distance"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        BeatsConfig(**overrides)


# ------------------------------------------------------------------------------------ fbank
UNIT_ROUNDOFF = 2.0**-24  # float32
N_FFT = 512  # kaldi_fbank's FFT at 16 kHz: 400-sample frames padded to a power of two


def fft_energy(waveform: torch.Tensor) -> torch.Tensor:
    """[F, 1] energy ||X||^2 = N * ||frame||^2 of each frame's 512-point FFT (Parseval), float64.

    kaldi_fbank's front end redone in float64 (DC removal, pre-emphasis, povey window); it only
    sizes the tolerance of :func:`assert_fbank_close`.
    """
    frames = waveform.double().unfold(-1, 400, 160)  # [F, 400]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=-1)
    window = torch.hann_window(400, periodic=False, dtype=torch.float64).pow(0.85)
    return N_FFT * (frames * window).pow(2).sum(dim=-1, keepdim=True)


def assert_fbank_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    waveform: torch.Tensor,
    filter_difference: torch.Tensor | None = None,
) -> None:
    """Check log mel energies [F, M] of ``waveform`` [S] to what float32 rounding allows each one.

    Two float32 fbanks of one waveform (another CPU, FFT library or summation order) differ by:

    * the FFT: any N-point FFT perturbs every output by up to ||dX|| <= c u log2(N) ||X|| (Higham,
      "Accuracy and Stability of Numerical Algorithms", Thm 24.2: c ~ 7 for radix 2; c = 10 also
      covers the front end), u = 2^-24. The error is sized by the frame's energy E = ||X||^2, not
      by the bin's: filter j (weights w_jk summing to W_j, energy m_j = sum_k w_jk |X_k|^2) moves
      by up to 2 d sqrt(W_j m_j E) + d^2 W_j E (Cauchy-Schwarz), d = 2 * 10 u log2(N) for two
      runs, and its log by -log(1 - that / m_j). A 20-50 Hz filter holding one FFT bin that
      pre-emphasis nearly cancels (m_j ~ 1e-11 E) can move by 1e-3 and more; a strong one by 1e-5;
    * the filter sum (257 non-negative terms) and the log: 2 (257 + 4) u ~ 3e-5;
    * ``filter_difference`` [M, N/2 + 1], if given: |w_jk - w'_jk| between two implementations'
      filters, acting on |X_k|^2 <= min(E, min_i m_i / w_ik) (every filter sums non-negative terms).

    What sums exact zeros keeps the 3e-5 alone: a silent frame (E = 0), an empty filter (W_j = 0).
    """
    num_mel_bins = expected.shape[-1]
    banks = kaldi_mel_banks(num_mel_bins, N_FFT, 16000.0).double()  # [M, K]
    energy = fft_energy(waveform)  # [F, 1]
    mel = expected.double().exp()  # [F, M], the reference energies m_j
    d = 2 * 10 * UNIT_ROUNDOFF * math.log2(N_FFT)
    weight = banks.sum(dim=-1)  # [M] W_j
    spread = 2 * d * (weight * mel * energy).sqrt() + d**2 * weight * energy  # [F, M]
    if filter_difference is not None:
        bin_power = (mel[:, :, None] / banks).amin(dim=1).clamp(max=energy)  # [F, K]; w = 0 gives inf
        spread = spread + bin_power @ filter_difference.double().T
    relative = spread / mel
    tolerance = 2 * (N_FFT // 2 + 1 + 4) * UNIT_ROUNDOFF - torch.log1p(-relative.clamp(max=1.0))  # inf at 1
    error = (actual.double() - expected.double()).abs()
    failed = error > tolerance
    worst = tuple(int(i) for i in np.unravel_index(int((error - tolerance).argmax()), error.shape))
    assert not failed.any(), (
        f"{int(failed.sum())} of {error.numel()} log mel energies off by more than float32 rounding allows; "
        f"worst (frame, bin) {worst}: |{float(actual[worst]):.6f} - {float(expected[worst]):.6f}| = "
        f"{float(error[worst]):.3g} > {float(tolerance[worst]):.3g}"
    )


def test_fbank_matches_torchaudio_reference():
    with np.load(DATA / "fbank_ref.npz") as ref:
        waveform, expected = torch.from_numpy(ref["waveform_int16"]).float(), torch.from_numpy(ref["fbank"])
    fbank = kaldi_fbank(waveform)
    assert fbank.shape == expected.shape == (28, 128)  # 1 + (4800 - 400) // 160 frames
    # Not one atol: mel bin 0 of frame 10 holds 3e-11 of its frame's energy, and another CPU's FFT
    # moved its log by 1.7e-3 while the strong bins agree to 1e-5.
    assert_fbank_close(fbank, expected, waveform)
    # Mel filter 3 holds no FFT bin at 128 bins / 512 points: torchaudio keeps it at log(eps).
    eps_log = float(np.log(np.finfo(np.float32).eps))
    assert torch.allclose(fbank[:, 3], torch.full((28,), eps_log))


def test_fbank_matches_kaldi_native_fbank_where_it_applies():
    knf = pytest.importorskip("kaldi_native_fbank")
    with np.load(DATA / "fbank_ref.npz") as ref:
        waveform = ref["waveform_int16"].astype(np.float32)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80  # knf (like Kaldi) refuses 128 bins with a 512-point FFT
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, waveform)
    online.input_finished()
    expected = torch.from_numpy(np.stack([online.get_frame(i) for i in range(online.num_frames_ready)]))
    # Kaldi builds its filters with its own float32 mel arithmetic: weights differ by up to ~1e-5.
    knf_banks = knf.MelBanks(opts.mel_opts, opts.frame_opts)
    unit = np.eye(N_FFT // 2 + 1, dtype=np.float32)
    knf_weights = torch.from_numpy(np.stack([knf_banks.compute(row) for row in unit], axis=1))  # [80, 257]
    filter_difference = (knf_weights.double() - kaldi_mel_banks(80, N_FFT, 16000.0).double()).abs()
    waveform = torch.from_numpy(waveform)
    assert_fbank_close(kaldi_fbank(waveform, num_mel_bins=80), expected, waveform, filter_difference)


def test_fbank_of_a_batch_equals_fbank_per_item():
    waveforms = torch.randn(3, 5000) * 3000
    batched = kaldi_fbank(waveforms)
    for row, item in zip(batched, waveforms, strict=True):
        # Same code, but a batch may take other FFT and matmul kernels: bounded like another CPU.
        assert_fbank_close(row, kaldi_fbank(item), item)


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_features_match_official_code(name, reference):
    encoder = BeatsEncoder.from_checkpoint(DATA / f"beats_tiny_{name}.pt")
    source, lengths = reference["source"], reference["lengths"]
    out = encoder(source, lengths)
    torch.testing.assert_close(out.features, reference[f"{name}_features"], atol=1e-4, rtol=0)
    assert out.lengths.tolist() == (~reference[f"{name}_padding_mask"]).sum(1).tolist() == [16, 13]

    features, mask = encoder.model.extract_features(source, padding_mask(lengths, source.shape[1]))
    assert torch.equal(mask, reference[f"{name}_padding_mask"])
    unmasked, no_mask = encoder.model.extract_features(source)
    assert no_mask is None
    torch.testing.assert_close(unmasked, reference[f"{name}_features_nomask"], atol=1e-4, rtol=0)


def test_finetuned_checkpoint_probabilities_match_official_code(reference):
    model, label_dict = load_beats_checkpoint(DATA / "beats_tiny_cpt.pt")
    assert label_dict == {i: f"/m/{i:04d}" for i in range(5)}
    source, lengths = reference["source"], reference["lengths"]
    probs = model.classify(source, padding_mask(lengths, source.shape[1]))
    torch.testing.assert_close(probs, reference["cpt_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.classify(source), reference["cpt_probs_nomask"], atol=1e-5, rtol=0)


def test_encoder_of_finetuned_checkpoint_returns_features_not_probabilities(reference):
    encoder = BeatsEncoder.from_checkpoint(DATA / "beats_tiny_cpt.pt")
    assert encoder.model.predictor is not None and encoder.label_dict is not None
    out = encoder(reference["source"], reference["lengths"])
    assert out.features.shape == (2, 16, encoder.output_dim) == (2, 16, 32)


def test_state_dict_uses_official_keys_and_shares_the_relative_position_bias():
    model = build_beats(TINY, seed=0)
    keys = set(model.state_dict())
    assert {"encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias"} <= keys
    assert model.state_dict()["encoder.pos_conv.0.weight_g"].shape == (1, 1, TINY.conv_pos)
    assert {f"encoder.layers.{i}.self_attn.relative_attention_bias.weight" for i in range(2)} <= keys
    assert {"encoder.layers.1.self_attn.grep_linear.weight", "encoder.layers.1.self_attn.grep_a"} <= keys
    assert not any("parametrizations" in key or "predictor" in key for key in keys)
    layers = model.encoder.layers
    assert layers[1].self_attn.relative_attention_bias is layers[0].self_attn.relative_attention_bias
    official = torch.load(DATA / "beats_tiny_iter3.pt", weights_only=True)["model"]
    assert keys == set(official)


# ------------------------------------------------------------------------------------ checkpoints
def test_save_checkpoint_round_trip(tmp_path):
    cfg = BeatsConfig(**{**TINY.to_dict(), "finetuned_model": True, "predictor_class": 3})
    model = build_beats(cfg, seed=1)
    path = tmp_path / "sub" / "beats.pt"
    save_checkpoint(model, path, label_dict={0: "a", 1: "b", 2: "c"})

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"cfg", "model", "label_dict"}
    assert raw["cfg"] == cfg.to_dict() and set(raw["cfg"]) == OFFICIAL_CFG_KEYS
    assert set(raw["model"]) == set(model.state_dict())

    encoder = BeatsEncoder.from_checkpoint(
        path, expected_sha256=hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert encoder.model.cfg == cfg and encoder.label_dict == {0: "a", 1: "b", 2: "c"}
    for key, value in model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
    source, lengths = torch.randn(2, 6000) * 0.1, torch.tensor([6000, 3500])
    source[1, 3500:] = 0
    expected, _ = model.extract_features(source, padding_mask(lengths, 6000))
    assert torch.equal(encoder(source, lengths).features, expected)


def _write(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _official(name: str = "iter3") -> dict:
    return torch.load(DATA / f"beats_tiny_{name}.pt", weights_only=True)


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.pt", "not a file"),
        (lambda p: p, "not a file"),  # a folder
        (lambda p: _write(p / "list.pt", [1, 2]), "expected a dict with 'cfg' and 'model', got a list"),
        (lambda p: _write(p / "nocfg.pt", {"model": _official()["model"]}), r"lacks \['cfg'\]"),
        (
            lambda p: _write(
                p / "missing_key.pt",
                {**_official(), "model": _without(_official()["model"], "encoder.layers.1.fc2.weight")},
            ),
            r"missing keys \(1\): encoder.layers.1.fc2.weight \[32, 64\]",
        ),
        (
            lambda p: _write(
                p / "extra_key.pt",
                {**_official(), "model": {**_official()["model"], "encoder.extra": torch.zeros(2)}},
            ),
            r"unexpected keys \(1\): encoder.extra \[2\]",
        ),
        (
            lambda p: _write(
                p / "shape.pt",
                {
                    **_official(),
                    "model": {**_official()["model"], "post_extract_proj.weight": torch.zeros(8, 16)},
                },
            ),
            r"post_extract_proj.weight: checkpoint \[8, 16\] vs model \[32, 16\]",
        ),
        (
            lambda p: _write(
                p / "cfgtype.pt", {**_official(), "cfg": {**_official()["cfg"], "encoder_layers": "2"}}
            ),
            "invalid BEATs cfg: BeatsConfig.encoder_layers must be an int",
        ),
        (
            # A pre-trained cfg with a fine-tuned state dict: the predictor is unexpected.
            lambda p: _write(
                p / "predictor.pt",
                {**_official("cpt"), "cfg": {**_official("cpt")["cfg"], "finetuned_model": False}},
            ),
            r"unexpected keys \(2\): predictor.weight \[5, 32\], predictor.bias \[5\]",
        ),
        (
            lambda p: (p / "garbage.pt").write_bytes(b"not a checkpoint") and p / "garbage.pt",
            "torch.load failed",
        ),
    ],
    ids=[
        "missing",
        "folder",
        "not-dict",
        "no-cfg",
        "missing-key",
        "unexpected-key",
        "shape",
        "cfg-type",
        "predictor",
        "garbage",
    ],
)
def test_malformed_checkpoints_raise_checkpoint_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        BeatsEncoder.from_checkpoint(path)


def test_sha256_is_checked():
    path = DATA / "beats_tiny_prenorm.pt"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match=f"sha256 mismatch: expected {'0' * 64}, got {actual}"):
        BeatsEncoder.from_checkpoint(path, expected_sha256="0" * 64)
    assert BeatsEncoder.from_checkpoint(path, expected_sha256=actual.upper()).output_dim == 16


# ------------------------------------------------------------------------------------ encoder
def test_encoder_geometry_1s_and_30s():
    encoder = tiny_encoder()
    assert (encoder.output_dim, encoder.frame_rate, encoder.max_samples) == (32, 50.0, 480_000)
    for seconds in (1, 2.5, 10, 30):
        num_samples = int(seconds * 16000)
        fbank_frames = kaldi_fbank(torch.zeros(num_samples)).shape[0]
        assert encoder.num_frames(num_samples) == 8 * (fbank_frames // 16)
    assert encoder.num_frames(16000) == 48 and encoder.num_frames(480_000) == 1496

    out = encoder(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 9000]))
    assert out.features.shape == (2, 48, 32) and out.lengths.tolist() == [48, 28]
    out = encoder(torch.randn(1, 480_000) * 0.1, torch.tensor([480_000]))
    assert out.features.shape == (1, 1496, 32) and out.lengths.tolist() == [1496]


def test_encoder_is_frozen_and_deterministic():
    encoder = tiny_encoder(dropout=0.5, attention_dropout=0.5, encoder_layerdrop=0.5)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # a parent module switching to training must not wake dropout up
    assert not encoder.training and not encoder.model.training
    source, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 8000])
    first, second = encoder(source, lengths), encoder(source, lengths)
    assert torch.equal(first.features, second.features)
    assert torch.isfinite(first.features).all()


def test_encoder_runs_in_bfloat16():
    encoder = tiny_encoder()
    source, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 5000])
    reference = encoder(source, lengths).features
    out = encoder.to(torch.bfloat16)(source, lengths)
    assert out.features.dtype == torch.bfloat16
    assert (out.features.float() - reference).abs().max() < 0.2


def test_encoder_rejects_bad_input():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="at least one sample"):
        encoder(torch.zeros(2, 16000), torch.tensor([16000, 0]))
    with pytest.raises(ValueError, match="at least 2800 samples"):
        encoder(torch.zeros(1, 2000), torch.tensor([2000]))
    with pytest.raises(ValueError, match="at most 480000 samples"):
        encoder(torch.zeros(1, 480_001), torch.tensor([480_001]))
    with pytest.raises(ValueError, match="no predictor"):
        encoder.model.classify(torch.zeros(1, 16000))


def test_models_of_any_size_build_from_a_config():
    model = build_beats(
        BeatsConfig(
            encoder_layers=1,
            encoder_embed_dim=24,
            encoder_attention_heads=3,
            encoder_ffn_embed_dim=48,
            embed_dim=24,
            conv_pos=8,
            conv_pos_groups=4,
            activation_fn="glu",
        ),
        seed=0,
    )
    assert isinstance(model, BEATs) and model.post_extract_proj is None
    assert "encoder.layers.0.fc1.linear.weight" in model.state_dict()
    features, _ = model.extract_features(torch.randn(1, 4000) * 0.1)
    assert features.shape == (1, 8, 24)
    again = build_beats(model.cfg, seed=0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_real_geometry_shapes():
    encoder = BeatsEncoder(build_beats(seed=0))
    out = encoder(torch.randn(1, 16000) * 0.1, torch.tensor([16000]))
    assert out.features.shape == (1, 48, 768) and encoder.output_dim == 768
