"""Precision and recall of the safety filter per category on the labelled set (tests/safety/labelled_set.py).

    .venv/bin/python benchmarks/safety_eval.py [--policy tests/safety/eval_policy.yaml] [--show-errors]

Each input example goes through `check_input`, each output example through an output guard (in its
chunks, when it has them); a category counts as found when the filter made any decision in it (block,
redact, strip or flag). Also prints how many clean examples were blocked (the issue requires none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchkit.repo import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the labelled set and its scoring live in tests/safety

from lmserve.safety import SafetyFilter  # noqa: E402
from tests.safety.evaluation import evaluate, score  # noqa: E402
from tests.safety.labelled_set import EVAL_POLICY, EXAMPLES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=EVAL_POLICY)
    parser.add_argument("--show-errors", action="store_true", help="list every example the filter got wrong")
    args = parser.parse_args()

    started = time.perf_counter()
    safety = SafetyFilter.from_policy(args.policy)
    outcomes = evaluate(safety)
    elapsed = time.perf_counter() - started

    num_clean = sum(e.is_clean for e in EXAMPLES)
    print(f"{len(EXAMPLES)} examples ({len(EXAMPLES) - num_clean} harmful, {num_clean} clean), policy {args.policy}")
    print(f"{'category':<10} {'harmful':>7} {'TP':>4} {'FP':>4} {'FN':>4} {'precision':>9} {'recall':>7}")
    for s in score(outcomes):
        expected = s.true_positives + s.false_negatives
        print(
            f"{s.category:<10} {expected:>7} {s.true_positives:>4} {s.false_positives:>4} {s.false_negatives:>4}"
            f" {s.precision:>9.3f} {s.recall:>7.3f}"
        )
    blocked_clean = [o for o in outcomes if o.example.is_clean and o.blocked]
    print(f"clean examples blocked: {len(blocked_clean)} of {num_clean}")
    wrong = [o for o in outcomes if o.found != o.example.expected]
    print(f"examples with any wrong category: {len(wrong)}  (filter load + evaluation {elapsed:.1f} s)")
    if args.show_errors:
        for o in wrong:
            print(f"  expected {sorted(o.example.expected)} found {sorted(o.found)}: {o.example.text[:80]!r}")


if __name__ == "__main__":
    main()
