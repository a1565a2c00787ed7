"""Fold a saved peft LoRA adapter into a plain causal LM's linear weights, without peft.

peft stays the path for training, for unmerged inference, for quantized LLMs and for every
adapter feature this file does not handle; this file covers the common inference case, where
the update is folded once at load: ``W <- W + scale * (alpha / r) * B @ A`` (``alpha / sqrt(r)``
under rsLoRA), the same product peft's ``merge_adapter`` adds.

Why not peft's own merge at load: importing peft imports bitsandbytes, whose CPU backend
wraps its kernels in ``torch.compile`` at import time; on the bundled nano model that import
plus peft's wrapping and merging was ~4 s of a ~6 s start on 2 CPU cores.

The saved adapter is untrusted input: every key must name a LoRA A or B matrix of an
``nn.Linear`` in the model, with shapes that fit the layer and the configured rank.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from omnivox.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft's saved names: base_model.model.<module path>.lora_{A,B}.weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# adapter_config.json fields whose non-default values change what a merge must compute
_MUST_BE_OFF = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora")
_MUST_BE_EMPTY = (
    "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices",
    "target_parameters", "alora_invocation_tokens", "use_bdlora",
)


@dataclass
class _Pair:
    linear: nn.Linear
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]


def unsupported_features(config: dict) -> list[str]:
    """The adapter_config.json settings that only peft can merge (empty: this file can)."""
    out = []
    if config.get("peft_type", "LORA") != "LORA":
        out.append(f"peft_type={config.get('peft_type')}")
    if config.get("bias", "none") != "none":
        out.append(f"bias={config.get('bias')}")
    out += [name for name in _MUST_BE_OFF if config.get(name)]
    out += [name for name in _MUST_BE_EMPTY if config.get(name)]
    return out


class FoldedLora:
    """A LoRA adapter folded into ``nn.Linear`` weights; :meth:`rescale` changes its scale in place.

    Args:
        pairs: module path -> the layer and its A ``[r, in]`` / B ``[out, r]`` matrices.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` under rsLoRA).
        config: the adapter's ``adapter_config.json``.
    """

    def __init__(self, pairs: dict[str, _Pair], scaling: float, config: dict) -> None:
        self.pairs = pairs
        self.scaling = scaling
        self.config = config  # adapter_config.json as read, written back by :meth:`save`
        self.scale = 0.0  # what the weights hold now (0: not folded yet)

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module) -> FoldedLora | None:
        """Read a peft adapter folder for ``model`` (not yet folded; call :meth:`rescale`).

        Returns None when the adapter uses a feature only peft merges (the caller then attaches
        it with peft). Raises ``CheckpointError`` when the files are missing, unreadable or do not
        fit the model, naming the module and the shapes.
        """
        folder = Path(folder)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder / CONFIG_FILE}: cannot read the LoRA config: {err}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / CONFIG_FILE}: expected a JSON object")
        unsupported = unsupported_features(config)
        if unsupported:
            log.info("%s: LoRA uses %s; merging through peft", folder, ", ".join(unsupported))
            return None
        r, alpha = config.get("r"), config.get("lora_alpha")
        if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
            raise CheckpointError(f"{folder / CONFIG_FILE}: r={r!r} and lora_alpha={alpha!r} must be a positive int and a number")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        try:
            state = load_file(folder / WEIGHTS_FILE)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: cannot read the LoRA weights: {err}") from None

        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            m = _KEY.match(key)
            if m is None:
                raise CheckpointError(f"{folder / WEIGHTS_FILE}: {key!r} is not a LoRA A/B weight in peft's saved names")
            found.setdefault(m["module"], {})[m["ab"]] = tensor
        if not found:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: no LoRA weights")
        embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        pairs: dict[str, _Pair] = {}
        for path, ab in sorted(found.items()):
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{folder / WEIGHTS_FILE}: {path} has lora_{''.join(sorted(ab))} only; both A and B are needed")
            try:
                linear = model.get_submodule(path)
            except AttributeError:
                raise CheckpointError(f"{folder / WEIGHTS_FILE}: the LLM has no module {path!r}") from None
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"{folder / WEIGHTS_FILE}: {path} is a {type(linear).__name__}, not a Linear layer")
            if embedding is not None and linear.weight is embedding:
                log.info("%s: LoRA on %s, whose weight is tied to the embeddings; merging through peft", folder, path)
                return None
            a, b = ab["A"], ab["B"]
            expect_a, expect_b = (r, linear.in_features), (linear.out_features, r)
            if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
                raise CheckpointError(
                    f"{folder / WEIGHTS_FILE}: {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"a Linear {linear.in_features}->{linear.out_features} at r={r}: expected {expect_a} / {expect_b}"
                )
            pairs[path] = _Pair(linear, a, b)
        return cls(pairs, scaling, config)

    @torch.no_grad()
    def rescale(self, scale: float) -> None:
        """Make the weights hold ``scale`` times the LoRA update (1.0: as trained, 0.0: the base)."""
        if scale < 0:
            raise ValueError(f"LoRA scale must be >= 0, got {scale}")
        old = self.scale
        for pair in self.pairs.values():
            w = pair.linear.weight
            product = pair.b.to(w.device, torch.float32) @ pair.a.to(w.device, torch.float32)  # [out, in]
            # take the old update out and put the new one in, as peft's unmerge + merge do
            if old:
                w.sub_((product * (self.scaling * old)).to(w.dtype))
            if scale:
                w.add_((product * (self.scaling * scale)).to(w.dtype))
        self.scale = scale

    def mark_folded(self, scale: float) -> None:
        """Record that the weights already hold ``scale`` times the update (a cached folded copy)."""
        self.scale = scale

    def save(self, folder: str | Path) -> Path:
        """Write the adapter back in peft's format (the unscaled A/B matrices, the config as read)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        state = {}
        for path, pair in self.pairs.items():
            state[f"base_model.model.{path}.lora_A.weight"] = pair.a.contiguous()
            state[f"base_model.model.{path}.lora_B.weight"] = pair.b.contiguous()
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        return folder

    def __len__(self) -> int:
        return len(self.pairs)
