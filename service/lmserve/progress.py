"""One progress line per slow start-up step, so a first run is never a silent minute.

    with progress_step("converting x.gguf to safetensors (once per file)"):
        ...  # GGUF conversion, LoRA merge, kernel build, weight loading

The line is written when the step starts, on the `lmserve.progress` logger at INFO: that is when a
user watching a quiet terminal needs to know what the wait is for. When it ends, the time it took goes
to DEBUG. Steps that are skipped (a cache hit) write nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

PROGRESS_LOGGER = "lmserve.progress"

log = logging.getLogger(PROGRESS_LOGGER)


@contextmanager
def progress_step(message: str) -> Iterator[None]:
    log.info(message)
    started = time.monotonic()
    yield
    log.debug("%s: done in %.1f s", message, time.monotonic() - started)


def size_text(num_bytes: int) -> str:
    """1536 -> '1.5 KiB'; for progress lines and listings."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


__all__ = ["PROGRESS_LOGGER", "progress_step", "size_text"]
