"""Which LoRA adapter sits in which of the model's slots (--max-loras of them): pure Python, for the
scheduler. A running request pins its adapter's slot; a waiting request is admitted only where its adapter
is resident or a slot can be given to it (an unpinned one, least recently used first: an eviction).

    if slots.can_acquire(adapter_id): slot = slots.acquire(adapter_id)   # at admission
    slots.release(slot)                                                   # finished, aborted or preempted
"""

from __future__ import annotations


class LoraSlots:
    def __init__(self, num_slots: int) -> None:
        assert num_slots >= 1
        self.adapter_ids: list[int | None] = [None] * num_slots  # what each slot holds
        self._pins = [0] * num_slots
        self._last_used = [0] * num_slots
        self._clock = 0
        self.num_evictions = 0  # a resident adapter replaced by another

    @property
    def num_resident(self) -> int:
        return sum(a is not None for a in self.adapter_ids)

    def can_acquire(self, adapter_id: int) -> bool:
        return adapter_id in self.adapter_ids or 0 in self._pins

    def acquire(self, adapter_id: int) -> int:
        """Pin a slot holding `adapter_id`, giving it one first if none does (ask can_acquire first)."""
        self._clock += 1
        if adapter_id in self.adapter_ids:
            slot = self.adapter_ids.index(adapter_id)
        else:
            free = [s for s, pins in enumerate(self._pins) if pins == 0]
            assert free, "acquire without can_acquire"
            # An empty slot first, else the one used least recently.
            slot = min(free, key=lambda s: (self.adapter_ids[s] is not None, self._last_used[s]))
            if self.adapter_ids[slot] is not None:
                self.num_evictions += 1
            self.adapter_ids[slot] = adapter_id
        self._pins[slot] += 1
        self._last_used[slot] = self._clock
        return slot

    def release(self, slot: int) -> None:
        assert self._pins[slot] > 0
        self._pins[slot] -= 1
