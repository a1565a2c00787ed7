"""``omnivox bench``: speed and memory of a loaded model, each figure beside a baseline.

Figures (all measured in the same process, same inputs):
- audio encoding, seconds per second of audio, on 90 s of audio: windows batched
  (``windows_per_batch``) vs the one-window-at-a-time reference path;
- time to first token for 10 s and 30 s clips: audio tokens as configured vs all
  window tokens (SALMONN keeps every token of the padded 30 s);
- decode tokens/s: with the KV cache vs without it;
- for a folder with a Whisper transcriber: a whole "Transcribe the speech." answer for a 10 s
  clip (the model's decoding, greedy), with the transcriber vs the LLM alone (its answer is
  one of the transcriber's candidates, so the difference is what the transcriber costs);
- peak resident memory vs the bytes of the model's parameters;
- model load, from a fresh Python process to a loaded model (imports included, files in the
  OS cache), when the model folder is given: as ``from_pretrained`` loads it (a plain LoRA
  folded without peft, the folded LLM of a small model cached) vs attaching the LoRA with
  peft and merging it through peft.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from omnivox.agent.assistant import Assistant
from omnivox.agent.model import OmnivoxModel
from omnivox.prompts import Message


def _timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _test_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic mix of tones and noise (speed does not depend on content)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _with_audio_settings(model: OmnivoxModel, **changes) -> OmnivoxModel:
    """A shallow view of ``model`` with other audio settings (weights shared)."""
    view = object.__new__(type(model))
    view.__dict__.update(model.__dict__)
    view.config = replace(model.config, audio=replace(model.config.audio, **changes))
    return view


def _first_token_time(model: OmnivoxModel, clip: np.ndarray) -> float:
    start = time.perf_counter()
    encoded = model.encode_clip(clip)
    batch = model.build_inputs([[Message("user", "Describe the audio.", num_audio=1)]], [[encoded]])
    model.llm.generate(
        inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=1, do_sample=False
    )
    return time.perf_counter() - start


def _decode_rate(model: OmnivoxModel, clip_tokens: torch.Tensor, n: int, use_cache: bool) -> float:
    batch = model.build_inputs([[Message("user", "Describe the audio.", num_audio=1)]], [[clip_tokens]])
    kwargs = dict(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, do_sample=False, use_cache=use_cache)
    start = time.perf_counter()
    model.llm.generate(**kwargs, max_new_tokens=1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.llm.generate(**kwargs, max_new_tokens=n, min_new_tokens=n)
    total = time.perf_counter() - start
    return (n - 1) / max(total - first, 1e-9)


_LOAD_SCRIPT = """
import sys, time
start = time.perf_counter()
import torch
from omnivox.agent.model import OmnivoxModel
folder, device, dtype, peft_merge = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
model = OmnivoxModel.from_pretrained(folder, device=device, dtype=getattr(torch, dtype), merge_lora=not peft_merge)
if peft_merge and model.config.lora is not None:
    model.merge_lora()
print(time.perf_counter() - start)
"""


def _load_seconds(folder: Path, device: str, dtype: torch.dtype, peft_merge: bool) -> float:
    """Seconds from a fresh interpreter to a loaded model (the interpreter's own start excluded)."""
    args = [sys.executable, "-c", _LOAD_SCRIPT, str(folder), device, str(dtype).removeprefix("torch."), "1" if peft_merge else "0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"loading {folder} in a fresh process failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def run_benchmark(
    assistant: Assistant, out: Path | None = None, repeats: int = 3, decode_tokens: int = 32, folder: Path | None = None
) -> dict:
    """Measure and print the figures; return them (and write JSON to ``out``).

    ``folder``: the model folder ``assistant`` came from; adds the load figure.
    """
    model = assistant.model
    from rich.console import Console
    from rich.table import Table

    results: dict[str, dict[str, float]] = {}
    long_clip = _test_audio(90.0)
    batched = _timed(lambda: model.encode_clip(long_clip), repeats) / 90.0
    single = _timed(lambda: _with_audio_settings(model, windows_per_batch=1).encode_clip(long_clip), repeats) / 90.0
    results["encode_s_per_audio_s"] = {"omnivox": batched, "baseline": single, "baseline_name": "one window at a time"}

    full = _with_audio_settings(model, trim_to_audio=False)
    for seconds in (10.0, 30.0):
        clip = _test_audio(seconds, seed=1)
        ours = _timed(lambda clip=clip: _first_token_time(model, clip), repeats)
        ref = _timed(lambda clip=clip: _first_token_time(full, clip), repeats)
        results[f"ttft_{int(seconds)}s_audio_s"] = {"omnivox": ours, "baseline": ref, "baseline_name": "all window tokens"}

    tokens = model.encode_clip(_test_audio(10.0, seed=2)).tokens
    cached = statistics.median(_decode_rate(model, tokens, decode_tokens, True) for _ in range(repeats))
    uncached = statistics.median(_decode_rate(model, tokens, decode_tokens, False) for _ in range(repeats))
    results["decode_tokens_per_s"] = {"omnivox": cached, "baseline": uncached, "baseline_name": "no KV cache"}

    if assistant.has_transcriber:
        clip = _test_audio(10.0, seed=3)
        on = assistant.settings(num_beams=1, do_sample=False, max_new_tokens=64)
        off = replace(on, use_transcriber=False)
        with_t = _timed(lambda: assistant.chat("Transcribe the speech.", [clip], on), repeats)
        alone = _timed(lambda: assistant.chat("Transcribe the speech.", [clip], off), repeats)
        results["transcribe_10s_s"] = {"omnivox": with_t, "baseline": alone, "baseline_name": "LLM alone"}

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["peak_memory_bytes"] = {"omnivox": float(peak), "baseline": float(param_bytes), "baseline_name": "parameter bytes"}
    if folder is not None:
        device, dtype = str(model.device), next(model.adapter.parameters()).dtype
        loads = {}
        for peft_merge in (False, True):
            _load_seconds(folder, device, dtype, peft_merge)  # warm-up: OS file cache, derived-file caches
            loads[peft_merge] = statistics.median(_load_seconds(folder, device, dtype, peft_merge) for _ in range(repeats))
        results["load_s"] = {"omnivox": loads[False], "baseline": loads[True], "baseline_name": "LoRA merged through peft"}
    results["_meta"] = {"threads": torch.get_num_threads(), "device": str(model.device), "dtype": str(next(model.adapter.parameters()).dtype)}

    table = Table(title="omnivox bench")
    for col in ("figure", "omnivox", "baseline", "ratio", "baseline is"):
        table.add_column(col)
    for name, row in results.items():
        if name.startswith("_"):
            continue
        ratio = row["omnivox"] / row["baseline"] if row["baseline"] else float("nan")
        table.add_row(name, f"{row['omnivox']:.4g}", f"{row['baseline']:.4g}", f"{ratio:.3f}", str(row["baseline_name"]))
    Console().print(table)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results
