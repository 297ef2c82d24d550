"""The language guard: text the encoder cannot read is flagged, never scored as a confident answer.

The encoder (all-MiniLM-L6-v2, an English WordPiece vocabulary) turns Chinese, Japanese, Korean, Arabic or Thai
text into `[UNK]`s and single characters and then answers `neutral` at 0.999 for any of it. Two cheap checks,
run on the text and its token ids before the model: the writing system of its letters (a text whose letters are
mostly not Latin is in a language the model was not trained on) and the share of unknown tokens. Neither needs a
model download or a detector library; the script tells the language apart where it matters here (Han,
kana, Hangul, Cyrillic, Arabic, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

Outcome = Literal["scored", "unsupported_language", "unreadable"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("scored", "unsupported_language", "unreadable")

# A text whose letters are at least this share in another script than Latin is not in a language the model reads.
FOREIGN_SCRIPT_SHARE: Final = 0.5
# A text with at least this share of unknown word pieces cannot be read, whatever its script.
UNKNOWN_TOKEN_SHARE: Final = 0.3

# (BCP 47 tag, letters of that script). Kana decides Japanese before Han does: Japanese mixes both.
_SCRIPTS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("ja", re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")),
    ("ko", re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")),
    ("zh", re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")),
    ("und-Cyrl", re.compile(r"[\u0400-\u04ff]")),
    ("und-Arab", re.compile(r"[\u0600-\u06ff\u0750-\u077f]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
    ("und-Deva", re.compile(r"[\u0900-\u097f]")),
)
_LATIN: Final = re.compile(r"[A-Za-z\u00c0-\u024f]")
_WORD: Final = re.compile(r"[a-z']+")
# Words of almost every English sentence; a Latin-script text holding none is left `und-Latn`.
_ENGLISH: Final = frozenset(
    "the a an and or of to in on for with at by from is are was were be been has have had will would can "
    "not no this that it its as up down after before than over says said new more".split()
)


@dataclass(frozen=True)
class Reading:
    """What the guard found: the text's language (BCP 47) and whether the model may score it."""

    language: str
    outcome: Outcome


def language_of(text: str) -> tuple[str, float]:
    """Return the BCP 47 tag of the text's main writing system and the share of its letters outside Latin."""
    if text.isascii():
        words = _WORD.findall(text.lower())
        return ("en" if any(w in _ENGLISH for w in words) else "und-Latn"), 0.0
    latin = len(_LATIN.findall(text))
    counts = [(len(pattern.findall(text)), tag) for tag, pattern in _SCRIPTS]
    foreign = sum(n for n, _ in counts)
    letters = latin + foreign
    if letters == 0:
        return "und", 0.0
    share = foreign / letters
    if share >= FOREIGN_SCRIPT_SHARE:
        # Japanese text is mostly Han with some kana: any kana at all makes it Japanese.
        kana = counts[0][0]
        tag = "ja" if kana else max(counts)[1]
        return tag, share
    words = _WORD.findall(text.lower())
    return ("en" if any(w in _ENGLISH for w in words) else "und-Latn"), share


def read(text: str, token_ids: Sequence[int], unknown_id: int | None, special_ids: frozenset[int]) -> Reading:
    """Decide whether the model may score `text`, from the text and its token ids (with special tokens)."""
    language, foreign = language_of(text)
    if foreign >= FOREIGN_SCRIPT_SHARE:
        return Reading(language, "unsupported_language")
    pieces = [t for t in token_ids if t not in special_ids]
    if pieces and unknown_id is not None:
        unknown = sum(1 for t in pieces if t == unknown_id)
        if unknown / len(pieces) >= UNKNOWN_TOKEN_SHARE:
            return Reading(language, "unreadable")
    return Reading(language, "scored")
