"""The toxicity classifier on the labelled evaluation (toxicity_eval.py): clean texts dense in words that
look profane out of context, and toxic ones, in a development half and a held-back half. The figures are
in docs/benchmarks/safety.md ("Toxicity, evaluated apart from its rules"); `python -m
tests.safety.test_toxicity_eval` prints them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmserve.safety import SafetyFilter
from tests.safety.toxicity_eval import DEV_CLEAN, DEV_TOXIC, HELDOUT_CLEAN, HELDOUT_TOXIC

# The words the issue named as false alarms, each in a sentence.
ISSUE_WORDS = (
    "Moby Dick is a whale.", "Please summarize the plot of Moby Dick.", "Dick Van Dyke can dance.",
    "We drove to Scunthorpe.", "Sussex is in England.", "I'd like a cocktail.", "Sign it, John Hancock.",
    "My therapist helped a lot.", "I play Assassin's Creed.", "Kill the process.", "Execute the order.",
    "Book a breast cancer screening.", "Shoot the photo at dusk.",
)


@dataclass(frozen=True)
class HalfScore:
    num_clean: int
    num_toxic: int
    clean_blocked: int
    toxic_blocked: int

    @property
    def precision(self) -> float:
        blocked = self.clean_blocked + self.toxic_blocked
        return self.toxic_blocked / blocked if blocked else 1.0

    @property
    def recall(self) -> float:
        return self.toxic_blocked / self.num_toxic


def score_half(safety: SafetyFilter, clean: tuple[str, ...], toxic: tuple[str, ...]) -> HalfScore:
    def blocked(text: str) -> bool:
        return safety.check_output(text).blocked is not None

    return HalfScore(len(clean), len(toxic), sum(map(blocked, clean)), sum(map(blocked, toxic)))


def test_the_set_is_large_enough() -> None:
    assert len(DEV_CLEAN) + len(HELDOUT_CLEAN) >= 300 and len(DEV_TOXIC) + len(HELDOUT_TOXIC) >= 150
    assert len(set(DEV_CLEAN + DEV_TOXIC + HELDOUT_CLEAN + HELDOUT_TOXIC)) == (
        len(DEV_CLEAN) + len(DEV_TOXIC) + len(HELDOUT_CLEAN) + len(HELDOUT_TOXIC)
    )


@pytest.mark.parametrize("text", ISSUE_WORDS)
def test_the_issue_s_false_alarms_pass_at_the_default_threshold(default_filter: SafetyFilter, text: str) -> None:
    whole = default_filter.check_output(text)
    assert whole.blocked is None and whole.text == text
    moderated = default_filter.moderate([text])[0]
    assert not moderated.categories["toxicity"], moderated


@pytest.mark.parametrize(
    ("name", "clean", "toxic"),
    [
        ("development", DEV_CLEAN, DEV_TOXIC),
        # Looked at once (2026-12-07, docs/benchmarks/safety.md): 2 of 230 clean texts blocked, recall
        # 0.644. The half is spent: rules tuned after that look do not count, and meeting the bar needs a
        # fresh held-back half written apart from the rules. Strict, so a pass here is noticed.
        pytest.param(
            "held-back", HELDOUT_CLEAN, HELDOUT_TOXIC,
            marks=pytest.mark.xfail(strict=True, reason="held-back recall 0.644 < 0.9 at its one look (issue 30)"),
        ),
    ],
)
def test_no_clean_text_blocked_and_recall_at_least_0_9(
    default_filter: SafetyFilter, name: str, clean: tuple[str, ...], toxic: tuple[str, ...]
) -> None:
    result = score_half(default_filter, clean, toxic)
    assert result.clean_blocked == 0, [t for t in clean if default_filter.check_output(t).blocked]
    assert result.recall >= 0.9, [t for t in toxic if not default_filter.check_output(t).blocked]


def main() -> None:
    safety = SafetyFilter.from_policy(None)
    print(f"{'half':<12} {'clean':>5} {'toxic':>5} {'clean blocked':>13} {'precision':>9} {'recall':>6}")
    for name, clean, toxic in (("development", DEV_CLEAN, DEV_TOXIC), ("held-back", HELDOUT_CLEAN, HELDOUT_TOXIC)):
        r = score_half(safety, clean, toxic)
        print(f"{name:<12} {r.num_clean:>5} {r.num_toxic:>5} {r.clean_blocked:>13} {r.precision:>9.3f} {r.recall:>6.3f}")


if __name__ == "__main__":
    main()
