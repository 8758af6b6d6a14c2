"""Random workloads against Scheduler + BlockManager, checked against a model of the KV memory.

Prompts come from a 2-letter alphabet so prefixes collide often and the prefix cache is
exercised hard. A fake model runner writes, for every computed position, the token prefix
that position's KV depends on; every running request must then read back exactly its own
prefixes, which catches wrong reuse, writes into shared blocks and premature registration.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.scheduler import Scheduler
from lmserve.types import FinishReason, SamplingParams

PROMPT_ALPHABET = (1, 2)
EOS = 3
SAMPLE_ALPHABET = (1, 2, 1, 2, 1, 2, EOS)  # EOS rare enough that decodes grow into new blocks
MAX_PROMPT_TOKENS = 10  # longest shared prefix (6) + longest tail (4)
MAX_OUTPUT_TOKENS = 8
MAX_MODEL_LEN = 24
MAX_DRAIN_STEPS = 2_000


@dataclass(frozen=True)
class Config:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """A pool that fits the largest request with only a few blocks to spare: preemption is common."""
    block_size = draw(st.integers(1, 4))
    num_blocks_largest = -(-(MAX_PROMPT_TOKENS + MAX_OUTPUT_TOKENS) // block_size)
    return Config(
        num_blocks=num_blocks_largest + draw(st.integers(0, 3)),
        block_size=block_size,
        max_num_seqs=draw(st.integers(1, 5)),
        max_num_batched_tokens=draw(st.integers(1, 24)),
        enable_prefix_caching=draw(st.booleans()),
    )


# Shared "system prompts" plus a short random tail: most submissions share some prefix.
SHARED_PREFIXES = ((), (1, 2, 1, 2), (2, 2, 1, 1, 2, 1), (1, 2, 1, 2, 2, 2))
prompts = st.builds(
    lambda prefix, tail: list(prefix) + tail,
    st.sampled_from(SHARED_PREFIXES),
    st.lists(st.sampled_from(PROMPT_ALPHABET), min_size=1, max_size=4),
)
submits = st.tuples(st.just("submit"), prompts, st.integers(1, MAX_OUTPUT_TOKENS))
steps = st.tuples(st.just("step"), st.lists(st.sampled_from(SAMPLE_ALPHABET), min_size=4, max_size=4))
finishes = st.tuples(st.sampled_from(("abort", "stop_string")), st.integers(0, 7))
# Weighted by repetition: submits and steps outnumber aborts, so requests live long enough to
# decode into new blocks and fight over the pool.
operations = st.one_of(submits, submits, steps, steps, steps, steps, finishes)


class Harness:
    """Scheduler + block manager + a fake KV memory, with every invariant checked after each op."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bm = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, config.max_num_seqs, config.max_num_batched_tokens, MAX_MODEL_LEN)
        self.live: list[Request] = []
        # (block id, slot) -> the token prefix whose KV sits there; survives frees, like real memory.
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.num_submitted = 0

    def submit(self, prompt: list[int], max_tokens: int) -> None:
        if self.scheduler.can_ever_fit(len(prompt), max_tokens) is not None:
            return  # the engine refuses it up front
        req = Request(
            f"r{self.num_submitted}", prompt, SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset({EOS})
        )
        self.num_submitted += 1
        self.scheduler.add_request(req)
        self.live.append(req)

    def step(self, tokens: list[int]) -> bool:
        """One schedule -> fake forward -> update. Returns whether anything happened."""
        size = self.config.block_size
        output = self.scheduler.schedule()
        assert output.num_batched_tokens == sum(s.num_new_tokens for s in output.scheduled)
        assert output.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(output.scheduled) <= self.config.max_num_seqs
        assert len({id(s.request) for s in output.scheduled}) == len(output.scheduled)
        for preempted in output.preempted:
            assert preempted.status == RequestStatus.PREEMPTED and preempted.block_ids == []
        ref_counts = self._ref_counts()
        sampled: dict[str, list[int]] = {}
        for index, scheduled in enumerate(output.scheduled):
            req = scheduled.request
            start, end = req.num_computed_tokens, req.num_computed_tokens + scheduled.num_new_tokens
            assert req.status == RequestStatus.RUNNING
            assert 0 < scheduled.num_new_tokens and end <= req.num_tokens
            assert end <= len(req.block_ids) * size, "forward would write past the request's blocks"
            for pos in range(start, end):
                block_id = req.block_ids[pos // size]
                assert ref_counts[block_id] == 1, f"{req} writes into shared block {block_id}"
                self.kv[(block_id, pos % size)] = tuple(req.token_ids[: pos + 1])
            if scheduled.is_sampling:
                sampled[req.request_id] = [tokens[index % len(tokens)]]
        received = self.scheduler.update(output, sampled)
        assert [req.request_id for req in received] == list(sampled)
        self.live = [req for req in self.live if not req.is_finished]
        return not output.is_empty or bool(output.preempted)

    def _ref_counts(self) -> dict[int, int]:
        """References per block, counted from the running requests themselves (not the manager)."""
        counts: dict[int, int] = {}
        for req in self.scheduler.running:
            for block_id in req.block_ids:
                counts[block_id] = counts.get(block_id, 0) + 1
        return counts

    def finish(self, index: int, reason: FinishReason) -> None:
        if not self.live:
            return
        req = self.live[index % len(self.live)]
        if reason == FinishReason.STOP and req.status != RequestStatus.RUNNING:
            return  # stop strings only match text of running requests
        self.scheduler.finish_request(req, reason, "stop" if reason == FinishReason.STOP else None)
        self.scheduler.finish_request(req, reason)  # idempotent
        assert req.is_finished and req.block_ids == []
        self.live.remove(req)

    def check(self) -> None:
        self.bm.check_invariants()
        size = self.config.block_size
        running, waiting = self.scheduler.running, self.scheduler.waiting
        assert len(running) <= self.config.max_num_seqs
        assert {id(r) for r in running} | {id(r) for r in waiting} == {id(r) for r in self.live}
        assert self.scheduler.num_running + self.scheduler.num_waiting == len(self.live)
        for req in waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and req.block_ids == []
        holders: dict[int, list[tuple[Request, int]]] = {}
        for req in running:
            assert req.status == RequestStatus.RUNNING
            assert len(req.block_ids) == -(-req.num_tokens // size) or (
                len(req.block_ids) == -(-(req.num_tokens - 1) // size)  # the newest token's block comes at schedule
            )
            for index, block_id in enumerate(req.block_ids):
                holders.setdefault(block_id, []).append((req, index))
            # KV content: every computed position holds exactly this request's prefix.
            for pos in range(req.num_computed_tokens):
                slot = (req.block_ids[pos // size], pos % size)
                assert self.kv.get(slot) == tuple(req.token_ids[: pos + 1]), f"{req} reads foreign KV at {pos}"
        for block_id, refs in holders.items():
            if len(refs) < 2:
                continue
            (first, first_index), *others = refs
            end = (first_index + 1) * size
            for other, other_index in others:
                assert other_index == first_index, f"block {block_id} shared at different positions"
                assert other.token_ids[:end] == first.token_ids[:end], f"block {block_id} shared across prefixes"
                assert other.num_computed_tokens >= end and first.num_computed_tokens >= end


@settings(
    max_examples=200,
    deadline=None,
    database=None,  # a shared tree: leave no .hypothesis/ behind
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config=configs(), ops=st.lists(operations, min_size=20, max_size=60), drain=st.booleans())
def test_random_workloads_keep_blocks_consistent(
    config: Config, ops: list[tuple], drain: bool
) -> None:
    harness = Harness(config)
    for op in ops:
        kind = op[0]
        if kind == "submit":
            harness.submit(op[1], op[2])
        elif kind == "step":
            harness.step(op[1])
        elif kind == "abort":
            harness.finish(op[1], FinishReason.ABORT)
        else:
            harness.finish(op[1], FinishReason.STOP)
        harness.check()

    if drain:
        # Liveness: every step schedules or preempts something until all requests finish.
        for _ in range(MAX_DRAIN_STEPS):
            if not harness.scheduler.has_unfinished:
                break
            assert harness.step([1, 2, 2]), "scheduler stalled with unfinished requests"
            harness.check()
        assert not harness.scheduler.has_unfinished
    else:
        while harness.live:
            harness.finish(0, FinishReason.ABORT)
            harness.check()
    assert harness.bm.num_free_blocks == harness.bm.num_blocks
    assert harness.bm.num_used_blocks == 0
    # Shown by --hypothesis-show-statistics: how often the interesting paths ran.
    event(f"preempted: {harness.scheduler.num_preemptions_total > 0}")
    event(f"prefix hits: {harness.bm.num_prefix_hits > 0}")
    event(f"submitted: {min(harness.num_submitted // 5 * 5, 15)}+")
