"""Span patterns: a regular expression plus what a complete match of it means, scanned so that a stream
can ask where a match might still be forming.

Scanning uses the `regex` module's partial matching: in a text that is not final, a match that runs into
the end of the text (or whose lookahead reaches it) might still grow or change, so everything from its
start is held back; everything before the earliest such start is settled and will never change.
"""

from __future__ import annotations

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


class SpanPattern:
    """One pattern. `lookahead` is how many characters past a match its lookarounds may read, so a
    match that ends closer than that to the end of a growing text is not yet settled."""

    def __init__(
        self, category: str, kind: str, pattern: regex.Pattern[str], evaluate: Evaluate | None = None,
        lookahead: int = 2,
    ) -> None:
        self.category = category
        self.kind = kind
        self.pattern = pattern
        self.lookahead = lookahead
        self._evaluate = evaluate

    def evaluate(self, match: regex.Match[str]) -> list[Finding]:
        if self._evaluate is not None:
            return self._evaluate(match)
        return [Finding(self.category, self.kind, match.start(), match.end(), 1.0)]


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
        if match.partial or match.end() + pattern.lookahead > end:
            return ScanResult(hits, min(match.start(), end))
        _add(hits, pattern, match)
    return ScanResult(hits, end)


def _add(hits: list[Hit], pattern: SpanPattern, match: regex.Match[str]) -> None:
    findings = pattern.evaluate(match)
    if findings:
        hits.append(Hit(match.start(), match.end(), tuple(findings)))
