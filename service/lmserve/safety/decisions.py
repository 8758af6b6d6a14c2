"""What the filter tells its caller: decisions, and the verdicts and steps that carry them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    """One thing the filter decided about one text (an input text, or one choice's output).

    There is one decision per (category, action) per input text, and per output stream the first time
    that category and action happen in it. `text_sha256` is the sha256 of the text judged (for output:
    the output so far, raw, when the decision was made), so audit lines can be correlated without
    keeping the text.
    """

    direction: str  # input | output
    category: str  # one of policy.CATEGORIES
    action: str  # block | redact | strip | flag
    score: float  # the highest score that led to it, 0..1
    kinds: tuple[str, ...]  # what was found, e.g. ("email", "phone"); for the classifiers, the rule kinds
    text_sha256: str


@dataclass(frozen=True)
class InputVerdict:
    """The result of checking a request's input texts."""

    texts: list[str]  # what the model should see: one per input, redacted and stripped per the policy
    decisions: list[Decision]  # every decision, all texts (count and audit each)
    blocked: Decision | None = None  # the first blocking decision: refuse the request (400 content_filter)

    @property
    def is_blocked(self) -> bool:
        return self.blocked is not None


@dataclass(frozen=True)
class GuardStep:
    """What an output guard says after a delta (or at the end)."""

    text: str  # safe to release to the client now, in order after earlier steps' text ("" is normal)
    decisions: list[Decision] = field(default_factory=list)  # decisions made in this step
    blocked: Decision | None = None  # set: stop, abort the request, finish with "content_filter"


@dataclass(frozen=True)
class ModerationResult:
    """One input's result in OpenAI's moderation shape."""

    flagged: bool
    categories: dict[str, bool]  # every category: did a scanner find it at or above the threshold
    category_scores: dict[str, float]  # every category: the highest score found (0 when nothing)

    def to_dict(self) -> dict[str, object]:
        return {"flagged": self.flagged, "categories": self.categories, "category_scores": self.category_scores}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
