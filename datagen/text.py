"""Text for synthetic speech: cleaned fortune quotes, templated sentences, TTS normalisation.

Every sentence has two forms: the *written* form (what a transcript should say, digits and
all) and the *spoken* form handed to the TTS engine (numbers, times, money and common
abbreviations spelled out). The main source is Debian's ``fortunes*`` packages
(``/usr/share/games/fortunes``); when they are absent a small built-in list is used and a
warning is logged. Templated sentences with slots (colour, number, name, day, ...) supplement
the quotes and carry their slot values, so questions about the content have known answers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORTUNE_DIR = Path("/usr/share/games/fortunes")

# Files left out: ASCII art, non-English, and the topics most likely to carry offensive
# jokes (Debian ships the explicitly offensive set in a separate ``off/`` folder, never read).
EXCLUDED_FORTUNE_FILES = frozenset(
    {"art", "ascii-art", "translate-me", "ethnic", "men-women", "drugs", "politics", "debian",
     "linux", "linuxcookie", "perl", "definitions", "riddles", "knghtbrd", "disclaimer"}
)

# A quote containing any of these (as a whole word, case-insensitive) is dropped.
_BLOCKED_WORDS = frozenset(
    {"sex", "sexual", "sexy", "damn", "damned", "hell", "god", "gods", "jesus", "christ", "bible",
     "church", "kill", "killed", "killing", "murder", "rape", "drunk", "whore", "bitch", "bastard",
     "ass", "shit", "fuck", "fucking", "crap", "nigger", "gay", "jew", "jews", "negro", "penis",
     "breast", "breasts", "naked", "nude", "suicide", "dead", "death", "die", "dies", "gun",
     "guns", "nazi", "hitler", "homosexual", "lesbian", "virgin", "prostitute", "bomb", "drug",
     "drugs", "cocaine", "marijuana", "beer", "whiskey", "wife", "wives", "husband", "women",
     "woman", "girl", "girls"}
)

MIN_WORDS = 3
MAX_WORDS = 25


@dataclass(frozen=True)
class Sentence:
    """One sentence to speak.

    ``written``: the transcript form; ``spoken``: the form given to the TTS engine;
    ``source``: ``fortune``, ``builtin`` or ``template:<name>``; ``slots``: the values a
    template filled in (``{"colour": "red", ...}``), empty for quotes.
    """

    written: str
    spoken: str
    source: str
    slots: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Splitting by hash: stable across seeds, so every run holds out the same sentences.

SPLIT_SALT = "omnivox-datagen-v1"


def split_fraction(key: str, salt: str = SPLIT_SALT) -> float:
    """A stable number in [0, 1) for ``key``; the basis of every held-out list."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def text_key(written: str) -> str:
    """The text a split hash is taken over: lower-cased words only, so punctuation or
    spacing variants of one sentence cannot land in two splits."""
    return " ".join(re.findall(r"[a-z0-9']+", written.lower()))


def sentence_split(written: str, held_out: float) -> str:
    """``train``, ``validation`` or ``test`` for a sentence; ``held_out`` is the fraction
    of sentences kept for each of validation and test."""
    u = split_fraction("text:" + text_key(written))
    if u < held_out:
        return "test"
    if u < 2 * held_out:
        return "validation"
    return "train"


# --------------------------------------------------------------------------------------
# Fortunes

_ATTRIBUTION = re.compile(r"^\s*(--|- |\u2014)")
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'!?\-$%&]+$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _quote_body(block: str) -> str | None:
    """The quote without its attribution line, joined to one line; None for dialogues,
    verse, lists and other layouts that do not read as prose."""
    lines = [ln for ln in block.splitlines() if ln.strip()]
    body: list[str] = []
    for ln in lines:
        if _ATTRIBUTION.match(ln) or ln.startswith("\t\t"):
            break  # attribution or trailing source
        if re.match(r"^\s*(Q:|A:|\(\d+\)|\d+\.|\*|#)", ln):
            return None
        body.append(ln.strip())
    if not body:
        return None
    text = " ".join(body)
    text = text.replace("--", ",").replace('"', "").replace("`", "'")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return text


def _acceptable(text: str) -> bool:
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not text.isascii() or not _ALLOWED.match(text):
        return False
    if not text[0].isupper() or text[-1] not in ".!?":
        return False
    letters = [c for c in text if c.isalpha()]
    if sum(c.isupper() for c in letters) > 0.3 * len(letters):
        return False  # shouting or acronym soup
    if words[-1] in _ABBREVIATIONS:
        return False
    lower = {re.sub(r"'s$", "", w.strip(".,;:!?'").lower()) for w in words}
    if lower & _BLOCKED_WORDS:
        return False
    if re.search(r"\d+[:)](\s|$)", text):  # numbered lists and dialogue labels ("4: ...")
        return False
    if any(len(w) > 18 for w in words):
        return False
    return True


def _split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, not splitting after abbreviations such as ``Mr.`` or ``J.``."""
    pieces: list[str] = []
    for piece in _SENTENCE_END.split(text):
        last = pieces[-1].split()[-1] if pieces else ""
        if pieces and (last in _ABBREVIATIONS or re.fullmatch(r"[A-Z]\.|[A-Z][a-z]?\.", last)):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return pieces


def clean_quotes(blocks: Iterable[str]) -> list[str]:
    """Turn raw fortune blocks into sentences of 3-25 words: a short quote whole, a longer
    one as its individual sentences of five words or more."""
    out: list[str] = []
    for block in blocks:
        text = _quote_body(block)
        if text is None:
            continue
        if len(text.split()) <= MAX_WORDS and _acceptable(text):
            out.append(text)
            continue
        for sent in _split_sentences(text):
            if len(sent.split()) >= 5 and _acceptable(sent):
                out.append(sent)
    return out


def load_fortunes(folder: Path = FORTUNE_DIR) -> list[str]:
    """Cleaned, de-duplicated, sorted sentences from a fortune folder ([] when absent).

    Only plain files directly in ``folder`` are read (never ``off/``), skipping
    ``EXCLUDED_FORTUNE_FILES`` and the ``.dat``/``.u8`` companions.
    """
    if not folder.is_dir():
        return []
    sentences: set[str] = set()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix or path.name in EXCLUDED_FORTUNE_FILES:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        sentences.update(clean_quotes(re.split(r"^%\s*$", raw, flags=re.MULTILINE)))
    seen: set[str] = set()
    unique: list[str] = []
    for s in sorted(sentences):
        key = text_key(s)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


# Built-in fallback when no fortune files are installed; plain everyday sentences.
BUILTIN_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Please close the window before you leave the room.",
    "The train to the city leaves every twenty minutes.",
    "She planted tomatoes and beans in the garden last spring.",
    "Could you pass me the salt and the pepper?",
    "The library opens at nine in the morning.",
    "A cold wind blew across the empty beach.",
    "He forgot his umbrella and got soaked on the way home.",
    "We watched the sun go down behind the hills.",
    "The children built a castle out of sand.",
    "My phone battery is almost empty again.",
    "The soup needs a little more salt.",
    "Turn left at the bakery and walk two blocks.",
    "The meeting has been moved to Thursday afternoon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The old bridge was closed for repairs.",
    "I would like a cup of tea with milk, please.",
    "The cat slept on the warm windowsill all afternoon.",
    "Our flight was delayed because of heavy fog.",
    "The museum has a new exhibition about ancient maps.",
    "Remember to water the plants while I am away.",
    "The bus was full, so we decided to walk.",
    "He plays the piano every evening after dinner.",
    "The river rose quickly after three days of rain.",
    "A good book can make a long journey feel short.",
    "The shop on the corner sells fresh bread every morning.",
    "Please speak a little louder, I cannot hear you.",
    "The mountains were covered in fresh snow.",
    "She writes a letter to her grandmother every week.",
    "The printer on the second floor is out of paper.",
    "We need to buy eggs, flour and butter for the cake.",
    "The stars were bright over the quiet village.",
    "Every morning he runs along the river path.",
    "The new road will open at the end of the year.",
    "They painted the kitchen a pale shade of yellow.",
    "The doctor told him to rest for a few days.",
    "A small boat drifted slowly across the lake.",
    "The concert was cancelled because of the storm.",
    "Knowledge is a treasure that follows its owner everywhere.",
    "Patience is bitter, but its fruit is sweet.",
    "Actions speak louder than words.",
    "The early bird catches the worm.",
    "Every cloud has a silver lining.",
    "Practice makes perfect, but nobody is perfect.",
    "A journey of a thousand miles begins with a single step.",
    "Do not count your chickens before they hatch.",
    "Curiosity is the engine of learning.",
    "The best time to plant a tree was twenty years ago.",
    "Simplicity is the ultimate sophistication.",
    "Well begun is half done.",
    "The clock in the hall stopped at midnight.",
    "He keeps his bicycle in the shed behind the house.",
    "The market is busiest on Saturday mornings.",
    "Please leave your shoes by the front door.",
    "The lights in the stadium flickered and went out.",
    "We found an old photograph inside the drawer.",
    "The students listened carefully to the lecture.",
    "Fresh paint smells strong for several days.",
    "The farmer counted his sheep before sunset.",
    "A gentle breeze moved the curtains.",
    "The kettle whistled loudly in the kitchen.",
    "Our neighbours are building a new fence.",
    "The road to the coast winds through green valleys.",
    "She borrowed three books from the library.",
    "The baby laughed at the funny noise.",
    "The hotel room had a view of the harbour.",
    "He fixed the broken chair with some glue.",
    "The orchestra tuned their instruments before the show.",
    "It is usually quiet here on Sunday evenings.",
    "The package should arrive within five working days.",
    "Mix the flour with the milk until it is smooth.",
    "The scientist recorded the results in her notebook.",
    "Snow fell softly on the rooftops all night.",
    "The ferry crosses the bay twice a day.",
    "He whistled a cheerful tune while he worked.",
    "The dog waited patiently by the gate.",
    "Our team won the match in the final minute.",
    "The garden smells wonderful after the rain.",
    "Please switch off the lights when you go out.",
    "The bakery ran out of croissants by ten o'clock.",
)


# --------------------------------------------------------------------------------------
# Normalisation for TTS

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                      "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """Cardinal English words for 0 <= n < 10**9 (``342`` -> ``three hundred forty-two``)."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + (" " + number_to_words(rest) if rest else "")
    for size, name in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            big, rest = divmod(n, size)
            return number_to_words(big) + " " + name + (" " + number_to_words(rest) if rest else "")
    raise AssertionError(n)


def ordinal_to_words(n: int) -> str:
    """``21`` -> ``twenty-first``."""
    words = number_to_words(n)
    head, sep, last = words.rpartition("-") if "-" in words.split()[-1] else words.rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last = last + "th"
    return head + sep + last


def year_to_words(n: int) -> str:
    """``1999`` -> ``nineteen ninety-nine``, ``2005`` -> ``two thousand five``."""
    if 2000 <= n < 2010 or n % 1000 == 0:
        return number_to_words(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return number_to_words(hi) + " hundred"
    return number_to_words(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else number_to_words(lo))


_ABBREVIATIONS = {"Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "St.": "Saint",
                  "Prof.": "Professor", "etc.": "et cetera", "e.g.": "for example", "i.e.": "that is",
                  "vs.": "versus", "No.": "number", "Jr.": "Junior", "Sr.": "Senior"}


def _time_words(m: re.Match[str]) -> str:
    hour, minute = int(m.group(1)), int(m.group(2))
    suffix = {"am": " a m", "pm": " p m"}.get((m.group(3) or "").replace(".", "").lower(), "")
    if minute == 0:
        return number_to_words(hour) + (suffix or " o'clock")
    mins = ("oh " + _ONES[minute]) if minute < 10 else number_to_words(minute)
    return f"{number_to_words(hour)} {mins}{suffix}"


def _money_words(m: re.Match[str]) -> str:
    dollars = int(m.group(1).replace(",", ""))
    cents = int(m.group(2)) if m.group(2) else 0
    out = number_to_words(dollars) + (" dollar" if dollars == 1 else " dollars")
    if cents:
        out += " and " + number_to_words(cents) + (" cent" if cents == 1 else " cents")
    return out


def normalise_for_tts(written: str) -> str:
    """The spoken form of ``written``: abbreviations, times, money, percentages, ordinals,
    years and other numbers spelled out; ``&`` -> ``and``. Idempotent on plain words."""
    text = written
    for abbr, full in _ABBREVIATIONS.items():
        text = re.sub(r"(?<![A-Za-z])" + re.escape(abbr), full, text)
    text = text.replace("&", " and ")
    text = re.sub(r"\b(\d{1,2}):(\d{2})(?:\s*([ap]\.m\.|[ap]m\b))?", _time_words, text, flags=re.IGNORECASE)
    text = re.sub(r"\$(\d[\d,]*)(?:\.(\d{2}))?", _money_words, text)
    text = re.sub(r"(\d+(?:\.\d+)?)%", lambda m: m.group(1) + " percent", text)
    text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal_to_words(int(m.group(1))), text)
    text = re.sub(r"\b(1[1-9]\d\d|20\d\d)\b", lambda m: year_to_words(int(m.group(1))), text)
    text = re.sub(r"\b(\d+)\.(\d+)\b",
                  lambda m: number_to_words(int(m.group(1))) + " point " + " ".join(_ONES[int(d)] for d in m.group(2)),
                  text)
    text = re.sub(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\b",
                  lambda m: number_to_words(int(m.group(0).replace(",", ""))) if len(m.group(0)) <= 11
                  else " ".join(_ONES[int(d)] for d in m.group(0) if d.isdigit()),
                  text)
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------------
# Templates: sentences with slot values, for questions about the spoken content.

NAMES = ("Alice", "Ben", "Clara", "Daniel", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jack", "Kofi",
         "Lena", "Marco", "Nina", "Oscar", "Priya", "Quentin", "Rosa", "Samuel", "Tara", "Umar", "Vera",
         "William", "Yuki", "Zoe", "Aaron", "Bella", "Carlos", "Diana", "Ethan", "Fiona", "George",
         "Hannah", "Ivan", "Julia", "Kevin", "Laura", "Martin", "Olivia", "Peter", "Ruth", "Simon",
         "Thomas", "Ursula", "Victor", "Wendy", "Xavier", "Yasmin", "Adam", "Chloe")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown",
           "grey", "silver", "gold", "violet", "turquoise")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
CITIES = ("London", "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Dublin", "Vienna", "Oslo",
          "Cairo", "Tokyo", "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Mumbai", "Nairobi",
          "Lima", "Seoul", "Prague", "Athens", "Helsinki", "Glasgow", "Bristol")
OBJECTS = ("apples", "books", "chairs", "candles", "tickets", "pencils", "oranges", "cups", "plates",
           "balloons", "letters", "shirts", "bottles", "boxes", "keys", "cookies", "lamps", "flowers")
ANIMALS = ("dog", "cat", "horse", "rabbit", "parrot", "goat", "duck", "fox", "owl", "turtle", "hamster")
VEHICLES = ("car", "bicycle", "van", "boat", "scooter", "truck", "motorbike")
ROOMS = ("kitchen", "garden", "office", "bedroom", "garage", "hallway", "library", "basement")


@dataclass(frozen=True)
class Template:
    """A sentence pattern; ``{slot}`` names index the slot tables in ``SLOT_VALUES``."""

    name: str
    pattern: str
    kind: str  # statement | question | command


SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "name": NAMES, "name2": NAMES, "colour": COLOURS, "day": DAYS, "month": MONTHS, "city": CITIES,
    "object": OBJECTS, "animal": ANIMALS, "vehicle": VEHICLES, "room": ROOMS,
}

TEMPLATES: tuple[Template, ...] = (
    Template("buy", "{name} bought {number} {object} at the market on {day}.", "statement"),
    Template("car", "{name} drives a {colour} {vehicle} to work every morning.", "statement"),
    Template("meet", "Let's meet in {city} at {time} on {day}.", "command"),
    Template("birthday", "{name}'s birthday is on the {ordinal} of {month}.", "statement"),
    Template("pet", "My {animal} is called {name} and it loves the {room}.", "statement"),
    Template("paint", "Please paint the {room} door {colour} before {day}.", "command"),
    Template("trip", "{name} flew to {city} in {month} {year} with {number} friends.", "statement"),
    Template("price", "The {colour} {vehicle} costs ${price}.", "statement"),
    Template("call", "Can you call {name} at {time} and ask about the {object}?", "question"),
    Template("favourite", "My favourite colour is {colour} and I live in {city}.", "statement"),
    Template("room", "There are {number} {object} in the {room}.", "statement"),
    Template("ask", "Did {name} leave the {colour} {object} in {city}?", "question"),
    Template("bring", "Bring {number} {object} to the {room} by {time}.", "command"),
    Template("met", "{name} met {name2} in {city} last {day}.", "statement"),
    Template("train", "The train to {city} leaves at {time} from platform {number}.", "statement"),
    Template("percent", "About {percent}% of the {object} in the {room} are {colour}.", "statement"),
    Template("where", "Where did {name} put the {number} {object}?", "question"),
    Template("feed", "Feed the {animal} at {time} and then lock the {room}.", "command"),
)


def _fill_slot(slot: str, rng: np.random.Generator, filled: dict[str, str]) -> str:
    if slot in SLOT_VALUES:
        values = [v for v in SLOT_VALUES[slot] if v not in filled.values()]
        return str(values[rng.integers(len(values))])
    if slot == "number":
        return str(int(rng.integers(2, 21)))
    if slot == "ordinal":
        n = int(rng.integers(1, 29))
        return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
    if slot == "year":
        return str(int(rng.integers(1950, 2031)))
    if slot == "time":
        hour, minute = int(rng.integers(1, 13)), int(rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50]))
        return f"{hour}:{minute:02d} {'am' if rng.random() < 0.5 else 'pm'}"
    if slot == "price":
        return f"{int(rng.integers(5, 5000)):,}"
    if slot == "percent":
        return str(int(rng.integers(5, 96)))
    raise KeyError(f"unknown template slot {slot!r}")


def fill_template(template: Template, rng: np.random.Generator) -> Sentence:
    """A ``Sentence`` from ``template`` with random slot values, recorded in ``slots``."""
    slots: dict[str, str] = {}
    for slot in re.findall(r"\{(\w+)\}", template.pattern):
        if slot not in slots:
            slots[slot] = _fill_slot(slot, rng, slots)
    written = template.pattern.format(**slots)
    written = written[0].upper() + written[1:]
    return Sentence(written, normalise_for_tts(written), f"template:{template.name}", slots)


# --------------------------------------------------------------------------------------
# The corpus handed to the generator


@dataclass(frozen=True)
class TextCorpus:
    """Sentences per split (held out by hash) plus the templates for content questions.

    ``held_out``: the fraction of sentences in each of validation and test;
    ``source``: where the quotes came from (``fortunes:<dir>``, ``builtin`` or ``injected``).
    """

    by_split: dict[str, tuple[str, ...]]
    held_out: float
    source: str

    @classmethod
    def build(cls, sentences: Sequence[str], held_out: float, source: str) -> TextCorpus:
        by_split: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
        for s in sentences:
            by_split[sentence_split(s, held_out)].append(s)
        for split, items in by_split.items():
            if not items:
                raise ValueError(f"text corpus ({source}, {len(sentences)} sentences) left split {split!r} "
                                 f"empty at held_out={held_out}; give more sentences")
        return cls({k: tuple(v) for k, v in by_split.items()}, held_out, source)

    def sentence(self, split: str, rng: np.random.Generator) -> Sentence:
        """A random quote from ``split`` (written and spoken forms)."""
        pool = self.by_split[split]
        written = pool[int(rng.integers(len(pool)))]
        return Sentence(written, normalise_for_tts(written), "builtin" if self.source == "builtin" else "quote")

    def templated(self, split: str, rng: np.random.Generator, template: Template | None = None) -> Sentence:
        """A templated sentence whose text hashes into ``split`` (rejection-sampled)."""
        for _ in range(2000):
            tpl = template or TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            sent = fill_template(tpl, rng)
            if sentence_split(sent.written, self.held_out) == split:
                return sent
        raise AssertionError(f"no templated sentence hashed into {split!r} in 2000 tries")


def load_corpus(fortune_dir: Path | None, held_out: float, sentences: Sequence[str] | None = None) -> TextCorpus:
    """The text corpus: ``sentences`` when given, else fortunes from ``fortune_dir``, else the
    built-in list (with a warning)."""
    if sentences is not None:
        return TextCorpus.build(list(sentences), held_out, "injected")
    quotes = load_fortunes(fortune_dir) if fortune_dir is not None else []
    if quotes:
        log.info("loaded %d sentences from %s", len(quotes), fortune_dir)
        return TextCorpus.build(quotes, held_out, f"fortunes:{fortune_dir}")
    log.warning("no fortune files found at %s (apt-get install fortunes fortunes-min); "
                "falling back to %d built-in sentences", fortune_dir, len(BUILTIN_SENTENCES))
    return TextCorpus.build(list(BUILTIN_SENTENCES), held_out, "builtin")
