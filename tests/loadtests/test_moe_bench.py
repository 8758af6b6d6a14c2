"""benchmarks/moe_bench.py run whole at a tiny size, so the benchmark behind docs/benchmarks/families.md's mixture-of-experts
figures keeps working: the three checkpoints, their engines, the ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.cli_process import REPO_ROOT, cli_env


def test_moe_bench_runs_every_model_and_prints_the_ratios(smollm2_dir: Path, cache_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/moe_bench.py", "--concurrency", "2", "--num-requests", "2", "--input-len", "8",
         "--output-len", "4", "--hidden", "64", "--layers", "1", "--heads", "4", "--experts", "4", "--expert-size", "32",
         "--dtype", "float32"],
        cwd=REPO_ROOT, env=cli_env({"LMSERVE_CACHE_DIR": str(cache_dir)}), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    families = re.findall(r"^(dense llama|mixtral|qwen3-moe)\s+(\S+ \(native\)).*?([\d.]+) tok/s", result.stdout, re.M)
    assert [(name, family) for name, family, _ in families] == [
        ("dense llama", "llama (native)"), ("mixtral", "mixtral (native)"), ("qwen3-moe", "qwen3_moe (native)")
    ]
    assert all(float(rate) > 0 for *_, rate in families)
    assert re.search(r"^mixtral / dense llama at concurrency 2: [\d.]+x$", result.stdout, re.M)
    assert re.search(r"^qwen3-moe / dense llama at concurrency 2: [\d.]+x$", result.stdout, re.M)
