"""AudioAdapter: parity with the official SALMONN code, window counting, input checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnivox.adapters.qformer import AudioAdapter, QFormerConfig
from omnivox.convert.salmonn import load_salmonn_checkpoint

REF = Path(__file__).with_name("data") / "qformer_ref.safetensors"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_config(**overrides) -> QFormerConfig:
    base = dict(encoder_dims=(12, 8), hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                llm_hidden_size=24)
    return QFormerConfig(**(base | overrides))


def _tiny_adapter(**overrides) -> AudioAdapter:
    torch.manual_seed(0)
    adapter = AudioAdapter(_tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return adapter


# ---- parity with SALMONN._encode_auditory_feature ------------------------------------------


def _reference() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(REF), "pt") as f:
        meta = json.loads(f.metadata()["omnivox_parity"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


@pytest.mark.parametrize("model_name", ["A", "B"])
def test_parity_with_official_salmonn(model_name: str, tmp_path: Path) -> None:
    """load_salmonn_checkpoint + AudioAdapter == official code on random weights (see data/make_qformer_ref.py)."""
    tensors, meta = _reference()
    geom = meta[model_name]["geometry"]
    prefix = f"{model_name}.model."
    state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    for n in range(2):  # the converter insists on LoRA; these do not touch the adapter
        for proj in ("q_proj", "v_proj"):
            key = f"llama_model.base_model.model.model.layers.{n}.self_attn.{proj}.lora_"
            state[key + "A.default.weight"] = torch.zeros(8, geom["llm"])
            state[key + "B.default.weight"] = torch.zeros(geom["llm"], 8)
    path = tmp_path / "salmonn_ref.pth"
    torch.save({"model": state, "optimizer": {}}, path)

    weights = load_salmonn_checkpoint(path, num_heads=geom["heads"])
    config = weights.qformer_config
    assert (config.encoder_dims, config.hidden_size, config.num_layers, config.intermediate_size) == (
        (geom["whisper_dim"], geom["beats_dim"]), geom["hidden"], geom["layers"], geom["ffn"])
    assert (config.queries_per_window, config.cross_attention_every, config.llm_hidden_size) == (
        geom["queries"], geom["cross_freq"], geom["llm"])

    for case, window in meta[model_name]["cases"].items():
        adapter = AudioAdapter(dataclasses.replace(config, **window))
        adapter.load_state_dict(weights.adapter_state, strict=True)
        adapter.eval()
        speech, audio = tensors[f"{model_name}.{case}.speech"], tensors[f"{model_name}.{case}.audio"]
        with torch.no_grad():
            out32 = adapter([speech, audio])
            out64 = adapter.double()([speech.double(), audio.double()])
        expected32, expected64 = tensors[f"{model_name}.{case}.expected_f32"], tensors[f"{model_name}.{case}.expected_f64"]
        assert out32.shape == expected32.shape == (speech.shape[0], adapter.num_tokens(max(speech.shape[1], audio.shape[1])), geom["llm"])
        torch.testing.assert_close(out32, expected32, rtol=0, atol=1e-5)
        torch.testing.assert_close(out64, expected64, rtol=0, atol=1e-10)


def test_parity_fixture_covers_salmonn_30s_geometry() -> None:
    tensors, _ = _reference()
    assert tensors["A.full.speech"].shape[1] == 1500 and tensors["A.full.audio"].shape[1] == 1496
    assert tensors["A.full.expected_f32"].shape[1] == 88


# ---- window counting -----------------------------------------------------------------------


def test_salmonn_windows() -> None:
    config = QFormerConfig.salmonn(5120)
    assert (config.kernel_frames, config.stride_frames, config.fused_dim) == (17, 17, 2048)
    with torch.device("meta"):
        adapter = AudioAdapter(config)
    assert adapter.num_windows(1500) == 88
    assert adapter.num_tokens(1500) == 88
    assert adapter.num_tokens(17) == 1 and adapter.num_tokens(33) == 1 and adapter.num_tokens(34) == 2


@pytest.mark.parametrize(("window", "stride", "queries", "frames"), [
    (0.333333, 0.333333, 1, 50), (0.5, 0.25, 1, 200), (0.2, 0.4, 3, 97), (1.0, 0.333333, 2, 64), (0.333333, 0.333333, 2, 17),
])
def test_num_tokens_matches_forward(window: float, stride: float, queries: int, frames: int) -> None:
    adapter = _tiny_adapter(window_seconds=window, stride_seconds=stride, queries_per_window=queries)
    kernel, step = adapter.config.kernel_frames, adapter.config.stride_frames
    # independent count: F.unfold, as SALMONN does it
    windows = torch.nn.functional.unfold(torch.zeros(1, 1, 1, frames), kernel_size=(1, kernel), stride=(1, step)).shape[-1]
    assert adapter.num_windows(frames) == windows
    with torch.no_grad():
        out = adapter([torch.randn(2, frames, 12), torch.randn(2, frames - 3, 8)])
    assert out.shape == (2, adapter.num_tokens(frames), 24) == (2, windows * queries, 24)


def test_too_few_frames() -> None:
    adapter = _tiny_adapter()
    with pytest.raises(ValueError, match="16 fused frames are fewer than one window of 17"):
        adapter([torch.randn(1, 16, 12), torch.randn(1, 10, 8)])


def test_queries_of_a_window_are_adjacent_and_windows_independent() -> None:
    """Token w*Q + q depends only on window w's frames."""
    adapter = _tiny_adapter(queries_per_window=3)
    speech, audio = torch.randn(1, 17 * 4, 12), torch.randn(1, 17 * 4, 8)
    with torch.no_grad():
        out = adapter([speech, audio])
        speech2 = speech.clone()
        speech2[:, 17:34] += 1.0  # change window 1 only
        out2 = adapter([speech2, audio])
    changed = (out - out2).abs().amax(-1)[0] > 0  # [W*Q]
    assert changed.tolist() == [False] * 3 + [True] * 3 + [False] * 6


def test_padding_is_zero_after_layernorm() -> None:
    """Missing BEATs frames are zeros after ln_audio (SALMONN pads after the norm)."""
    adapter = _tiny_adapter()
    speech, audio = torch.randn(1, 40, 12), torch.randn(1, 30, 8)
    fused = adapter.fuse([speech, audio])
    assert fused.shape == (1, 40, 20)
    assert torch.equal(fused[:, 30:, 12:], torch.zeros(1, 10, 8))
    torch.testing.assert_close(fused[:, :, :12], adapter.input_norms[0](speech))


def test_batch_equals_single() -> None:
    adapter = _tiny_adapter()
    speech, audio = torch.randn(3, 60, 12), torch.randn(3, 55, 8)
    with torch.no_grad():
        batched = adapter([speech, audio])
        single = torch.cat([adapter([speech[i : i + 1], audio[i : i + 1]]) for i in range(3)])
    # 3 items vs 1 are other GEMM shapes (another kernel on another CPU/BLAS): each side carries
    # ~3e-7 of float32 rounding at |out| < 1, so not 1e-6; leaking across items would show at 1e-1.
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_num_windows_covering() -> None:
    adapter = _tiny_adapter()  # kernel 17, stride 17
    assert [adapter.num_windows_covering(n) for n in (1, 17, 18, 34, 35)] == [1, 1, 2, 2, 3]
    assert adapter.num_windows_covering(1500) == 89
    assert adapter.num_windows_covering(1500, num_frames=1500) == 88
    with pytest.raises(ValueError, match="num_valid_frames"):
        adapter.num_windows_covering(0)


def test_frame_lengths_keep_only_covering_windows() -> None:
    adapter = _tiny_adapter(queries_per_window=2)
    speech, audio = torch.randn(2, 170, 12), torch.randn(2, 160, 8)
    with torch.no_grad():
        full = adapter([speech, audio])  # [2, 20, 24]
        trimmed = adapter([speech, audio], frame_lengths=torch.tensor([40, 60]))
    assert full.shape == (2, 20, 24)
    assert trimmed.shape == (2, 4 * 2, 24)  # ceil(60 / 17) = 4 windows
    # Fewer windows are other GEMM shapes: bit-equal here, but another CPU/BLAS may round differently.
    torch.testing.assert_close(trimmed[0, :6], full[0, :6], rtol=0, atol=1e-5)  # ceil(40 / 17) = 3 windows
    assert torch.equal(trimmed[0, 6:], torch.zeros(2, 24))
    torch.testing.assert_close(trimmed[1], full[1, :8], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"frame_lengths must be in \[1, 170\]"):
        adapter([speech, audio], frame_lengths=torch.tensor([0, 171]))
    with pytest.raises(ValueError, match=r"frame_lengths must be \[B\]"):
        adapter([speech, audio], frame_lengths=torch.tensor([40]))


# ---- input checks --------------------------------------------------------------------------


@pytest.mark.parametrize(("features", "message"), [
    ([torch.randn(1, 50, 12)], r"expected 2 feature tensors .* got 1: \[\(1, 50, 12\)\]"),
    ([torch.randn(1, 50, 12), torch.randn(1, 50, 9)], r"D_i = \(12, 8\); got shapes \[\(1, 50, 12\), \(1, 50, 9\)\]"),
    ([torch.randn(50, 12), torch.randn(1, 50, 8)], r"got shapes \[\(50, 12\), \(1, 50, 8\)\]"),
    ([torch.randn(2, 50, 12), torch.randn(1, 50, 8)], r"batch size: shapes \[\(2, 50, 12\), \(1, 50, 8\)\]"),
])
def test_shape_errors(features: list[torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_adapter()(features)


# ---- config --------------------------------------------------------------------------------


def test_config_round_trip_through_json() -> None:
    config = _tiny_config(queries_per_window=2, window_seconds=0.5)
    again = QFormerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.encoder_dims, tuple)
    assert QFormerConfig.salmonn().llm_hidden_size == 4096
    assert QFormerConfig.salmonn(5120).encoder_dims == (1280, 768)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_heads": 5}, "not divisible by num_heads 5"),
    ({"encoder_dims": ()}, "encoder_dims"),
    ({"window_seconds": 0.001}, "kernel 0"),
    ({"hidden_act": "swish"}, "hidden_act 'swish'"),
    ({"num_layers": 0}, "num_layers must be a positive int"),
])
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_config(**overrides)


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown QFormerConfig keys \['heads'\]"):
        QFormerConfig.from_dict({"encoder_dims": [4], "heads": 2})
