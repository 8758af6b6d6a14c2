"""The labelled set under eval_policy.yaml: no clean example blocked, recall >= 0.95 on PII, secrets and
injection, and the redacted output of harmful output examples free of what was redacted."""

from __future__ import annotations

import pytest

from lmserve.safety import SafetyFilter
from tests.safety.evaluation import evaluate, score
from tests.safety.labelled_set import EXAMPLES, Example


def test_the_set_is_large_and_covers_every_category() -> None:
    assert len(EXAMPLES) >= 80
    for category in ("injection", "secrets", "pii", "toxicity", "unicode", "blocklist"):
        assert sum(category in e.expected for e in EXAMPLES) >= 3, category
    assert sum(e.is_clean for e in EXAMPLES) >= 40
    assert sum(e.chunks is not None for e in EXAMPLES) >= 5


def test_no_clean_example_is_blocked(eval_filter: SafetyFilter) -> None:
    blocked = [(o.example.text, o.blocked) for o in evaluate(eval_filter) if o.example.is_clean and o.blocked]
    assert blocked == []


def test_recall_on_pii_secrets_and_injection(eval_filter: SafetyFilter) -> None:
    scores = {s.category: s for s in score(evaluate(eval_filter))}
    for category in ("pii", "secrets", "injection"):
        assert scores[category].recall >= 0.95, (category, scores[category])


def test_precision_per_category(eval_filter: SafetyFilter) -> None:
    # Not required by the issue; guards against a scanner that starts firing on clean text.
    for category_score in score(evaluate(eval_filter)):
        assert category_score.precision >= 0.9, category_score


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.direction == "output" and e.expected & {"pii", "secrets"}], ids=lambda e: e.text[:40])
def test_redacted_output_keeps_nothing_it_redacted(eval_filter: SafetyFilter, example: Example) -> None:
    from tests.safety.evaluation import run_example

    outcome = run_example(eval_filter, example)
    assert outcome.blocked is None
    assert outcome.released is not None
    assert any(p in outcome.released for p in ("[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[SSN]", "[IP]", "[SECRET]"))
    for finding in eval_filter._output.find_spans(example.text):
        assert example.text[finding.start : finding.end] not in outcome.released
