"""Feature cache: the frozen encoders run once per clip; training reads their features from disk.

Per clip, every window's features are stored exactly as
:meth:`OmnivoxModel.encode_clip_features` returns them (with ``trim_to_audio`` only the
frames of the Q-Former windows covering the audio; otherwise all frames of the window),
so ``model.audio_tokens(cache.load(clip))`` equals ``model.encode_clip(samples)``
(bit for bit with ``cache_dtype = "float32"``; float16 rounds the features)::

    <cache_dir>/<key>/
      meta.json               what the key was made of, encoder widths, dtype
      index.rank<R>.jsonl     one line per finished clip: {"audio", "file", "windows", "tokens"}
      clips/ab/<sha1>.safetensors   tensors "w<j>.e<i>" [T, D]; metadata: frame lengths, token counts

The key is a hash of the encoder references (path, file size, checksum), the audio
settings and the Q-Former frame geometry, so changing any of them starts a new cache.
Building is resumable (finished clips are skipped) and can be split over ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from omnivox.agent.audio import load_audio
from omnivox.agent.model import OmnivoxModel, WindowFeatures
from omnivox.errors import CheckpointError
from omnivox.training.build import FeatureGeometry

log = logging.getLogger(__name__)

CACHE_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def cache_key(geometry: FeatureGeometry, dtype: str) -> tuple[str, dict]:
    """A 16-hex-digit hash of everything that decides the cached features, and what was hashed."""
    encoders = []
    for ref in geometry.encoders:
        path = Path(ref.path)
        size = path.stat().st_size if path.is_file() else None
        encoders.append({"kind": ref.kind, "path": ref.path, "size": size, "sha256": ref.sha256})
    blob = {
        "version": CACHE_VERSION,
        "encoders": encoders,
        "audio": dataclasses.asdict(geometry.audio),
        "frame_rate": geometry.frame_rate,
        "kernel": geometry.kernel_frames,
        "stride": geometry.stride_frames,
        "queries": geometry.queries_per_window,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16], blob


class FeatureCache:
    """One cache folder (see the module docstring). Clips are named by their manifest path."""

    def __init__(self, root: Path, geometry: FeatureGeometry, dtype: str = "float16") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        key, blob = cache_key(geometry, dtype)
        self.folder = Path(root) / key
        self.key = key
        self.dtype = dtype
        self._blob = blob
        self._entries: dict[str, dict] = {}
        self.reload()

    # ---- index -------------------------------------------------------------------------------
    def reload(self) -> None:
        """Read every rank's index file (a torn last line from a killed run is ignored)."""
        self._entries = {}
        for index in sorted(self.folder.glob("index.rank*.jsonl")):
            for line in index.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (self.folder / entry["file"]).is_file():
                    self._entries[entry["audio"]] = entry

    @property
    def meta(self) -> dict | None:
        path = self.folder / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def encoder_dims(self) -> tuple[int, ...] | None:
        meta = self.meta
        return tuple(meta["encoder_dims"]) if meta else None

    def __contains__(self, audio: str) -> bool:
        return audio in self._entries

    def missing(self, audios: Sequence[str]) -> list[str]:
        """Clips (manifest paths, deduplicated, in order) that are not cached yet."""
        return [a for a in dict.fromkeys(audios) if a not in self._entries]

    def num_tokens(self, audio: str) -> int:
        return int(self._entries[audio]["tokens"])

    # ---- read/write ----------------------------------------------------------------------------
    def load(self, audio: str) -> list[WindowFeatures]:
        """The windows of a cached clip, features as stored ([T, D] float16/float32, CPU)."""
        entry = self._entries.get(audio)
        if entry is None:
            raise CheckpointError(f"{audio}: not in the feature cache {self.folder}")
        with safe_open(self.folder / entry["file"], framework="pt") as f:
            meta = f.metadata()
            frame_lengths = json.loads(meta["frame_lengths"])
            tokens = json.loads(meta["tokens"])
            encoders = int(meta["encoders"])
            return [
                WindowFeatures([f.get_tensor(f"w{j}.e{e}") for e in range(encoders)], frame_lengths[j], tokens[j])
                for j in range(len(tokens))
            ]

    def write(self, audio: str, windows: Sequence[WindowFeatures], rank: int = 0) -> None:
        """Store one clip's windows and append it to this rank's index."""
        name = hashlib.sha1(audio.encode()).hexdigest()
        rel = f"clips/{name[:2]}/{name}.safetensors"
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        store = STORAGE_DTYPES[self.dtype]
        tensors = {
            f"w{j}.e{e}": feat.detach().to("cpu", store).contiguous()
            for j, w in enumerate(windows)
            for e, feat in enumerate(w.features)
        }
        metadata = {
            "audio": audio,
            "frame_lengths": json.dumps([w.frame_length for w in windows]),
            "tokens": json.dumps([w.num_tokens for w in windows]),
            "encoders": str(len(windows[0].features)),
        }
        partial = path.with_name(path.name + f".partial{rank}")
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
        entry = {"audio": audio, "file": rel, "windows": len(windows), "tokens": sum(w.num_tokens for w in windows)}
        with open(self.folder / f"index.rank{rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self._entries[audio] = entry

    def write_meta(self, encoder_dims: Sequence[int]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {**self._blob, "key": self.key, "encoder_dims": list(encoder_dims)}
        partial = self.folder / f"meta.json.partial{os.getpid()}"
        partial.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(partial, self.folder / "meta.json")

    # ---- building --------------------------------------------------------------------------------
    def fill(
        self,
        model: OmnivoxModel,
        audios: Sequence[str],
        resolve: dict[str, Path],
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> int:
        """Encode the clips not cached yet (this rank's share: every ``world_size``-th); returns how many.

        Args:
            model: a model with its real encoders loaded.
            audios: manifest paths of the clips (the cache's names).
            resolve: manifest path -> audio file on disk.
        """
        if rank == 0:
            self.write_meta([e.output_dim for e in model.encoders])
        todo = self.missing(audios)[rank::world_size]
        if not todo:
            return 0
        log.info("feature cache %s: encoding %d clips (rank %d)", self.folder, len(todo), rank)
        bar = tqdm(todo, desc=f"features r{rank}", unit="clip", disable=not progress, dynamic_ncols=True)
        for audio in bar:
            samples = load_audio(resolve[audio], max_seconds=model.config.audio.max_seconds).samples
            self.write(audio, model.encode_clip_features(samples), rank)
        return len(todo)
