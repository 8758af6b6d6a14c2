"""Span patterns: a regular expression plus what a complete match of it means, scanned so that a stream
can ask where a match might still be forming.

Scanning uses the `regex` module's partial matching: in a text that is not final, a match that runs into
the end of the text (or whose lookahead reaches it, or which a longer alternative could still replace)
might still grow or change, so everything from its start is held back; everything before the earliest
such start is settled and will never change.

Partial matching is slow (it turns off the engine's literal search: 2-50 us per pattern even on a few
words), so each built-in pattern also has an `anchor`, a cheap expression found in every complete match
of it, and a `tail` rule: with no anchor in the text, there is no complete match, and any partial one
lies within the text's tail (the trailing run of non-space characters, or of number characters). Most
text has no anchor for most patterns, so a stream's step usually costs one fast search per pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import regex


@dataclass(frozen=True)
class Finding:
    """Something a scanner found: a category's kind (e.g. pii/email) over text[start:end]."""

    category: str
    kind: str
    start: int
    end: int
    score: float  # 0..1; counts when at least the category's threshold


@dataclass(frozen=True)
class Hit:
    """A complete match and what it found. The match span (what must not be cut) may be wider than the
    findings' spans (what is redacted), e.g. the key name in `password = "..."`."""

    match_start: int
    match_end: int
    findings: tuple[Finding, ...]


# Evaluates a complete match; returns its findings (positions in the scanned string), possibly none
# (a number failing Luhn).
Evaluate = Callable[[regex.Match[str]], list[Finding]]

WORD_TAIL = "word"  # a partial match without the anchor has no whitespace
NUMBER_TAIL = "number"  # ... consists of digits, spaces and . ( ) + -
_NUMBER_CHARS = frozenset("0123456789 .()+-")
_NUMBER_STARTS = frozenset("0123456789(+")


class SpanPattern:
    """One pattern.

    `lookahead`: how many characters past a match its lookarounds may read, so a match that ends closer
    than that to the end of a growing text is not yet settled.
    `anchor`: an expression that occurs inside every complete match, and `tail`: where a partial match
    can lie when the anchor does not occur (see the module docstring). No anchor: always scan in full.
    `may_grow`: a complete match in a growing text is settled only when the rest of the text cannot
    begin a match at its start. Partial matching returns a complete match when there is one, even where
    a path the engine prefers (a longer greedy repeat: "415 555 2671  " may yet run on into more digits;
    an earlier alternative: "project nightingale|project") was cut short by the end of the text. Turn it
    off only for a pattern whose lazy repeat (`.*?`) can always absorb more text and which has no such
    paths (the private key block).
    """

    def __init__(
        self,
        category: str,
        kind: str,
        pattern: regex.Pattern[str],
        evaluate: Evaluate | None = None,
        lookahead: int = 2,
        anchor: str | None = None,
        tail: str = WORD_TAIL,
        may_grow: bool = True,
    ) -> None:
        self.category = category
        self.kind = kind
        self.pattern = pattern
        self.lookahead = lookahead
        self.anchor_source = anchor
        self.anchor = re.compile(anchor) if anchor is not None else None  # plain searches: the stdlib is faster
        self.tail = tail
        self.may_grow = may_grow
        self._evaluate = evaluate

    def evaluate(self, match: regex.Match[str]) -> list[Finding]:
        if self._evaluate is not None:
            return self._evaluate(match)
        return [Finding(self.category, self.kind, match.start(), match.end(), 1.0)]

    def has_anchor(self, text: str, pos: int) -> bool:
        return self.anchor is None or self.anchor.search(text, pos) is not None


@dataclass(frozen=True)
class ScanResult:
    hits: list[Hit]  # settled matches with at least one finding, in order
    hold_from: int  # where a match might still be forming (len(text) when nowhere)


def scan(pattern: SpanPattern, text: str, pos: int = 0, final: bool = True) -> ScanResult:
    """The settled matches of `pattern` in `text` starting at or after `pos` (characters before `pos`
    are visible to lookbehinds only). With `final`, the text is complete and everything settles."""
    hits: list[Hit] = []
    end = len(text)
    if final:
        for match in pattern.pattern.finditer(text, pos):
            _add(hits, pattern, match)
        return ScanResult(hits, end)
    for match in pattern.pattern.finditer(text, pos, partial=True):
        unsettled = match.partial or match.end() + pattern.lookahead > end
        if unsettled or (pattern.may_grow and _may_grow(pattern, text, match)):
            return ScanResult(hits, min(match.start(), end))
        _add(hits, pattern, match)
    return ScanResult(hits, end)


def _may_grow(pattern: SpanPattern, text: str, match: regex.Match[str]) -> bool:
    """Whether everything from `match`'s start to the end of `text` could still begin a match: then a
    preferred alternative that needs more text may replace this complete match, which partial matching
    does not report (it returns a complete match when there is one). Over-cautious for a lazy repeat
    (`.*?`), which can always absorb more text: such a match would settle only at the end of the stream."""
    return pattern.pattern.fullmatch(text, match.start(), partial=True) is not None


def tail_start(text: str, pos: int, tail: str) -> int:
    """The start (at least `pos`) of the trailing run of characters a partial match of a `tail` kind
    may consist of."""
    i = len(text)
    if tail == NUMBER_TAIL:
        while i > pos and text[i - 1] in _NUMBER_CHARS:
            i -= 1
        while i < len(text) and text[i] not in _NUMBER_STARTS:  # a number-like match starts with these
            i += 1
    else:
        while i > pos and not text[i - 1].isspace():
            i -= 1
    return i


class SpanSet:
    """A direction's span patterns, and one expression that finds any of their anchors, so a text (or a
    stream's new text) with none costs one search in all."""

    def __init__(self, patterns: list[SpanPattern]) -> None:
        self.patterns = patterns
        self.anchored_ids = [i for i, p in enumerate(patterns) if p.anchor is not None]
        self.unanchored_ids = [i for i, p in enumerate(patterns) if p.anchor is None]
        sources = [f"(?:{patterns[i].anchor_source})" for i in self.anchored_ids]
        self.any_anchor = re.compile("|".join(sources)) if sources else None

    def find_all(self, text: str) -> list[Hit]:
        """Every match of every pattern in a whole text (in pattern order)."""
        if self.any_anchor is not None and self.any_anchor.search(text) is None:
            candidates = [self.patterns[i] for i in self.unanchored_ids]
        else:
            candidates = self.patterns
        hits: list[Hit] = []
        for pattern in candidates:
            if pattern.has_anchor(text, 0):
                hits += scan(pattern, text).hits
        return hits


def _add(hits: list[Hit], pattern: SpanPattern, match: regex.Match[str]) -> None:
    findings = pattern.evaluate(match)
    if findings:
        hits.append(Hit(match.start(), match.end(), tuple(findings)))
