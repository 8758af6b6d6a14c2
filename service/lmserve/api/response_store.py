"""The in-memory store of the Responses API (`store: true`): a finished response and its conversation,
kept for `GET /v1/responses/{id}`, `DELETE` and a later request's `previous_response_id`.

    store = ResponseStore(max_responses, max_bytes)
    store.put(owner, StoredResponse(...))     # evicts the oldest entries while over either bound
    store.get(owner, response_id)             # None: absent, evicted, or another owner's
    store.delete(owner, response_id)          # True when it was there (and the owner's)

An entry belongs to the API key that created it (`owner`, the key's id; with auth off every caller is one
owner); another key's lookup finds nothing, exactly as for an id that never existed, so ids do not leak
across keys. Both bounds are server-wide, so the store's memory has a ceiling whatever the number of
keys: the oldest entry goes first, whoever owns it. Nothing survives a restart.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class StoredResponse:
    response_id: str
    owner: str
    response: Any  # the ResponseObject as its client got it (api/responses.py)
    messages: tuple[dict[str, Any], ...]  # the conversation so far, the response's output included, as chat messages
    num_bytes: int  # what it holds, measured once (its JSON sizes), for the byte bound


class ResponseStore:
    def __init__(self, max_responses: int, max_bytes: int) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._num_bytes = 0
        # The HTTP and gRPC servers share one loop today; the lock keeps the store right if that changes.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def can_hold(self, num_bytes: int) -> bool:
        return self.max_responses > 0 and num_bytes <= self.max_bytes

    def put(self, entry: StoredResponse) -> None:
        """Keep `entry`, evicting the oldest entries until both bounds hold; one larger than the whole
        byte bound is not kept (the caller asks `can_hold` first)."""
        if not self.can_hold(entry.num_bytes):
            return
        with self._lock:
            old = self._entries.pop(entry.response_id, None)
            if old is not None:
                self._num_bytes -= old.num_bytes
            self._entries[entry.response_id] = entry
            self._num_bytes += entry.num_bytes
            while len(self._entries) > self.max_responses or self._num_bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._num_bytes -= evicted.num_bytes

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        return entry if entry is not None and entry.owner == owner else None

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return False
            del self._entries[response_id]
            self._num_bytes -= entry.num_bytes
            return True


__all__ = ["ResponseStore", "StoredResponse"]
