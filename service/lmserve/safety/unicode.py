"""Invisible and confusable Unicode.

Invisible characters (zero-width spaces and joiners, bidi embeddings, overrides and isolates, tag
characters, variation selectors beyond the emoji ones, soft hyphens, fillers) can hide instructions from
a reader or split a word so other scanners miss it; they are removed (`strip`) before any other scanner
runs. ZWJ and ZWNJ are kept after a non-ASCII character, where emoji sequences and Persian or Indic
scripts need them, and stripped after ASCII, where they only split words.

A confusable is a word that mixes Latin letters with Cyrillic or Greek look-alikes ("pаypal" with a
Cyrillic а); it is flagged (nothing to strip) where the script changes. `fold` maps look-alikes to Latin for
the injection scanner.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import regex

from lmserve.safety.spans import Finding, SpanPattern

CATEGORY = "unicode"
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_TAGS = "\U000e0000-\U000e007f"
_INVISIBLE = (
    "\u00ad\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b\u2060-\u2064\u206a-\u206f\u3164\ufeff\uffa0"
    "\ufff9-\ufffb\U0001d173-\U0001d17a\U000e0100-\U000e01ef"
)
_JOINERS = "\u200c\u200d"
ANY_HIDDEN = re.compile(f"[{_BIDI}{_TAGS}{_INVISIBLE}{_JOINERS}]")  # plain searches: the stdlib is faster
_KINDS = (("bidi", re.compile(f"[{_BIDI}]")), ("tag", re.compile(f"[{_TAGS}]")))

# Where a word switches between Latin and Cyrillic or Greek letters (marks may sit between).
CONFUSABLE = regex.compile(
    r"\p{Latin}\p{M}*[\p{Cyrillic}\p{Greek}]|[\p{Cyrillic}\p{Greek}]\p{M}*\p{Latin}"
)
CONFUSABLE_SCORE = 0.8

# Cyrillic and Greek letters that look like Latin ones (Unicode's confusables, the common part).
_LOOKALIKE_PAIRS = (
    "аa еe оo рp сc уy хx іi јj ѕs ԁd һh ӏl ԛq ԝw "  # Cyrillic lower case
    "АA ВB ЕE КK МM НH ОO РP СC ТT ХX ІI ЈJ ЅS УY "  # Cyrillic upper case
    "αa οo νv ρp τt ιi κk υu εe "  # Greek lower case
    "ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX"  # Greek upper case
)
_LOOKALIKES = str.maketrans({pair[0]: pair[1] for pair in _LOOKALIKE_PAIRS.split()})


@dataclass(frozen=True)
class StripResult:
    text: str
    kinds: tuple[str, ...]  # what was found: bidi, tag, invisible; empty when nothing


def find_hidden(text: str, prev_char: str = "") -> StripResult:
    """`text` without its invisible characters (`prev_char`: the one before `text`, for the ZWJ rule)."""
    if ANY_HIDDEN.search(text) is None:
        return StripResult(text, ())
    kept: list[str] = []
    kinds: set[str] = set()
    last = prev_char
    for ch in text:
        if ANY_HIDDEN.match(ch) is None or (ch in _JOINERS and last and not last.isascii()):
            kept.append(ch)
            last = ch
            continue
        kinds.add(next((kind for kind, pattern in _KINDS if pattern.match(ch)), "invisible"))
    return StripResult("".join(kept), tuple(sorted(kinds)))


def fold(text: str) -> str:
    """Compatibility-normalised (fullwidth, ligatures), invisible characters gone, look-alikes Latin."""
    normal = unicodedata.normalize("NFKC", text)
    if ANY_HIDDEN.search(normal) is not None:
        normal = ANY_HIDDEN.sub("", normal)
    return normal.translate(_LOOKALIKES)


def confusable_patterns() -> list[SpanPattern]:
    def evaluate(match: regex.Match[str]) -> list[Finding]:
        return [Finding(CATEGORY, "confusable", match.start(), match.end(), CONFUSABLE_SCORE)]

    # Any Greek or Cyrillic letter (their blocks; the anchor is searched with the stdlib's `re`).
    anchor = "[\u0370-\u03ff\u1f00-\u1fff\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f]"
    return [SpanPattern(CATEGORY, "confusable", CONFUSABLE, evaluate, anchor=anchor)]
