"""``omnivox export``: make a self-contained model folder from one a training run wrote.

A run's ``model/`` folder refers to its encoder checkpoints by the paths the recipe gave
(absolute, on the machine that trained). Exporting copies the parts of the model-folder
format into the destination, copies encoder checkpoints that are local files next to them and
refers to them by file name, keeps ``package:``/hub references as they are, points the LoRA's
``base_model_name_or_path`` at the config's LLM reference, and can set the folder's default
decoding. Other files already in the destination (a model card, evaluation results) are kept.
This is how ``assets/nano`` is made from a run (see its model card).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from omnivox.agent.config import OmnivoxConfig
from omnivox.agent.generation import GenerationSettings
from omnivox.agent.loading import resolve_ref
from omnivox.encoders.base import sha256_file
from omnivox.errors import CheckpointError, UserInputError

# Files of the model-folder format besides config.json, and the CTC head a later CTC stage continues from.
COPIED_FILES = ("adapter.safetensors", "ctc_head.safetensors")
COPIED_DIRS = ("lora", "tokenizer", "codec")  # codec/: the speech codec (optional)


def export_model_folder(src: str | Path, dst: str | Path, *, generation: dict[str, Any] | None = None) -> Path:
    """Write a self-contained copy of the model folder ``src`` to ``dst``; returns ``dst``.

    Args:
        src: a model folder (e.g. ``runs/NAME/model``).
        dst: the destination folder (created; the format's files in it are replaced).
        generation: the default decoding to store (``GenerationSettings`` fields); None keeps src's.
    """
    src, dst = Path(src), Path(dst)
    config = OmnivoxConfig.load(src / "config.json")
    if not (src / "adapter.safetensors").is_file():
        raise CheckpointError(f"{src}: adapter.safetensors is missing")
    if config.lora is not None and not (src / "lora").is_dir():
        raise CheckpointError(f"{src}: the config has LoRA settings but there is no lora/ folder")
    if src.resolve() == dst.resolve():
        raise UserInputError(f"export: source and destination are the same folder ({src})")
    dst.mkdir(parents=True, exist_ok=True)

    encoders = []
    for ref in config.encoders:
        local = None if ":" in ref.path else Path(resolve_ref(ref.path, src))
        if local is not None and local.is_file():
            target = dst / local.name
            if not target.is_file() or sha256_file(target) != sha256_file(local):
                shutil.copy2(local, target)
            ref = replace(ref, path=local.name)
        elif local is not None and local.exists():
            raise UserInputError(f"export: encoder {ref.kind} points at {local}, a folder; only checkpoint files are copied")
        encoders.append(ref)
    settings = config.generation if generation is None else GenerationSettings.from_dict(generation, "--generation")
    new_config = replace(config, encoders=tuple(encoders), generation=settings)

    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for name in COPIED_DIRS:
        if (src / name).is_dir():
            shutil.rmtree(dst / name, ignore_errors=True)
            shutil.copytree(src / name, dst / name)
    new_config.save(dst / "config.json")
    lora_config = dst / "lora" / "adapter_config.json"
    if lora_config.is_file():
        data = json.loads(lora_config.read_text())
        data["base_model_name_or_path"] = new_config.llm
        lora_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return dst
