"""What the kernel benchmarks time and how: SmolLM2-135M's projection shapes, and the median of repeated calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# (out_features, in_features) of one layer's projections, gate and up fused as the model runs them.
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
HEAD = (49152, 576)


def median_time(fn: Callable[[], object], repeats: int = 7) -> float:
    """Seconds per call of `fn`, the median of `repeats` after one untimed call (first-touch, kernel builds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
