"""Where things are in the repository, wherever a benchmark is started from."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOADTESTS_DIR = REPO_ROOT / "loadtests"
# The committed result files the docs' dated tables quote (docs/benchmarks/).
RESULTS_DIR = REPO_ROOT / "docs" / "benchmarks" / "results"
