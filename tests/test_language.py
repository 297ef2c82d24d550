"""The language guard: scripts the English encoder cannot read, and texts of mostly unknown word pieces."""

from __future__ import annotations

import pytest

from learner.language import language_of, read

UNK, SPECIAL = 100, frozenset({101, 102, 0})


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Oil falls as the OPEC deal stalls", "en"),
        ("$TSLA 420 🚀🚀", "und-Latn"),
        ("沪深两市成交额突破万亿元", "zh"),
        ("日経平均株価が大幅続落", "ja"),
        ("코스피 2% 급락", "ko"),
        ("Рубль упал к доллару", "und-Cyrl"),
        ("Société Générale relève ses prévisions pour the year", "en"),
    ],
)
def test_language_of_reads_the_writing_system(text: str, language: str) -> None:
    assert language_of(text)[0] == language


def test_foreign_script_is_unsupported_and_mostly_unknown_pieces_unreadable() -> None:
    assert read("央行宣布降准", [101, 100, 100, 102], UNK, SPECIAL).outcome == "unsupported_language"
    # Latin letters but nothing the vocabulary knows: 3 of 4 pieces unknown.
    assert read("ꜰᴏᴏ ʙᴀʀ", [101, 100, 100, 100, 2054, 102], UNK, SPECIAL).outcome == "unreadable"
    assert read("Fed holds rates", [101, 2054, 2055, 2056, 102], UNK, SPECIAL).outcome == "scored"
    # A few Chinese characters in an English headline do not make it Chinese.
    assert (
        read("Alibaba (阿里巴巴) beats estimates", [101, 2054, 2056, 2057, 100, 2055, 102], UNK, SPECIAL).outcome
        == "scored"
    )
