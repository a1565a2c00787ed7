"""The server under bad requests and a crowd: a small run of ``benchmarks/serve_reliability.py`` on the tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import tiny

pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_reliability.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_reliability", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assistant(tiny_model_dir, tmp_path_factory):
    """The tiny model, greedy (so it streams), 8 new tokens by default."""
    from omnivox.agent.assistant import Assistant

    folder = tiny.greedy_copy(tiny_model_dir, tmp_path_factory.mktemp("reliability"), max_new_tokens=8, name="tiny")
    return Assistant.from_pretrained(folder)


def test_bad_requests_are_never_5xx_and_the_server_still_answers(bench, assistant):
    from omnivox.agent.server import ServerLimits, create_app

    limits = ServerLimits(max_audio_seconds=30, max_body_bytes=1 << 20)
    cases = bench.fuzz_cases(150, seed=1, max_body_bytes=limits.max_body_bytes)
    with bench.serving(create_app(assistant, "tiny", api_key=bench.KEY, limits=limits)) as base:
        result = bench.run_fuzz(base, cases)
        after = bench.still_answers(base)
    assert (result["crashes"], result["server_errors"], result["bad_error_shape"]) == (0, 0, 0), result["problems"]
    assert len(result["by_category"]) == 15  # every kind of bad request was sent
    assert result["statuses"].get("400", 0) > 75
    assert after == {"chat": True, "transcription": True, "health": True}


def test_a_crowd_is_answered_with_429s_only_beyond_the_queue_bound(bench, assistant):
    from omnivox.agent.server import ServerLimits, create_app

    limits = ServerLimits(max_queue=4, max_batch_size=4)
    clip = bench.wav_bytes(bench.tone(1.0), 16000)
    with bench.serving(create_app(assistant, "tiny", api_key=bench.KEY, limits=limits)) as base:
        result = bench.run_load(base, 24, 4, limits.max_queue, clip, max_tokens=4)
    assert result["lost"] == 0 and result["answered"] == 24, result["failures"]
    assert result["429_below_bound"] == 0
    assert result["one_at_a_time"]["lost"] == 0
