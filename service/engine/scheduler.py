"""Continuous batching: which requests run this step, and how many tokens each computes.

One token budget per step covers both prefill chunks and decodes (vLLM v1 style), so a long
prompt is prefilled over several steps while running requests keep decoding. Running out of
KV blocks preempts the newest running request; it is recomputed (prompt plus the outputs it
already has) when re-admitted, ahead of every other waiting request.

Pure Python, no torch. The engine drives it:

    output = scheduler.schedule()
    ... forward over output.scheduled, sample one token for each `is_sampling` entry,
        detokenize it and match stop strings ...
    scheduler.update(output, sampled_token_ids, matched_stops)   # appends, ends finished sequences
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from service.engine.block_manager import BlockManager
from service.engine.request import Request, RequestStatus
from service.types import FinishReason


@dataclass
class ScheduledRequest:
    """One request's share of a step: positions [num_computed_tokens, +num_new_tokens) of its tokens."""

    request: Request
    num_new_tokens: int

    @property
    def is_sampling(self) -> bool:
        """After this step every token is computed, so one token gets sampled.

        Read it before `Scheduler.update()`, which advances num_computed_tokens.
        """
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step's batch: running requests first (admission order), then newly admitted ones."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FIFO admission, admission-order decoding, newest-first preemption."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1 and max_model_len >= 1
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order; the last one is preempted first
        self.num_preemptions_total = 0

    # ---- queue state -------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        """A snapshot, for stats and tests."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    # ---- admission control -------------------------------------------------------------

    @property
    def max_seq_len(self) -> int:
        """The most tokens (prompt and output) one sequence can ever hold: the context, or the whole pool."""
        return min(self.max_model_len, self.block_manager.num_blocks * self.block_manager.block_size)

    def can_ever_fit(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """None if a request of this size can be served; else a one-line reason.

        A request that could never get its blocks would sit at the head of the FIFO queue
        forever, so the engine refuses it up front.
        """
        num_total = num_prompt_tokens + max_tokens
        if num_total > self.max_model_len:
            return (
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is {num_total} tokens, "
                f"more than the model's context length of {self.max_model_len}"
            )
        num_blocks_needed = self.block_manager.num_blocks_for(num_total)
        if num_blocks_needed > self.block_manager.num_blocks:
            return (
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {num_blocks_needed} "
                f"KV blocks, more than the whole pool of {self.block_manager.num_blocks}"
            )
        return None

    def add_request(self, req: Request) -> None:
        """Queue a new request (FIFO). The engine has refused those that could never fit (can_ever_fit)."""
        assert req.max_num_tokens <= self.max_seq_len, f"{req} can never fit"
        req.status = RequestStatus.WAITING
        self._waiting.append(req)

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch within the token budget and max_num_seqs."""
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()

        # 1. Running requests, oldest first: a decode token or the next prefill chunk each.
        index = 0
        while index < len(self._running) and budget > 0:
            req = self._running[index]
            is_self_preempted = False
            while not self.block_manager.can_append(req):
                victim = self._running.pop()
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is req:
                    is_self_preempted = True
                    break
            if is_self_preempted:
                break  # it was the newest: nothing after it is left to schedule
            self.block_manager.append(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            assert num_new > 0, f"running {req} has nothing to compute"
            output.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            index += 1

        # 2. Waiting requests, FIFO, unless this step had to preempt (no room to spare then).
        if not output.preempted:
            while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
                req = self._waiting[0]
                if not self.block_manager.can_allocate(req):
                    break  # no skipping ahead: the head would starve behind smaller requests
                self._waiting.popleft()
                self.block_manager.allocate(req)
                req.status = RequestStatus.RUNNING
                self._running.append(req)
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                output.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new

        output.num_batched_tokens = self.max_num_batched_tokens - budget
        return output

    def update(
        self, output: SchedulerOutput, sampled_token_ids: dict[str, int], matched_stops: Mapping[str, str] | None = None
    ) -> list[Request]:
        """Apply a finished forward: advance progress, cache written blocks, append sampled tokens, and end
        the sequences that are done (Request.check_stop; `matched_stops`: the stop string each request's
        new text completed, found by the caller before this call).

        Returns the requests that received a token, in batch order; those that finished have been removed
        and their blocks freed.
        """
        received: list[Request] = []
        for scheduled in output.scheduled:
            req = scheduled.request
            if req.is_finished:
                continue  # aborted between schedule() and update(); its blocks are already freed
            is_sampling = scheduled.is_sampling
            req.num_computed_tokens += scheduled.num_new_tokens
            self.block_manager.cache_computed_blocks(req)
            if not is_sampling:
                continue
            req.append_token(sampled_token_ids[req.request_id])
            req.check_stop(matched_stops.get(req.request_id) if matched_stops else None)
            received.append(req)
            if req.is_finished:
                self._running.remove(req)
                self.block_manager.free(req)
        return received

    def finish_request(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End a request from outside a step (abort, a failed step or grammar). Idempotent."""
        self._remove_from(self._running, req)
        self._remove_from(self._waiting, req)
        self.block_manager.free(req)
        req.finish(reason, stop_reason)

    # ---- internals ---------------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        """Free `req`'s blocks and put it at the head of the waiting queue for recompute."""
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._waiting.appendleft(req)

    @staticmethod
    def _remove_from(queue: list[Request] | deque[Request], req: Request) -> None:
        """Remove by identity (Request has no __eq__, so `in`/`remove` already compare identity)."""
        if req in queue:
            queue.remove(req)
