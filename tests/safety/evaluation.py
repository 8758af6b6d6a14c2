"""Runs the labelled set through a filter: what each example got, and precision and recall per category."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.safety import CATEGORIES, Decision, SafetyFilter
from tests.safety.labelled_set import EXAMPLES, Example


@dataclass(frozen=True)
class Outcome:
    example: Example
    found: frozenset[str]  # categories with any decision
    blocked: str | None  # the blocking category, if any
    released: str | None  # output examples: the text released to the client


@dataclass(frozen=True)
class CategoryScore:
    category: str
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        expected = self.true_positives + self.false_negatives
        return self.true_positives / expected if expected else 1.0


def run_example(safety: SafetyFilter, example: Example) -> Outcome:
    decisions: list[Decision] = []
    blocked: Decision | None = None
    released: str | None = None
    if example.direction == "input":
        verdict = safety.check_input([example.text])
        decisions, blocked = verdict.decisions, verdict.blocked
    else:
        guard = safety.output_guard()
        pieces: list[str] = []
        for chunk in example.chunks or (example.text,):
            step = guard.feed(chunk)
            pieces.append(step.text)
            decisions += step.decisions
            if step.blocked is not None:
                blocked = step.blocked
                break
        if blocked is None:
            step = guard.finish()
            pieces.append(step.text)
            decisions += step.decisions
            blocked = step.blocked
        released = "".join(pieces)
    return Outcome(
        example, frozenset(d.category for d in decisions), blocked.category if blocked else None, released
    )


def evaluate(safety: SafetyFilter) -> list[Outcome]:
    return [run_example(safety, example) for example in EXAMPLES]


def score(outcomes: list[Outcome]) -> list[CategoryScore]:
    scores = []
    for category in CATEGORIES:
        tp = sum(category in o.found and category in o.example.expected for o in outcomes)
        fp = sum(category in o.found and category not in o.example.expected for o in outcomes)
        fn = sum(category not in o.found and category in o.example.expected for o in outcomes)
        scores.append(CategoryScore(category, tp, fp, fn))
    return scores
