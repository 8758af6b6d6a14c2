"""Sentence-sized segments, the unit the sentence classifiers (toxicity, injection on output) judge.

A segment ends after sentence punctuation followed by whitespace, after a newline, or, when neither
comes within MAX_SEGMENT_LEN characters, at the last space before that (so a stream never holds more
than that much for a classifier). The rule reads only the segment's own text and the one character after
it, so a stream and a whole text are cut at the same places.
"""

from __future__ import annotations

import regex

MAX_SEGMENT_LEN = 400
_BOUNDARY = regex.compile(r"[.!?…。！？]+[\"'”’)\]]*\s|\n")


def segment_end(text: str, start: int, final: bool) -> int | None:
    """Where the segment starting at `start` ends, or None while a growing `text` cannot tell yet."""
    if start >= len(text):
        return None
    limit = start + MAX_SEGMENT_LEN
    match = _BOUNDARY.search(text, start, min(limit, len(text)))
    if match is not None:
        return match.end()
    if len(text) >= limit:
        space = text.rfind(" ", start, limit)
        return space + 1 if space > start else limit
    return len(text) if final else None


def split_segments(text: str) -> list[str]:
    """A whole text cut into its segments (what a stream of it would classify)."""
    pieces: list[str] = []
    start = 0
    while (end := segment_end(text, start, True)) is not None:
        pieces.append(text[start:end])
        start = end
    return pieces
