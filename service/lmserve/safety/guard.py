"""The streaming output guard: one per choice, fed the text deltas as the engine makes them.

Text is released as soon as nothing can change it any more, and held back only while
- a span pattern's match might still be forming at the end of what has arrived (the `regex` module's
  partial matching, or the pattern's anchor and tail rule, says where; for most patterns that is the
  last word or number, for a private key block everything from BEGIN to its END line), or
- the sentence classifiers (toxicity; injection where on) have not judged it yet. They decide on whole
  segments (up to a sentence boundary, a newline, or MAX_SEGMENT_LEN characters); what differs is what a
  stream holds meanwhile. Under the policy's `stream: hold` each segment is held until it ends. Under
  `stream: word` (the default) the classifiers that block also score the segment so far at every word
  boundary: while that running score is below the threshold, every completed word is released; from the
  word where it crosses, words are held until it falls back below (the next words made it harmless:
  "Dick" became "Dick Van Dyke", "He will die" became "He will die of old age") or the segment ends above
  it, which blocks. So a stream holds only the word being written in ordinary text, and no word from a
  blocking crossing on is ever released.
Every pattern resumes where it left off, so a delta costs work in proportion to the held text, not the
whole output. The released text of a stream equals the whole-text check of its concatenation, however
it was split (tests feed every split point), so a redacted secret never leaks a character.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace

from lmserve.safety.decisions import Decision, GuardStep
from lmserve.safety.scanners import Scanners, apply_redactions
from lmserve.safety.segments import segment_end
from lmserve.safety.spans import Hit, scan, tail_start
from lmserve.safety.unicode import find_hidden

# Released characters kept for the patterns' lookbehinds (the longest, in pii.EMAIL, reads 70).
CONTEXT_LEN = 80
# A word boundary: the end of a run of word characters (the classifier's tokens are words), known once
# the next character has arrived.
_WORD_END = re.compile(r"\w(?=\W)")


class OutputGuard:
    """Not thread-safe: one per choice, used by whichever task streams it."""

    def __init__(self, scanners: Scanners) -> None:
        self._scanners = scanners
        self._buffer = ""  # arrived, stripped, not yet released
        self._context = ""  # the last CONTEXT_LEN released characters, raw
        self._settled = [0] * len(scanners.spans.patterns)  # per pattern: buffer index to resume from
        self._hits: list[Hit] = []  # settled matches in the buffer, not yet released (buffer positions)
        self._judged = 0  # buffer index up to which the sentence classifiers let text out
        self._seg_start = 0  # buffer index where the current segment begins
        self._seg_head = ""  # the current segment's text already released (before the buffer's start)
        self._word_pos = 0  # buffer index from which word boundaries are still to be judged
        self._held_from: int | None = None  # buffer index of the word where a running score crossed
        self._running = scanners.toxicity_model.running()  # the current segment's toxicity, word by word
        self._last_char = ""  # the last character kept, for the ZWJ rule
        self._hasher = hashlib.sha256()  # the raw output so far
        self._fired: set[tuple[str, str]] = set()
        self._is_done = False

    @property
    def is_done(self) -> bool:
        return self._is_done

    @property
    def is_holding(self) -> bool:
        """Whether text fed so far is still held back (not yet released)."""
        return bool(self._buffer)

    def feed(self, delta: str) -> GuardStep:
        """Take the next piece of output; returns what may be released now (or a block)."""
        if self._is_done:
            raise RuntimeError("output guard already finished or blocked")
        return self._step(delta, final=False)

    def finish(self) -> GuardStep:
        """The output has ended: judge and release everything held back."""
        if self._is_done:
            raise RuntimeError("output guard already finished or blocked")
        step = self._step("", final=True)
        self._is_done = True
        return step

    def _step(self, delta: str, final: bool) -> GuardStep:
        scanners = self._scanners
        decisions: list[Decision] = []
        if delta:
            self._hasher.update(delta.encode("utf-8"))
            unicode_action = scanners.actions["unicode"]
            if unicode_action != "off":
                stripped = find_hidden(delta, self._last_char)
                if stripped.kinds:
                    decision = self._decide("unicode", unicode_action, 1.0, stripped.kinds, decisions)
                    if unicode_action == "block":
                        return self._block(decision, decisions)
                    if unicode_action == "strip":
                        delta = stripped.text
            if delta:
                self._last_char = delta[-1]
                self._buffer += delta

        blocked = self._scan_spans(final, decisions)
        if blocked is not None:
            return self._block(blocked, decisions)
        blocked = self._judge_sentences(final, decisions)
        if blocked is not None:
            return self._block(blocked, decisions)
        return GuardStep(self._release(final, decisions), decisions)

    def _scan_spans(self, final: bool, decisions: list[Decision]) -> Decision | None:
        spans = self._scanners.spans
        window = self._context + self._buffer
        offset = len(self._context)
        tails: dict[str, int] = {}
        ids: list[int] | range = range(len(spans.patterns))
        if spans.any_anchor is not None and spans.any_anchor.search(window, offset + min(self._settled)) is None:
            # No pattern's anchor in anything not yet settled: only tails can hold (the usual step).
            for i in spans.anchored_ids:
                self._settled[i] = self._tail_settled(i, window, offset, final, tails)
            ids = spans.unanchored_ids
        for i in ids:
            pattern = spans.patterns[i]
            pos = offset + self._settled[i]
            if not pattern.has_anchor(window, pos):
                # No complete match can start at or after pos; a partial one lies in the tail.
                self._settled[i] = self._tail_settled(i, window, offset, final, tails)
                continue
            result = scan(pattern, window, pos, final)
            self._settled[i] = result.hold_from - offset
            for hit in result.hits:
                kept = self._scanners.kept(hit)
                if kept is None:
                    continue
                kept = _shift(kept, -offset)
                for finding in kept.findings:
                    if self._scanners.action_for(finding) == "block":
                        return self._decide(finding.category, "block", finding.score, (finding.kind,), decisions)
                self._hits.append(kept)
        return None

    def _tail_settled(self, i: int, window: str, offset: int, final: bool, tails: dict[str, int]) -> int:
        """Where pattern i, with no anchor in its unsettled text, is settled to now (a buffer position;
        `tails` caches each tail kind's start for this step). Never earlier than it was: scanning it again
        from inside an earlier match could find that match twice."""
        if final:
            return len(self._buffer)
        tail = self._scanners.spans.patterns[i].tail
        if tail not in tails:
            tails[tail] = tail_start(window, offset, tail) - offset
        return max(self._settled[i], tails[tail])

    def _judge_sentences(self, final: bool, decisions: list[Decision]) -> Decision | None:
        scanners = self._scanners
        if not scanners.has_sentence_judges:
            self._judged = len(self._buffer)
            return None
        while True:
            # The current segment from its start; view position + shift = buffer position.
            view = self._seg_head + self._buffer[self._seg_start :]
            shift = self._seg_start - len(self._seg_head)
            end = segment_end(view, 0, final)
            if scanners.word_blockers:
                limit = len(view) if end is None else end
                for match in _WORD_END.finditer(view, self._word_pos - shift, limit):
                    self._judge_words(view[: match.end()], shift)
                    self._word_pos = match.end() + shift
            if end is None:
                break
            for verdict in scanners.judge(view[:end], scanners.hold_judges + scanners.word_judges):
                decision = self._decide(verdict.category, verdict.action, verdict.score, verdict.kinds, decisions)
                if verdict.action == "block":
                    return decision
            self._seg_start = self._word_pos = end + shift
            self._seg_head = ""
            self._held_from = None
            self._running = scanners.toxicity_model.running()
        if scanners.hold_judges:
            self._judged = self._seg_start
        elif self._held_from is not None:
            self._judged = self._held_from
        else:  # everything up to the word being written
            self._judged = _word_start(self._buffer, len(self._buffer))
        return None

    def _judge_words(self, text: str, shift: int) -> None:
        """The blocking word-mode classifiers over `text`, the current segment up to a word boundary:
        hold from the word where the running score crosses, release when it falls back."""
        if not self._scanners.judge(text, self._scanners.word_blockers, self._running):
            self._held_from = None
        elif self._held_from is None:
            self._held_from = _word_start(text, len(text)) + shift

    def _release(self, final: bool, decisions: list[Decision]) -> str:
        cut = len(self._buffer) if final else min([self._judged, *self._settled])
        moved = True
        while moved:  # never cut through a settled match
            moved = False
            for hit in self._hits:
                if hit.match_start < cut < hit.match_end:
                    cut = hit.match_start
                    moved = True
        if cut <= 0:
            return ""
        released = [hit for hit in self._hits if hit.match_end <= cut]
        self._hits = [_shift(hit, -cut) for hit in self._hits if hit.match_end > cut]
        redactions = []
        for hit in released:
            for finding in hit.findings:
                action = self._scanners.action_for(finding)
                self._decide(finding.category, action, finding.score, (finding.kind,), decisions)
                if action == "redact":
                    redactions.append(finding)
        text = apply_redactions(self._buffer[:cut], redactions)
        self._context = (self._context + self._buffer[:cut])[-CONTEXT_LEN:]
        if cut > self._seg_start:  # the segment's released part, for the word-mode classifiers
            self._seg_head += self._buffer[self._seg_start : cut]
            self._seg_start = cut
        self._buffer = self._buffer[cut:]
        self._settled = [s - cut for s in self._settled]
        self._judged -= cut
        self._seg_start -= cut
        self._word_pos -= cut
        if self._held_from is not None:
            self._held_from -= cut
        return text

    def _decide(
        self, category: str, action: str, score: float, kinds: tuple[str, ...], decisions: list[Decision]
    ) -> Decision:
        decision = Decision("output", category, action, score, kinds, self._hasher.hexdigest())
        if (category, action) not in self._fired:  # one decision per category and action per stream
            self._fired.add((category, action))
            decisions.append(decision)
        return decision

    def _block(self, decision: Decision, decisions: list[Decision]) -> GuardStep:
        self._is_done = True
        self._buffer = ""
        self._hits = []
        return GuardStep("", decisions, decision)


def _word_start(text: str, end: int) -> int:
    """Where the run of word characters that ends at `end` begins (`end` itself when there is none)."""
    start = end
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    return start


def _shift(hit: Hit, by: int) -> Hit:
    return Hit(
        hit.match_start + by,
        hit.match_end + by,
        tuple(replace(f, start=f.start + by, end=f.end + by) for f in hit.findings),
    )
