"""Prompt lookup: draft tokens for speculative decoding, found in the sequence itself (no draft model).

When the last n tokens of a sequence (prompt and output so far) occurred earlier in it, the tokens that
followed that earlier occurrence are a cheap guess at what comes next; in extractive work (quoting,
editing, summarising with the source's words, code completion) the guess is often right for many tokens.
The engine verifies the guess in one forward (speculative.py), so a wrong guess costs compute, never
correctness.

One index per request, grown as tokens arrive: for each n-gram size, the n-gram ending just before
position j maps to j (the latest j wins), so a lookup is one dict access per size, however long the
sequence. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence


class PromptLookup:
    """Proposes up to k next tokens by matching the sequence's longest recent n-gram (max_n down to min_n)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        assert 1 <= min_n <= max_n
        self.min_n = min_n
        self.max_n = max_n
        # _index[n - min_n]: n-gram -> the position right after its latest occurrence seen so far.
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]
        self._num_indexed = 0  # positions j < _num_indexed are in the index

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's longest matching
        suffix n-gram; [] when no suffix of min_n tokens or more occurred before."""
        num_tokens = len(token_ids)
        if k <= 0 or num_tokens <= self.min_n:
            return []
        # Index every n-gram that ends before the last token (its continuation then exists), so the suffix
        # itself is looked up among strictly earlier occurrences.
        for j in range(max(self._num_indexed, self.min_n), num_tokens):
            for n in range(self.min_n, min(self.max_n, j) + 1):
                self._index[n - self.min_n][tuple(token_ids[j - n : j])] = j
        self._num_indexed = max(self._num_indexed, num_tokens)
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            start = self._index[n - self.min_n].get(tuple(token_ids[num_tokens - n :]))
            if start is not None:
                return list(token_ids[start : start + k])
        return []
