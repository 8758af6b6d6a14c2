"""The policy's own block lists: terms (whole words, case- and whitespace-insensitive) and patterns."""

from __future__ import annotations

import regex

from lmserve.safety.spans import SpanPattern

CATEGORY = "blocklist"
PLACEHOLDER = "[BLOCKED]"
# A policy pattern may look ahead any distance; holding this much past a match covers sane ones.
_PATTERN_LOOKAHEAD = 32


def term_regex(term: str) -> str:
    words = [regex.escape(word) for word in term.split()]
    # \b only where the term starts or ends with a word character ("c++" has none at its end)
    start = r"(?<!\w)" if regex.match(r"\w", term.strip()) else ""
    end = r"(?!\w)" if regex.search(r"\w$", term.strip()) else ""
    return start + r"\s+".join(words) + end


def blocklist_patterns(terms: tuple[str, ...], patterns: tuple[str, ...]) -> list[SpanPattern]:
    result: list[SpanPattern] = []
    if terms:
        joined = "|".join(term_regex(t) for t in sorted(terms, key=len, reverse=True))  # longest first
        # Every match of a term contains its first word.
        first_words = "|".join(sorted({regex.escape(t.split()[0]) for t in terms}))
        result.append(
            SpanPattern(
                CATEGORY, "term", regex.compile(joined, regex.IGNORECASE), anchor=f"(?i:{first_words})"
            )
        )
    for source in patterns:
        # A policy's own expression has no anchor known here: it is scanned in full every step.
        result.append(
            SpanPattern(CATEGORY, "pattern", regex.compile(source), lookahead=_PATTERN_LOOKAHEAD)
        )
    return result
