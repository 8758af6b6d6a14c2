"""Process-wide settings of a serving process, in one place: what they change is shared by every thread and
library in the process (torch's and OpenMP's threads, glibc's allocator, Python's garbage collector), so
nothing else sets them. Applied in two named steps at fixed times, because their timing matters:

- `set_thread_count`, before loading: loading (conversion, packing the weights) already runs on torch's
  threads, and a container's CPU limit is not what torch sees (it counts the node's cores).
- `prepare_to_serve`, after loading and before the engine thread's first step (NativeEngine.start;
  benchmarks/profile_step.py): the tuning that the step loop needs and that must not see the loading.

The environment variables that libraries read at import (Hugging Face's offline mode and progress bars,
vLLM's usage report) are set by the CLI, the edge, before anything imports them (service/lmserve/cli.py).
"""

from __future__ import annotations

import ctypes
import gc

import torch


def set_thread_count(num_threads: int | None) -> None:
    """torch's intra-op threads (EngineConfig.num_threads); None leaves torch's default, every core."""
    if num_threads:
        torch.set_num_threads(num_threads)


def release_openmp_pool() -> None:
    """Let go of the calling thread's OpenMP worker threads (omp_pause_resource_all, OpenMP 5), so that
    the next thread to open a parallel region gets a pool of its own at full speed. A no-op where the
    runtime lacks it."""
    try:
        ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(1)  # omp_pause_soft
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> None:
    """glibc malloc: serve blocks up to 32 MiB from the heap, and keep up to 256 MiB of freed heap rather
    than hand it back to the system. Each decode step frees and reallocates the same large buffers
    (logits in bf16 and float32, the sampler's probabilities and their cumulative sums); by default each
    comes from a fresh mmap, and its first-touch page faults cost more than the arithmetic on it
    (sampling 16 rows: 21 -> 2 ms a step, benchmarks/profile_step.py). A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum on 64-bit)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def prepare_to_serve() -> None:
    """Once, after loading and before the engine thread's first step (NativeEngine.start; profile_step)."""
    # Loading ran on this thread and left it an OpenMP thread pool; while that pool exists, every parallel
    # region the engine thread opens costs 2-4x more (libgomp, measured with benchmarks/profile_step.py
    # --thread). Release it: the engine thread then owns the only pool.
    release_openmp_pool()
    keep_freed_memory()
    # Everything loaded so far lives as long as the process: keep the cyclic GC from rescanning it each
    # time the engine's per-step garbage triggers a collection (~3% of a step otherwise).
    gc.freeze()
