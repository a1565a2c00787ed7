"""The agent's workspace: one allowed directory, and the audio a conversation holds, by id.

Tools never take file paths from the model. A clip is named by an id: ``clip-1``, ``clip-2``, ...
for the clips the user gave (in order), ``audio-1``, ``audio-2``, ... for audio that tools made
(HuggingGPT's ``<GENERATED>-id``; that spelling is accepted too). An id the workspace does not
hold is an error listing the ids it does hold, so a model cannot invent a file.

Paths from outside (a CLI argument, an MCP call) go through :meth:`Workspace.resolve`: relative to
the allowed directory, never ``..`` above it, never an absolute path elsewhere, never a symlink
that leads out of it.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnivox.agent.audio import load_audio
from omnivox.errors import UserInputError

ID = re.compile(r"^(?:<GENERATED>-)?((?:clip|audio)-\d+)$")
FORMATS = ("wav", "flac", "ogg", "mp3")


@dataclass(frozen=True)
class AudioArtifact:
    """Audio held by the workspace: ``samples`` [S] float32 at ``sample_rate``; ``path`` once written."""

    id: str
    samples: np.ndarray
    sample_rate: int
    note: str = ""
    path: Path | None = None
    format: str = "wav"

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    def describe(self) -> str:
        """One line a model reads: ``audio-1: 2.50 s, 16000 Hz``."""
        return f"{self.id}: {self.duration:.2f} s, {self.sample_rate} Hz"

    def for_model(self) -> np.ndarray:
        """The samples at 16 kHz mono, as the encoders take them."""
        if self.sample_rate == 16000:
            return self.samples
        return load_audio(self.samples, sample_rate=self.sample_rate, max_seconds=None, name=self.id).samples


class Workspace:
    """An allowed directory and the conversation's audio.

    Args:
        root: the only directory tools may read from and write to; None: a new temporary one.
        write_artifacts: write every clip a tool makes into ``root`` as ``<id>.<format>``.
        max_items: most clips held in memory (a long-running server's workspace); past it the
            oldest are dropped (their files stay) and asking for them says so.
    """

    def __init__(self, root: str | Path | None = None, write_artifacts: bool = True, max_items: int = 256) -> None:
        if max_items < 1:
            raise UserInputError(f"max_items must be >= 1, got {max_items}")
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="omnivox-workspace-")
            root = self._tmp.name
        root = Path(root)
        if not root.is_dir():
            raise UserInputError(f"the allowed directory {str(root)!r} does not exist or is not a directory")
        self.root = root.resolve()
        self.write_artifacts = write_artifacts
        self.max_items = max_items
        self._items: dict[str, AudioArtifact] = {}
        self._dropped: set[str] = set()
        self._counts = {"clip": 0, "audio": 0}

    # ------------------------------------------------------------------ paths
    def resolve(self, path: str | os.PathLike) -> Path:
        """An existing file inside the allowed directory; anything else is a UserInputError."""
        text = os.fspath(path)
        if not text or "\x00" in text:
            raise UserInputError("the path is empty or contains a NUL byte")
        given = Path(text)
        if ".." in given.parts:
            raise UserInputError(f"the path {text!r} contains '..': only paths inside the allowed directory are read")
        candidate = given if given.is_absolute() else self.root / given
        real = candidate.resolve()
        if not real.is_relative_to(self.root):
            raise UserInputError(f"the path {text!r} is outside the allowed directory {str(self.root)!r}")
        if not real.is_file():
            raise UserInputError(f"no file {text!r} in the allowed directory")
        return real

    # ------------------------------------------------------------------ audio
    def _next_id(self, kind: str) -> str:
        self._counts[kind] += 1
        return f"{kind}-{self._counts[kind]}"

    def _hold(self, item: AudioArtifact) -> None:
        self._items[item.id] = item
        while len(self._items) > self.max_items:
            oldest = next(iter(self._items))
            del self._items[oldest]
            self._dropped.add(oldest)

    def forget(self, ref: str) -> None:
        """Drop a clip from memory (a file written for it stays)."""
        item = self.get(ref)
        del self._items[item.id]
        self._dropped.add(item.id)

    def add_clip(self, samples: np.ndarray, sample_rate: int = 16000, note: str = "") -> str:
        """Hold a clip the user gave; its id is the next ``clip-N``."""
        clip_id = self._next_id("clip")
        self._hold(AudioArtifact(clip_id, np.asarray(samples, dtype=np.float32), sample_rate, note))
        return clip_id

    def add_file(self, path: str | os.PathLike) -> str:
        """Read an audio file inside the allowed directory as the next ``clip-N`` (16 kHz mono)."""
        real = self.resolve(path)
        return self.add_clip(load_audio(real).samples, 16000, note=real.name)

    def put_audio(self, samples: np.ndarray, sample_rate: int, note: str = "", format: str = "wav") -> AudioArtifact:
        """Hold audio a tool made as the next ``audio-N`` (written to the allowed directory)."""
        if format not in FORMATS:
            raise UserInputError(f"format must be one of {list(FORMATS)}, got {format!r}")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1 or not np.isfinite(samples).all():
            raise UserInputError(f"a tool made audio of shape {list(samples.shape)} with non-finite values")
        audio_id = self._next_id("audio")
        path = None
        if self.write_artifacts:
            path = self.root / f"{audio_id}.{format}"
            write_audio(path, samples, sample_rate, format)
        artifact = AudioArtifact(audio_id, samples, sample_rate, note, path, format)
        self._hold(artifact)
        return artifact

    def get(self, ref: str) -> AudioArtifact:
        """The audio called ``ref`` (``clip-1``, ``audio-2`` or ``<GENERATED>-audio-2``)."""
        match = ID.match(ref.strip()) if isinstance(ref, str) else None
        if match is not None and match.group(1) in self._dropped:
            raise UserInputError(f"{match.group(1)} was dropped from memory (the workspace keeps the last {self.max_items} clips)")
        if match is None or match.group(1) not in self._items:
            held = ", ".join(self._items) or "none"
            raise UserInputError(f"no audio called {ref!r}; the workspace holds: {held}")
        return self._items[match.group(1)]

    @property
    def ids(self) -> list[str]:
        return list(self._items)


# Audio files written here, by format name: (libsndfile container, subtype)
AUDIO_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # what Opus encodes; other rates are resampled to 48 kHz


def write_audio(path: Path | io.BytesIO, samples: np.ndarray, sample_rate: int, format: str = "wav") -> None:
    """Write mono audio to a path or a file object (16-bit PCM for wav and flac; mp3 through
    libsndfile's MPEG layer III; opus in Ogg, at 48 kHz unless the rate is one Opus takes)."""
    import soundfile as sf

    container, subtype = AUDIO_FORMATS[format]
    if format == "opus" and sample_rate not in OPUS_RATES:
        import soxr

        samples, sample_rate = soxr.resample(samples, sample_rate, 48000).astype(np.float32), 48000
    try:
        sf.write(path, np.clip(samples, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    except (sf.LibsndfileError, TypeError, ValueError) as err:
        raise UserInputError(f"cannot write {format} at {sample_rate} Hz: {err}") from None


class WavWriter:
    """A 16-bit mono WAV file written piece by piece (``write`` each ``[n]`` float array as it
    comes: a player can start on the file before it is complete); a context manager."""

    def __init__(self, path: Path, sample_rate: int) -> None:
        import soundfile as sf

        try:
            self._file = sf.SoundFile(path, "w", samplerate=sample_rate, channels=1, format="WAV", subtype="PCM_16")
        except (sf.LibsndfileError, OSError) as err:
            raise UserInputError(f"cannot write {path}: {err}") from None
        self.frames = 0

    def write(self, samples: np.ndarray) -> None:
        self._file.write(np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0))
        self._file.flush()
        self.frames += int(np.asarray(samples).size)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def audio_bytes(samples: np.ndarray, sample_rate: int, format: str = "wav") -> bytes:
    """The audio as a file's bytes (for HTTP and MCP answers), written in memory."""
    buffer = io.BytesIO()
    write_audio(buffer, samples, sample_rate, format)
    return buffer.getvalue()
