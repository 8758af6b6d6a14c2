"""Continuous batching: which requests run this step, and how many tokens each computes.

One token budget per step covers both prefill chunks and decodes (vLLM v1 style), so a long
prompt is prefilled over several steps while running requests keep decoding. Running out of
KV blocks preempts the newest running request; it is recomputed (prompt plus the outputs it
already has) when re-admitted, ahead of every other waiting request.

Pure Python, no torch. The engine drives it:

    output = scheduler.schedule()
    ... forward over output.scheduled, sample one token for each `is_sampling` entry (or, where it
        carries draft tokens, verify them: speculative.py) ...
    scheduler.update(output, sampled_token_ids, take)   # appends, ends finished sequences

Speculative decoding (prompt lookup): a decoding request whose `lookup` proposes draft tokens computes
them in the same step as its last token, like a short prefill chunk; the step's logits at every drafted
position decide how many are kept. Their KV slots are reserved up front (never by preempting anyone);
a rejected draft's KV is simply overwritten by the next step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.lora_slots import LoraSlots
from lmserve.engine.request import Request, RequestStatus
from lmserve.types import FinishReason


@dataclass
class ScheduledRequest:
    """One request's share of a step: positions [num_computed_tokens, +num_new_tokens) of its tokens."""

    request: Request
    num_new_tokens: int  # the draft tokens included
    # Speculative tokens computed after the request's last token this step (positions num_tokens, ...).
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def is_sampling(self) -> bool:
        """After this step every token is computed, so one token gets sampled (plus one per draft).

        Read it before `Scheduler.update()`, which advances num_computed_tokens.
        """
        computed = self.request.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids)
        return computed == self.request.num_tokens

    @property
    def num_logit_rows(self) -> int:
        """Rows of logits this entry needs: its last token's, and each draft's when it has drafts."""
        return 1 + len(self.draft_token_ids) if self.is_sampling else 0


# Called by Scheduler.update for each token just before it is appended; returns the stop string the
# token's text completes (the engine's detokenizer), which ends the request there.
TakeToken = Callable[[Request, int], "str | None"]


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
        lora_slots: LoraSlots | None = None,
    ) -> None:
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1 and max_model_len >= 1
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # With LoRA adapters: a request is admitted only with its adapter in a slot, pinned until it leaves.
        self.lora_slots = lora_slots
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order; the last one is preempted first
        self.num_preemptions_total = 0
        self.num_draft_tokens_total = 0  # speculative tokens verified
        self.num_accepted_tokens_total = 0  # of those, accepted

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
            drafts = self._propose(req, budget) if req.lookup is not None else []
            output.scheduled.append(ScheduledRequest(req, num_new + len(drafts), drafts))
            budget -= num_new + len(drafts)
            index += 1

        # 2. Waiting requests, FIFO, unless this step had to preempt (no room to spare then).
        if not output.preempted:
            while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
                req = self._waiting[0]
                if not self.block_manager.can_allocate(req):
                    break  # no skipping ahead: the head would starve behind smaller requests
                if req.lora is not None:
                    assert self.lora_slots is not None, "a LoRA request on a scheduler without slots"
                    if not self.lora_slots.can_acquire(req.lora.id):
                        break  # every slot is pinned by running requests of other adapters
                    req.lora_slot = self.lora_slots.acquire(req.lora.id)
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
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]], take: TakeToken | None = None
    ) -> list[Request]:
        """Apply a finished forward: advance progress, cache written blocks, append each sampling request's
        tokens and end the sequences that are done (Request.check_stop, after every token; `take(request,
        token)` is called just before each append and returns the stop string the token completes).

        A request that verified drafts gets its accepted drafts and then the token after them (all but the
        last of its tokens must be its first drafts); every other sampling request gets one token. Tokens
        after the one that ends a sequence are dropped.

        Returns the requests that received tokens, in batch order; those that finished have been removed
        and their blocks freed.
        """
        received: list[Request] = []
        for scheduled in output.scheduled:
            req = scheduled.request
            if req.is_finished:
                continue  # aborted between schedule() and update(); its blocks are already freed
            is_sampling = scheduled.is_sampling
            drafts = scheduled.draft_token_ids
            req.num_computed_tokens += scheduled.num_new_tokens - len(drafts)
            self.block_manager.cache_computed_blocks(req)
            self.block_manager.release_outside_window(req)
            if not is_sampling:
                continue
            tokens = sampled_token_ids[req.request_id]
            num_accepted = len(tokens) - 1
            assert 0 <= num_accepted <= len(drafts) and list(tokens[:num_accepted]) == drafts[:num_accepted]
            for token_id in tokens:
                matched_stop = take(req, token_id) if take is not None else None
                req.append_token(token_id)
                req.check_stop(matched_stop)
                if req.is_finished:
                    break
            if drafts:
                self.num_draft_tokens_total += len(drafts)
                self.num_accepted_tokens_total += num_accepted
            received.append(req)
            if req.is_finished:
                self._running.remove(req)
                self._free(req)
            elif num_accepted:
                req.num_computed_tokens += num_accepted  # the accepted drafts' KV was written this step
                self.block_manager.cache_computed_blocks(req)
                self.block_manager.release_outside_window(req)
        return received

    def finish_request(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End a request from outside a step (abort, a failed step or grammar). Idempotent."""
        self._remove_from(self._running, req)
        self._remove_from(self._waiting, req)
        self._free(req)
        req.finish(reason, stop_reason)

    # ---- internals ---------------------------------------------------------------------

    def _propose(self, req: Request, budget: int) -> list[int]:
        """Draft tokens for a decoding request, within the step's budget and the KV blocks free now (a
        speculation never preempts anyone); [] when it has none."""
        if req.num_tokens - req.num_computed_tokens != 1:
            return []  # still prefilling
        k = min(req.max_drafts(), budget - 1, self.max_model_len - req.num_tokens)
        if k <= 0:
            return []
        assert req.lookup is not None
        drafts = req.lookup.propose(req.token_ids, k)
        if not drafts or not self.block_manager.can_append(req, len(drafts)):
            return []
        self.block_manager.append(req, len(drafts))
        return drafts

    def _preempt(self, req: Request) -> None:
        """Free `req`'s blocks and put it at the head of the waiting queue for recompute."""
        self._free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        """Its KV blocks and its adapter slot, if it holds them."""
        self.block_manager.free(req)
        if req.lora_slot >= 0:
            assert self.lora_slots is not None
            self.lora_slots.release(req.lora_slot)
            req.lora_slot = -1

    @staticmethod
    def _remove_from(queue: list[Request] | deque[Request], req: Request) -> None:
        """Remove by identity (Request has no __eq__, so `in`/`remove` already compare identity)."""
        if req in queue:
            queue.remove(req)
