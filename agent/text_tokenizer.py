"""The LLM's tokenizer on the ``tokenizers`` library alone, without importing transformers.

Importing transformers costs ~1.9 s and ~230 MB on every start (see ``agent/llama.py`` for the
whole story); its ``AutoTokenizer`` on a folder with a ``tokenizer.json`` is, underneath, the
same ``tokenizers.Tokenizer`` plus a few settings from ``tokenizer_config.json``. This file reads
those settings the way transformers v5's ``TokenizersBackend`` does, for the part of the HF
tokenizer API omnivox uses (``__call__`` / ``encode`` / ``decode`` / ``convert_tokens_to_ids`` /
the special token ids / ``len`` / ``save_pretrained``), with identical ids and text.

A folder that needs anything else (a model-specific tokenizer class, a sentencepiece or
tiktoken vocabulary, special tokens the vocabulary lacks, split special tokens...) is refused:
:meth:`TextTokenizer.supported` says why, and the loader uses ``AutoTokenizer`` instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from omnivox.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# files save_pretrained copies when the folder has them
FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, "chat_template.jinja", "chat_template.json")

# transformers classes that are the tokenizer.json as it is (no vocabulary rebuilt, no extra rules)
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' ``PreTrainedTokenizerBase.clean_up_tokenization``, in its order
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip
# vocabularies this large may get transformers' Mistral pre-tokenizer patch; not reproduced here
MAX_VOCAB = 100_000


def _content(token: Any) -> str | None:
    """A special token's text from its tokenizer_config form (a string or a serialized AddedToken)."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise ValueError(f"a special token must be a string or an AddedToken object, got {token!r}")


def _read(folder: Path) -> tuple[dict, dict]:
    """tokenizer_config.json and the special tokens in transformers' precedence."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} is not a JSON object")
    special = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    # transformers reads the legacy special_tokens_map.json only when the config has no added_tokens_decoder;
    # its entries then override the config's
    legacy = folder / SPECIAL_TOKENS_FILE
    if "added_tokens_decoder" not in config and legacy.is_file():
        mapping = json.loads(legacy.read_text())
        for name, value in mapping.items():
            if name in SPECIAL_TOKEN_NAMES:
                special[name] = value
            elif name in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                extra = list(extra) + [v for v in value if v not in extra]
    if isinstance(extra, dict):
        extra = list(extra.values())
    named = {name: _content(value) for name, value in special.items()}
    return config, {"named": named, "extra": [_content(t) for t in extra], "raw": special}


class _Unsupported(Exception):
    """Why a folder is not read here (the loader then uses AutoTokenizer)."""


def _load(folder: Path) -> tuple[dict, dict, Tokenizer]:
    """tokenizer_config.json, the special tokens and the backend of ``folder``; ``_Unsupported`` says why not."""
    for name in (TOKENIZER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise _Unsupported(f"{folder} has no {name}")
    try:
        config, special = _read(folder)
    except (OSError, ValueError) as err:
        raise _Unsupported(f"{folder}: {err}") from None
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class not in GENERIC_CLASSES:
        raise _Unsupported(f"tokenizer_class {tokenizer_class!r} (only {list(GENERIC_CLASSES)} use tokenizer.json as it is)")
    if config.get("backend", "tokenizers") != "tokenizers":
        raise _Unsupported(f"backend {config.get('backend')!r}")
    if config.get("split_special_tokens"):
        raise _Unsupported("split_special_tokens is set")
    if config.get("post_processor") is not None:
        raise _Unsupported("tokenizer_config.json sets a post_processor")
    try:
        backend = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as err:  # the Rust side raises a plain Exception
        raise _Unsupported(f"{folder / TOKENIZER_FILE}: cannot read the tokenizer: {err}") from None
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > MAX_VOCAB:
        raise _Unsupported(f"a vocabulary of {size} tokens (transformers may patch large vocabularies' pre-tokenizer)")
    added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    for index, token in (config.get("added_tokens_decoder") or {}).items():
        content = token.get("content") if isinstance(token, dict) else token
        if added.get(content) != int(index):
            raise _Unsupported(f"added_tokens_decoder has {content!r} at {index}, tokenizer.json does not")
    for token in [*special["named"].values(), *special["extra"]]:
        if token is not None and backend.token_to_id(token) is None:
            raise _Unsupported(f"special token {token!r} is not in the vocabulary (transformers would add it)")
    return config, special, backend


class TextTokenizer:
    """A ``tokenizer.json`` tokenizer with transformers' ``PreTrainedTokenizerFast`` behaviour (the subset omnivox uses).

    Build with :meth:`from_pretrained`.

    Args:
        backend: the ``tokenizers.Tokenizer`` (as transformers would have set it up).
        special: special token name (``"eos_token"``...) -> its text, or None.
        clean_up_tokenization_spaces: transformers' decode clean-up (not applied to BPE, as transformers,
            unless ``force_clean_up``: its ``..._for_bpe_even_though_it_will_corrupt_output`` setting).
        folder: where it was read from (``save_pretrained`` copies its files).
    """

    def __init__(
        self,
        backend: Tokenizer,
        special: dict[str, str | None],
        clean_up_tokenization_spaces: bool,
        folder: Path,
        force_clean_up: bool = False,
    ) -> None:
        self.backend_tokenizer = backend
        self._special = dict(special)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.force_clean_up = force_clean_up
        self.folder = folder
        self.name_or_path = str(folder)

    # ------------------------------------------------------------------------- loading
    @staticmethod
    def supported(folder: str | Path) -> str | None:
        """None when :meth:`from_pretrained` reproduces ``AutoTokenizer`` on ``folder``, else why not."""
        try:
            _load(Path(folder))
        except _Unsupported as err:
            return str(err)
        return None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TextTokenizer:
        """The tokenizer of ``folder``; ``CheckpointError`` when it is not supported (see :meth:`supported`)."""
        folder = Path(folder)
        try:
            config, special, backend = _load(folder)
        except _Unsupported as err:
            raise CheckpointError(f"{folder}: not supported by the tokenizers-only tokenizer: {err}") from None
        # transformers sets truncation and padding per call; the defaults are none
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False
        # special tokens that are vocabulary entries but not added tokens become added special tokens
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = []
        for token in [*special["raw"].values(), *special["extra"]]:
            text = _content(token)
            if text is None or text in present or text in {m.content for m in missing}:
                continue
            if isinstance(token, dict):
                options = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
                missing.append(AddedToken(text, special=True, **options))
            else:
                missing.append(AddedToken(text, special=True))
        if missing:
            backend.add_special_tokens(missing)
        tokenizer = cls(
            backend,
            special["named"],
            bool(config.get("clean_up_tokenization_spaces", False)),
            folder,
            bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)),
        )
        if backend.post_processor is None:
            # transformers' update_post_processor; add_bos_token / add_eos_token in tokenizer_config.json are
            # dropped by transformers when a tokenizer.json is present, so no BOS / EOS here either
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        return tokenizer

    def save_pretrained(self, folder: str | Path) -> tuple[str, ...]:
        """Copy the tokenizer files into ``folder`` (read back the same by this class and by ``AutoTokenizer``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name in FILES:
            source = self.folder / name
            if source.is_file():
                if source.resolve() != (folder / name).resolve():
                    shutil.copyfile(source, folder / name)
                written.append(str(folder / name))
        return tuple(written)

    # ------------------------------------------------------------------------ the API
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": [...], "attention_mask": [...]}`` for one text."""
        if not isinstance(text, str):
            raise TypeError(f"this tokenizer encodes one string at a time, got {type(text).__name__}")
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self,
        token_ids: int | Sequence[int] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of ``token_ids`` (an int, a list, a 1-D tensor or array); a batch gives a list of texts."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = list(token_ids)
        if token_ids and isinstance(token_ids[0], list | tuple):
            return [self.decode(t, skip_special_tokens, clean_up_tokenization_spaces) for t in token_ids]  # type: ignore[return-value]
        text = self.backend_tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        is_bpe = type(self.backend_tokenizer.model).__name__ == "BPE"
        if clean and (not is_bpe or self.force_clean_up):  # transformers skips it for BPE (it corrupts the text)
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def batch_decode(self, sequences: Sequence[Sequence[int]], **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str] | None) -> int | list[int] | None:
        """Id of a token (``unk_token_id`` when unknown), or ids of a list of tokens."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            index = self.backend_tokenizer.token_to_id(tokens)
            if index is None:
                unk = self._special.get("unk_token")
                return None if unk is None else self.backend_tokenizer.token_to_id(unk)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str] | None:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as transformers."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)  # type: ignore[return-value]

    bos_token = property(lambda self: self._special.get("bos_token"))
    eos_token = property(lambda self: self._special.get("eos_token"))
    unk_token = property(lambda self: self._special.get("unk_token"))
    pad_token = property(lambda self: self._special.get("pad_token"))
    sep_token = property(lambda self: self._special.get("sep_token"))
    cls_token = property(lambda self: self._special.get("cls_token"))
    mask_token = property(lambda self: self._special.get("mask_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    sep_token_id = property(lambda self: self._id("sep_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name_or_path!r}, vocab={len(self)}, special={self._special})"
