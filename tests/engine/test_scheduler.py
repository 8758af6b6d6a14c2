"""Scheduler: chunked prefill, the shared token budget, preemption, admission limits, aborts."""

from __future__ import annotations

import pytest

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.scheduler import Scheduler, SchedulerOutput
from lmserve.types import FinishReason, SamplingParams

EOS = 999


def make_request(request_id: str, num_prompt_tokens: int, max_tokens: int = 8, first: int = 0) -> Request:
    """Distinct token ids per request (offset by `first`) so prefixes never collide by accident."""
    prompt = list(range(first, first + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset({EOS}))


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = False,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len)


def plan(output: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(s.request.request_id, s.num_new_tokens, s.is_sampling) for s in output.scheduled]


def step(scheduler: Scheduler, token: int = 7) -> tuple[list[tuple[str, int, bool]], SchedulerOutput, list[Request]]:
    """schedule() + a fake forward that samples `token` for every sampling request.

    Returns the plan as scheduled (is_sampling must be read before update() advances progress).
    """
    output = scheduler.schedule()
    planned = plan(output)
    sampled = {s.request.request_id: [token] for s in output.scheduled if s.is_sampling}
    received = scheduler.update(output, sampled)
    scheduler.block_manager.check_invariants()
    return planned, output, received


def test_long_prompt_is_prefilled_in_chunks_and_samples_once() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    req = make_request("a", 40)
    scheduler.add_request(req)

    planned, output, received = step(scheduler)
    assert planned == [("a", 16, False)]
    assert output.num_batched_tokens == 16
    assert received == [] and req.num_computed_tokens == 16 and req.num_tokens == 40
    assert req.block_ids == list(range(10))  # blocks for the whole prompt up front

    planned, output, received = step(scheduler)
    assert planned == [("a", 16, False)]
    assert received == [] and req.num_computed_tokens == 32

    planned, output, received = step(scheduler, token=5)
    assert planned == [("a", 8, True)]
    assert received == [req]
    assert req.num_computed_tokens == 40 and req.output_token_ids == [5]

    planned, output, _ = step(scheduler)
    assert planned == [("a", 1, True)]  # decode
    assert req.block_ids == list(range(11))  # token 41 starts block 10


def test_decodes_and_a_prefill_chunk_share_one_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    short = make_request("short", 4, first=0)
    scheduler.add_request(short)
    planned, output, _ = step(scheduler)
    assert planned == [("short", 4, True)]

    long = make_request("long", 30, first=100)
    scheduler.add_request(long)
    planned, output, _ = step(scheduler)
    assert planned == [("short", 1, True), ("long", 15, False)]  # running first, then admitted
    assert output.num_batched_tokens == 16

    planned, output, received = step(scheduler)
    assert planned == [("short", 1, True), ("long", 15, True)]
    assert received == [short, long]


def test_budget_spent_on_running_requests_admits_nothing() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    first, second = make_request("a", 10), make_request("b", 2, first=50)
    scheduler.add_request(first)
    scheduler.add_request(second)
    planned, output, _ = step(scheduler)
    assert planned == [("a", 4, False)]
    assert scheduler.num_waiting == 1 and second.block_ids == []
    planned, output, _ = step(scheduler)
    assert planned == [("a", 4, False)]
    planned, output, _ = step(scheduler)
    assert planned == [("a", 2, True), ("b", 2, True)]


def test_max_num_seqs_caps_the_batch() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    requests = [make_request(f"r{i}", 3, max_tokens=1, first=10 * i) for i in range(3)]
    for req in requests:
        scheduler.add_request(req)
    planned, output, received = step(scheduler)
    assert planned == [("r0", 3, True), ("r1", 3, True)]
    assert received == requests[:2]
    assert all(req.finish_reason == FinishReason.LENGTH for req in requests[:2])
    assert scheduler.num_running == 0 and scheduler.num_waiting == 1
    planned, output, _ = step(scheduler)
    assert planned == [("r2", 3, True)]
    assert not scheduler.has_unfinished
    assert scheduler.block_manager.num_free_blocks == 64


def test_preemption_takes_the_newest_and_recomputes_its_outputs() -> None:
    # 6 blocks of 4; three 7-token prompts take 2 blocks each and fill the pool.
    scheduler = make_scheduler(num_blocks=6)
    a, b, c = (make_request(name, 7, max_tokens=3, first=10 * i) for i, name in enumerate("abc"))
    for req in (a, b, c):
        scheduler.add_request(req)
    planned, output, _ = step(scheduler, token=1)
    assert planned == [("a", 7, True), ("b", 7, True), ("c", 7, True)]
    late = make_request("late", 2, first=90)
    scheduler.add_request(late)

    planned, output, _ = step(scheduler, token=2)  # 8 tokens each still fit in 2 blocks; no room for `late`
    assert planned == [("a", 1, True), ("b", 1, True), ("c", 1, True)]
    assert scheduler.waiting == (late,)

    # Now each has 9 tokens and needs a third block: `a` finds none and preempts `c` (the newest).
    planned, output, received = step(scheduler, token=3)
    assert output.preempted == [c]
    assert planned == [("a", 1, True), ("b", 1, True)]
    assert received == [a, b]  # both reach max_tokens=3 and finish
    assert c.status == RequestStatus.PREEMPTED
    assert (c.num_computed_tokens, c.block_ids, c.num_preemptions) == (0, [], 1)
    assert scheduler.waiting == (c, late)  # at the front, ahead of older waiters
    assert scheduler.num_preemptions_total == 1

    planned, output, received = step(scheduler, token=4)
    assert planned == [("c", 9, True), ("late", 2, True)]  # prompt + its 2 outputs recomputed
    assert c.token_ids == list(range(20, 27)) + [1, 2, 4]
    assert c.status == RequestStatus.FINISHED and c.output_token_ids == [1, 2, 4]
    assert c.num_cached_tokens == 0


def test_preempting_itself_and_no_admission_in_that_step() -> None:
    # 4 blocks of 4. `small` keeps 1 block; `big` (12 tokens, 3 blocks) needs a 4th for token 13.
    scheduler = make_scheduler(num_blocks=4)
    small, big = make_request("small", 3, max_tokens=2), make_request("big", 12, max_tokens=4, first=100)
    scheduler.add_request(small)
    scheduler.add_request(big)
    planned, output, _ = step(scheduler)
    assert planned == [("small", 3, True), ("big", 12, True)]
    tiny = make_request("tiny", 1, max_tokens=1, first=200)
    scheduler.add_request(tiny)

    planned, output, _ = step(scheduler)
    # big is the newest, so it preempts itself; its 3 freed blocks would fit `tiny`, but a step
    # that preempted admits nothing.
    assert output.preempted == [big]
    assert planned == [("small", 1, True)]
    assert small.is_finished
    assert scheduler.waiting == (big, tiny)

    planned, output, _ = step(scheduler)
    assert planned == [("big", 13, True)]  # all 4 blocks: tiny waits for big to finish
    assert scheduler.waiting == (tiny,)


def test_fifo_head_blocks_smaller_requests_behind_it() -> None:
    scheduler = make_scheduler(num_blocks=4)
    holder = make_request("holder", 8, max_tokens=4)
    scheduler.add_request(holder)
    step(scheduler)  # holder: 9 tokens -> 3 blocks after the next append
    head = make_request("head", 8, max_tokens=1, first=100)  # needs 2 blocks
    small = make_request("small", 1, max_tokens=1, first=200)  # needs 1
    scheduler.add_request(head)
    scheduler.add_request(small)
    planned, output, _ = step(scheduler)
    assert planned == [("holder", 1, True)]  # 1 block free: head doesn't fit, small must wait
    assert scheduler.waiting == (head, small)


def test_prefix_cache_hits_shorten_the_prefill() -> None:
    scheduler = make_scheduler(enable_prefix_caching=True)
    first = make_request("a", 10)
    scheduler.add_request(first)
    step(scheduler)
    second = Request("b", list(range(8)) + [50, 51, 52, 53], SamplingParams(max_tokens=4))
    scheduler.add_request(second)
    planned, output, _ = step(scheduler)
    assert planned == [("a", 1, True), ("b", 4, True)]
    assert second.num_cached_tokens == 8
    assert second.block_ids[:2] == first.block_ids[:2]


def test_can_ever_fit_names_the_limit() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=32)
    assert scheduler.can_ever_fit(10, 6) is None
    assert scheduler.can_ever_fit(30, 5) == (
        "prompt (30 tokens) plus max_tokens (5) is 35 tokens, more than the model's context length of 32"
    )
    assert scheduler.can_ever_fit(10, 20) == (
        "prompt (10 tokens) plus max_tokens (20) needs 8 KV blocks, more than the whole pool of 4"
    )
    assert scheduler.max_seq_len == 16  # the pool (4 blocks of 4) holds less than the context
    assert scheduler.can_ever_fit(10, 6) is None and scheduler.can_ever_fit(10, 7) is not None
    assert make_scheduler(num_blocks=64, block_size=4, max_model_len=32).max_seq_len == 32
    with pytest.raises(AssertionError, match="can never fit"):
        scheduler.add_request(make_request("x", 10, max_tokens=20))


def test_finish_request_frees_blocks_wherever_the_request_is() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    running, waiting = make_request("run", 10), make_request("wait", 3, first=50)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    output = scheduler.schedule()
    assert plan(output) == [("run", 10, True)]
    assert scheduler.block_manager.num_free_blocks == 5

    # Aborted between schedule() and update(): update() skips it.
    scheduler.finish_request(running, FinishReason.ABORT)
    assert scheduler.update(output, {"run": [1]}) == []
    assert running.status == RequestStatus.FINISHED and running.finish_reason == FinishReason.ABORT
    assert running.block_ids == [] and running.num_tokens == 10
    assert scheduler.block_manager.num_free_blocks == 8

    scheduler.finish_request(waiting, FinishReason.STOP, "stop string")
    scheduler.finish_request(waiting, FinishReason.ABORT)  # idempotent: the first reason stays
    assert (waiting.finish_reason, waiting.stop_reason) == (FinishReason.STOP, "stop string")
    assert not scheduler.has_unfinished
    assert scheduler.schedule().is_empty
    scheduler.block_manager.check_invariants()


def test_eos_finishes_and_frees_in_update() -> None:
    scheduler = make_scheduler()
    req = make_request("a", 5)
    scheduler.add_request(req)
    planned, output, received = step(scheduler, token=EOS)
    assert received == [req]
    assert req.finish_reason == FinishReason.STOP and req.output_token_ids == [EOS]
    assert scheduler.num_running == 0 and scheduler.block_manager.num_free_blocks == 64


def test_first_scheduled_time_is_set_once() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    req = make_request("a", 10)
    assert req.first_scheduled_time is None
    scheduler.add_request(req)
    step(scheduler)
    first_time = req.first_scheduled_time
    assert first_time is not None and first_time >= req.arrival_time
    step(scheduler)
    step(scheduler)
    assert req.first_scheduled_time == first_time


def test_a_stop_string_found_before_update_ends_the_request_in_it() -> None:
    """The engine matches stop strings on the new token's text before update(), which appends the token
    and ends the request there: blocks freed, nothing left to call back."""
    scheduler = make_scheduler()
    a, b = make_request("a", 5), make_request("b", 5, first=20)
    scheduler.add_request(a)
    scheduler.add_request(b)
    output = scheduler.schedule()
    received = scheduler.update(output, {"a": [7], "b": [8]}, lambda req, _: "\n" if req is b else None)
    assert received == [a, b]
    assert (a.is_finished, b.finish_reason, b.stop_reason, b.output_token_ids) == (False, FinishReason.STOP, "\n", [8])
    assert scheduler.running == (a,) and b.block_ids == []
    scheduler.block_manager.check_invariants()
