"""The composite model config, saved as ``config.json`` in a model folder.

Built once at the edge (CLI / loader / converter) and passed down; frozen after that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from omnivox.adapters.qformer import QFormerConfig
from omnivox.agent.generation import GenerationSettings
from omnivox.errors import CheckpointError

# 2: the decoding fields ctc_weight / ctc_candidates became ctc_fusion_weight / ctc_fusion_candidates
#    and the transcriber's ctc_weight became ctc_rescore_weight (version 1 folders are read by
#    ``_upgrade_v1``)
FORMAT_VERSION = 2
# Encoder kinds and the loader options each accepts (see omnivox.agent.model.ENCODER_LOADERS).
ENCODER_OPTIONS: dict[str, frozenset[str]] = {
    "whisper": frozenset({"pad_to_window"}),
    "beats": frozenset(),
}
ENCODER_KINDS = tuple(ENCODER_OPTIONS)


@dataclass(frozen=True)
class EncoderRef:
    """Where a frozen encoder's weights come from.

    Attributes:
        kind: "whisper" or "beats" (see ``omnivox.agent.model.ENCODER_LOADERS``).
        path: an official name / hub id, or a local path (relative paths are relative to
            the model folder).
        sha256: optional checksum of a local checkpoint file, checked on load.
        options: loader options of this kind (``ENCODER_OPTIONS``), e.g. Whisper's
            ``{"pad_to_window": false}``.
    """

    kind: Literal["whisper", "beats"]
    path: str
    sha256: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise CheckpointError(f"unknown encoder kind {self.kind!r}; known: {list(ENCODER_KINDS)}")
        if not self.path:
            raise CheckpointError(f"encoder {self.kind!r} needs a path or name")
        unknown = sorted(set(self.options) - ENCODER_OPTIONS[self.kind])
        if unknown:
            raise CheckpointError(
                f"unknown options {unknown} for a {self.kind} encoder; known: {sorted(ENCODER_OPTIONS[self.kind])}"
            )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the LLM (SALMONN: r 8, alpha 32, dropout 0.1 on q_proj and v_proj)."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise CheckpointError(f"LoRA rank must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise CheckpointError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise CheckpointError("LoRA needs at least one target module")


@dataclass(frozen=True)
class AudioSettings:
    """How audio is cut and fed to the encoders.

    Attributes:
        window_seconds: audio per encoder window (Whisper's 30 s).
        overlap_seconds: overlap between consecutive windows of long audio.
        min_seconds: shorter clips are zero-padded to this (SALMONN: 1 s).
        max_seconds: longer input is rejected (never truncated).
        trim_to_audio: give the LLM only the Q-Former windows that cover real audio,
            instead of all windows of the padded 30 s (SALMONN keeps all: False).
        windows_per_batch: encoder windows processed at once; bounds encoder memory.
    """

    window_seconds: float = 30.0
    overlap_seconds: float = 0.0
    min_seconds: float = 1.0
    max_seconds: float = 3600.0
    trim_to_audio: bool = False
    windows_per_batch: int = 4

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise CheckpointError(f"window_seconds must be positive, got {self.window_seconds}")
        if not 0 <= self.overlap_seconds < self.window_seconds:
            raise CheckpointError(
                f"overlap_seconds must be in [0, window_seconds={self.window_seconds}), got {self.overlap_seconds}"
            )
        if not 0 <= self.min_seconds <= self.window_seconds:
            raise CheckpointError(f"min_seconds must be in [0, {self.window_seconds}], got {self.min_seconds}")
        if self.max_seconds <= 0:
            raise CheckpointError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.windows_per_batch < 1:
            raise CheckpointError(f"windows_per_batch must be >= 1, got {self.windows_per_batch}")


@dataclass(frozen=True)
class TranscriberSettings:
    """Whisper's own decoder answering transcription requests (``agent/transcriber.py``,
    composed by ``agent/transcription.py``).

    For a request to transcribe one clip of at most 30 s, Whisper's ``beam_size`` best
    transcripts and the LLM's own answer are the candidates; the answer is the one with the
    highest ``whisper_weight * log p_Whisper + llm_weight * log p_LLM + ctc_rescore_weight * log p_CTC``
    (each the log-probability of the whole text given the audio; the CTC term needs the folder's
    CTC head). With ``llm_weight`` 0 the LLM does not answer at all (Whisper's candidates
    only). Longer clips get Whisper's long-form transcript.

    Attributes:
        path: an openai-whisper checkpoint: a ``.pt`` file with ``dims``, an official name, or
            ``ct2-whisper:REF`` (relative paths are relative to the model folder).
        beam_size: Whisper's beam, and how many of its transcripts are candidates.
        whisper_weight, llm_weight, ctc_rescore_weight: the weights of the three scores (>= 0).
    """

    path: str
    beam_size: int = 5
    whisper_weight: float = 1.0
    llm_weight: float = 0.0
    ctc_rescore_weight: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise CheckpointError(f"transcriber: path must name a Whisper checkpoint, got {self.path!r}")
        if isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int) or not 1 <= self.beam_size <= 32:
            raise CheckpointError(f"transcriber: beam_size must be an integer in [1, 32], got {self.beam_size!r}")
        weights = {
            "whisper_weight": self.whisper_weight,
            "llm_weight": self.llm_weight,
            "ctc_rescore_weight": self.ctc_rescore_weight,
        }
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise CheckpointError(f"transcriber: {name} must be a number >= 0, got {value!r}")
        if not any(weights.values()):
            raise CheckpointError("transcriber: at least one of whisper_weight, llm_weight, ctc_rescore_weight must be > 0")



@dataclass(frozen=True)
class OmnivoxConfig:
    """Everything needed to rebuild a model from its folder.

    Attributes:
        llm: base LLM, hub id or local folder (relative to the model folder allowed).
        encoders: frozen encoders, in the order their features are fused.
        qformer: geometry of the adapter (its ``encoder_dims`` follow ``encoders``).
        lora: LoRA settings, or None for a model without LoRA.
        prompt_style: name in ``omnivox.prompts.PROMPT_STYLES``.
        audio: windowing of the audio.
        llm_gguf_file: file name inside ``llm`` when the LLM is a GGUF file.
        transcriber: Whisper's own decoder for transcription requests, or None (the LLM answers).
        generation: the model's default decoding (in ``config.json`` the fields that differ from
            SALMONN's beam 4, e.g. ``{"num_beams": 1}`` for a small model that beam search makes
            terse). A caller overrides it: ``config.generation.override(max_new_tokens=64)``.
        format_version: version of the folder format.
    """

    llm: str
    encoders: tuple[EncoderRef, ...]
    qformer: QFormerConfig
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    prompt_style: str = "salmonn"
    audio: AudioSettings = field(default_factory=AudioSettings)
    llm_gguf_file: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    transcriber: TranscriberSettings | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.generation, GenerationSettings):
            raise CheckpointError(f"generation must be GenerationSettings, got {type(self.generation).__name__}")
        if self.transcriber is not None and not isinstance(self.transcriber, TranscriberSettings):
            raise CheckpointError(f"transcriber must be TranscriberSettings or None, got {type(self.transcriber).__name__}")
        if not self.encoders:
            raise CheckpointError("a model needs at least one audio encoder")
        if len(self.encoders) != len(self.qformer.encoder_dims):
            raise CheckpointError(
                f"{len(self.encoders)} encoders but the Q-Former expects {len(self.qformer.encoder_dims)} "
                f"(encoder_dims={list(self.qformer.encoder_dims)})"
            )
        if self.format_version > FORMAT_VERSION:
            raise CheckpointError(
                f"model folder format {self.format_version} is newer than this omnivox ({FORMAT_VERSION}); upgrade omnivox"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["qformer"] = self.qformer.to_dict()
        data["generation"] = self.generation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmnivoxConfig:
        _check_fields(data, cls, "config")
        version = data.get("format_version", 1)  # folders before format 2 may not name theirs
        if isinstance(version, int) and version < 2:
            data = _upgrade_v1(data)
        try:
            lora = data.get("lora", {})
            return cls(
                llm=data["llm"],
                encoders=tuple(EncoderRef(**e) for e in data["encoders"]),
                qformer=QFormerConfig.from_dict(data["qformer"]),
                lora=None if lora is None else LoraSettings(**{**lora, "target_modules": tuple(lora.get("target_modules", ("q_proj", "v_proj")))}),
                prompt_style=data.get("prompt_style", "salmonn"),
                audio=AudioSettings(**data.get("audio", {})),
                llm_gguf_file=data.get("llm_gguf_file"),
                generation=GenerationSettings.from_dict(data.get("generation", {})),
                transcriber=_transcriber(data.get("transcriber")),
                format_version=data.get("format_version", FORMAT_VERSION),
            )
        except KeyError as err:
            raise CheckpointError(f"config is missing the field {err.args[0]!r}") from None
        except TypeError as err:
            raise CheckpointError(f"invalid config: {err}") from None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> OmnivoxConfig:
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json; is this an omnivox model folder?")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data)


# version-1 names -> version-2 names, per section of config.json
_V1_RENAMES = {
    "generation": {"ctc_weight": "ctc_fusion_weight", "ctc_candidates": "ctc_fusion_candidates"},
    "transcriber": {"ctc_weight": "ctc_rescore_weight"},
}


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 config.json read as version 2 (renamed decoding fields; nothing else changed)."""
    data = dict(data, format_version=FORMAT_VERSION)
    for section, renames in _V1_RENAMES.items():
        if isinstance(data.get(section), dict):
            data[section] = {renames.get(k, k): v for k, v in data[section].items()}
    return data


def _transcriber(data: Any) -> TranscriberSettings | None:
    if data is None:
        return None
    _check_fields(data, TranscriberSettings, "transcriber")
    if "path" not in data:
        raise CheckpointError("transcriber: the field 'path' is missing")
    return TranscriberSettings(**data)


def _check_fields(data: Any, cls: type, what: str) -> None:
    """``data`` is a JSON object whose keys are fields of the dataclass ``cls``."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"unknown fields in {what}: {unknown}; known: {sorted(known)}")
