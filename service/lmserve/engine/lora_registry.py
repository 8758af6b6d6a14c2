"""The LoRA adapters a server knows by name (--lora-modules, and /v1/load_lora_adapter at run time), and
the host-memory copies of their factors: at most `max_cpu_loras` kept, least recently used dropped (read
from the folder again when next needed).

Thread-safe: the API adds and removes adapters from the event loop (the reading on a worker thread), the
engine thread asks for weights when it puts an adapter in a slot.

    adapter = registry.add("sql", Path("/adapters/sql"))    # read and checked now: CheckpointError if bad
    registry.get("sql")                                      # the LoraAdapter a request carries
    registry.weights(adapter)                                # its factors (the engine thread, slot loads)
    registry.remove("sql")                                   # requests already holding it still finish
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.lora_adapter import LoraAdapterWeights, read_lora_adapter


@dataclass(eq=False)
class LoraAdapter:
    """One loaded adapter. `id` is unique per load, so a reloaded adapter never shares KV or a slot with
    what it replaced."""

    id: int
    name: str
    path: Path
    rank: int
    num_bytes: int
    created: int  # Unix seconds it was loaded


class LoraRegistry:
    def __init__(self, max_cpu_loras: int, max_rank: int, check: Callable[[LoraAdapterWeights], None]) -> None:
        assert max_cpu_loras >= 1
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self._check = check  # ValueError unless the factors fit the base model
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._by_name: dict[str, LoraAdapter] = {}
        self._host: OrderedDict[int, LoraAdapterWeights] = OrderedDict()  # by adapter id, least recent first
        self.num_loads = 0  # adapters read from their folders (registrations and re-reads after eviction)

    def read(self, path: Path) -> LoraAdapterWeights:
        """Read and check an adapter folder against the base (CheckpointError, one line). No lock: slow I/O."""
        weights = read_lora_adapter(path, self.max_rank)
        try:
            self._check(weights)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return weights

    def add(self, name: str, path: Path) -> LoraAdapter:
        """Register `name` (ValueError if taken), reading `path` first (CheckpointError if bad)."""
        weights = self.read(path)
        with self._lock:
            if name in self._by_name:
                raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
            adapter = LoraAdapter(next(self._ids), name, Path(path), weights.rank, weights.num_bytes, int(time.time()))
            self._by_name[name] = adapter
            self.num_loads += 1
            self._keep(adapter.id, weights)
        return adapter

    def remove(self, name: str) -> LoraAdapter | None:
        """Forget `name`; requests holding the adapter finish with it (its host copy goes when evicted)."""
        with self._lock:
            return self._by_name.pop(name, None)

    def get(self, name: str) -> LoraAdapter | None:
        with self._lock:
            return self._by_name.get(name)

    def adapters(self) -> list[LoraAdapter]:
        with self._lock:
            return list(self._by_name.values())

    def weights(self, adapter: LoraAdapter) -> LoraAdapterWeights:
        """The adapter's factors, from host memory or read again from its folder."""
        with self._lock:
            weights = self._host.get(adapter.id)
            if weights is not None:
                self._host.move_to_end(adapter.id)
                return weights
        weights = self.read(adapter.path)
        with self._lock:
            self.num_loads += 1
            self._keep(adapter.id, weights)
        return weights

    @property
    def num_host_copies(self) -> int:
        with self._lock:
            return len(self._host)

    def _keep(self, adapter_id: int, weights: LoraAdapterWeights) -> None:
        self._host[adapter_id] = weights
        self._host.move_to_end(adapter_id)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
