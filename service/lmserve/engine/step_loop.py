"""The native engine's step loop, on its own thread: take new requests and aborts, schedule, run the
forward, sample, let the scheduler append the tokens, and hand each step's deltas to the event loop in one
`call_soon_threadsafe` (engine.py is the async front that feeds it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch

from lmserve.engine.base import (
    EngineFaultError,
    EngineStepError,
    EngineStoppedError,
    RejectReason,
    RequestRejected,
    StepStats,
)
from lmserve.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmask,
)
from lmserve.engine.output import SequenceOutput
from lmserve.engine.request import Request
from lmserve.engine.runner import ModelRunner
from lmserve.engine.sampler import SampledToken, sample
from lmserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from lmserve.engine.speculative import verify
from lmserve.types import FinishReason, GenerationDelta

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """Engine-thread state of one in-flight request."""

    request: Request
    output: SequenceOutput
    queue: asyncio.Queue
    generator: torch.Generator | None


class StepLoop:
    """The engine thread's state and its loop. The event loop only calls `submit`, `abort`, `wake` and reads
    the counters; everything else runs on the engine thread."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        grammars: GrammarCompiler,
        open_queues: set[asyncio.Queue],
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.grammars = grammars
        # The front's queues that generate() is reading (event loop only): when this loop dies, each hears of it,
        # those of the requests it never took (still in the inbox or compiling) included. The set, not the front:
        # a reference back to the engine would make a cycle that keeps its KV cache alive until a gc pass.
        self._open_queues = open_queues
        self._inbox: deque[Stream] = deque()
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, Stream] = {}  # engine thread only
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.is_stopping = False
        self.is_running = False
        # Why the loop died (a failed forward); None while it runs or after a clean stop.
        self.fault: BaseException | None = None
        self.num_steps = 0
        # Constrained requests whose matcher is being built off the engine thread (the first one also builds
        # the token trie, ~1-3 s), so neither the event loop nor the running batch waits. Engine thread only.
        self._compiling: list[tuple[Stream, Future[GrammarMatcher]]] = []
        # Made on first use, so unconstrained serving starts no threads for them.
        self._grammar_pool: ThreadPoolExecutor | None = None
        self._mask_pool: ThreadPoolExecutor | None = None
        self._bitmask: torch.Tensor | None = None
        # Masks are computed on a worker thread while the forward runs when that has a core to itself (a
        # GPU forward, or CPU threads to spare); a CPU forward on every core would only be slowed by it.
        self.overlap_masks = runner.device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)
        # Per-step metrics hook, called on the engine thread; None costs nothing.
        self.on_step: Callable[[StepStats], None] | None = None

    # ---- event loop side ---------------------------------------------------------------------

    def submit(self, stream: Stream) -> None:
        self._inbox.append(stream)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def num_pending(self) -> int:
        """Requests submitted but not yet queued in the scheduler (in the inbox, or their grammar compiling)."""
        return len(self._inbox) + len(self._compiling)

    def shutdown_workers(self) -> None:
        """After the loop has stopped: the grammar and mask threads go too."""
        for pool in (self._grammar_pool, self._mask_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._grammar_pool = self._mask_pool = None

    # ---- engine thread -----------------------------------------------------------------------

    def run(self, num_threads: int) -> None:
        torch.set_num_threads(num_threads)  # OpenMP's thread count is per thread: carry it over
        try:
            while not self.is_stopping:
                self._take_inbox()
                if self._compiling:
                    self._take_compiled()
                if not self.scheduler.has_unfinished:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # a failed forward, or the loop itself broke: every stream must hear of it
            log.critical("generation engine failed; ending every open request: %s", exc, exc_info=exc)
            self.fault = exc
            self.is_running = False
            error = exc if isinstance(exc, EngineFaultError) else EngineFaultError(f"the engine loop died: {exc}")
            self._fail(list(self._streams.values()), error)
            self._deliver_call(_fail_queues, self._open_queues, error)
        finally:
            self.is_running = False
            self._fail(list(self._streams.values()), EngineStoppedError("the engine stopped"))

    def _take_inbox(self) -> None:
        while self._inbox:
            stream = self._inbox.popleft()
            self._streams[stream.request.request_id] = stream
            structured = stream.request.sampling.structured
            if structured is None:
                self.scheduler.add_request(stream.request)
            else:
                future = self._grammar_workers().submit(self.grammars.matcher, structured)
                future.add_done_callback(lambda _: self._wake.set())
                self._compiling.append((stream, future))
        while self._aborts:
            stream = self._streams.pop(self._aborts.popleft(), None)
            if stream is not None:
                self.scheduler.finish_request(stream.request, FinishReason.ABORT)

    def _grammar_workers(self) -> ThreadPoolExecutor:
        if self._grammar_pool is None:
            self._grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-grammar")
        return self._grammar_pool

    def _take_compiled(self) -> None:
        """Queue the constrained requests whose matcher is ready; fail those whose grammar did not build."""
        pending: list[tuple[Stream, Future[GrammarMatcher]]] = []
        for stream, future in self._compiling:
            if not future.done():
                pending.append((stream, future))
                continue
            req = stream.request
            if req.request_id not in self._streams:
                continue  # aborted while compiling
            try:
                req.grammar = future.result()
            except GrammarError as exc:
                self._fail([stream], grammar_rejected(str(exc)))
                continue
            self.scheduler.add_request(req)
        self._compiling = pending

    def _start_masks(self, matchers: list[GrammarMatcher]) -> Future[torch.Tensor]:
        """The constrained rows' token masks: on a worker thread while the forward runs where `overlap_masks`
        (llguidance drops the GIL), else now. Matchers only change after sampling, so nothing races."""
        if self._bitmask is None or self._bitmask.shape[0] < len(matchers):
            self._bitmask = allocate_bitmask(max(len(matchers), 16), self.runner.vocab_size)
        bitmask = self._bitmask

        def fill() -> torch.Tensor:
            fill_bitmask(matchers, bitmask)
            return bitmask

        if not self.overlap_masks:
            done: Future[torch.Tensor] = Future()
            done.set_result(fill())
            return done
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-masks")
        return self._mask_pool.submit(fill)

    def _step(self) -> None:
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            # Nothing fits right now (all blocks held by requests still finishing); yield the core.
            self._wake.wait(timeout=0.001)
            self._wake.clear()
            return
        unreadable = self.runner.load_loras(scheduled)
        if unreadable:  # those requests fail alone; the step goes on without them
            for req, exc in unreadable:
                log.error("request %s: its LoRA adapter cannot be read: %s", req.request_id, exc)
                self.scheduler.finish_request(req, FinishReason.ABORT)
                self._fail([self._streams[req.request_id]], EngineStepError(f"its LoRA adapter cannot be read: {exc}"))
            scheduled.scheduled = [s for s in scheduled.scheduled if not s.request.is_finished]
            if scheduled.is_empty:
                return
        sampling = [s for s in scheduled.scheduled if s.is_sampling]
        sampling_reqs = [s.request for s in sampling]
        constrained = [i for i, r in enumerate(sampling_reqs) if r.grammar is not None]
        masks = self._start_masks([sampling_reqs[i].grammar for i in constrained]) if constrained else None
        try:
            step_logits = self.runner.execute(scheduled)
        except Exception as exc:
            # The forward failed: the KV cache (or on a GPU the device) may be corrupt, so no request can
            # trust this engine any more. The loop ends; the process should exit and be restarted.
            if masks is not None:
                wait_futures([masks])
            raise EngineFaultError(f"the model forward failed: {exc}") from exc
        logits = step_logits.logits
        if step_logits.prompt_logprobs:  # the prompt tokens this step scored, kept until the first delta
            for item in scheduled.scheduled:
                item.request.prompt_logprobs.extend(step_logits.prompt_logprobs.get(item.request.request_id, ()))
        try:
            sampled: list[list[SampledToken] | None] = []
            if sampling_reqs:
                assert logits is not None
                has_drafts = logits.shape[0] != len(sampling_reqs)
                if masks is not None:
                    # Only the constrained rows are touched: the others sample exactly as without constraints.
                    # A constrained request never drafts, so it has one row: the first of its share.
                    rows = constrained
                    if has_drafts:
                        first_rows = list(itertools.accumulate((s.num_logit_rows for s in sampling), initial=0))
                        rows = [first_rows[i] for i in constrained]
                    apply_bitmask(logits, rows, masks.result())
                generators = [self._streams[r.request_id].generator for r in sampling_reqs]
                if not has_drafts:
                    sampled = [None if tok is None else [tok] for tok in self._sample(logits, sampling_reqs, generators)]
                else:
                    sampled = self._verify(logits, sampling, generators)
        except Exception as exc:
            if masks is not None:
                wait_futures([masks])  # the worker must be done with the matchers before anyone else uses them
            log.exception("engine step failed; ending the %d requests in it", len(scheduled.scheduled))
            failed = [self._streams[s.request.request_id] for s in scheduled.scheduled]
            for stream in failed:
                self.scheduler.finish_request(stream.request, FinishReason.ABORT)
            self._fail(failed, EngineStepError(f"generation failed: {exc}"))
            return
        # Rows whose sampling failed (None) have already failed their own requests.
        kept = [(req, toks) for req, toks in zip(sampling_reqs, sampled, strict=True) if toks is not None]
        deliveries = self._apply_sampled(scheduled, kept)
        self.num_steps += 1
        # Before delivering: a client holding its answer then finds this step in the metrics too.
        if self.on_step is not None:
            self.on_step(
                StepStats(
                    num_scheduled_seqs=len(scheduled.scheduled),
                    num_batched_tokens=scheduled.num_batched_tokens,
                    num_preempted=len(scheduled.preempted),
                    duration_s=time.perf_counter() - started,
                )
            )
        if deliveries:
            self._deliver(deliveries)

    def _apply_sampled(
        self, scheduled: SchedulerOutput, sampled: list[tuple[Request, list[SampledToken]]]
    ) -> list[tuple[asyncio.Queue, GenerationDelta | BaseException]]:
        """One loop over the batch: advance each constrained request's grammar, let the scheduler append the
        tokens (detokenizing each and matching stop strings as it goes) and end the finished sequences
        (Request.check_stop decides), then build each sequence's delta."""
        token_ids: dict[str, list[int]] = {}
        deliveries: list[tuple[asyncio.Queue, GenerationDelta | BaseException]] = []
        for req, toks in sampled:
            rid = req.request_id
            if req.grammar is not None and not req.grammar.accept(toks[0].token_id):
                # Never, unless something is broken: the token was sampled under the grammar's mask.
                error = req.grammar.error or f"token {toks[0].token_id} is not allowed here"
                log.error("request %s: constrained decoding failed: %s", rid, error)
                self.scheduler.finish_request(req, FinishReason.ABORT)  # update() then skips it
                stream = self._streams.pop(rid)
                deliveries.append((stream.queue, grammar_rejected(error)))
                continue
            token_ids[rid] = [t.token_id for t in toks]
        received = self.scheduler.update(scheduled, token_ids, self._take)
        now = time.monotonic()
        for req, toks in sampled:
            if req.request_id not in token_ids:
                continue
            stream = self._streams[req.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
            deliveries.append((stream.queue, stream.output.delta(req, toks)))
            if req.is_finished:
                del self._streams[req.request_id]
        assert len(received) == len(token_ids)
        return deliveries

    def _take(self, req: Request, token_id: int) -> str | None:
        return self._streams[req.request_id].output.take(token_id)

    def _verify(
        self, logits: torch.Tensor, sampling: list[ScheduledRequest], generators: list[torch.Generator | None]
    ) -> list[list[SampledToken] | None]:
        """The tokens each request keeps from a step in which some verified drafts (speculative.py); as in
        `_sample`, a request whose verification fails ends alone (None in its place)."""
        items = [(s.request, s.draft_token_ids) for s in sampling]
        try:
            return list(verify(logits, items, generators))
        except Exception:
            log.exception("verifying a batch of %d requests failed; verifying them one by one", len(items))
        out: list[list[SampledToken] | None] = []
        row = 0
        for item, generator in zip(items, generators, strict=True):
            rows = logits[row : row + 1 + len(item[1])]
            row += rows.shape[0]
            try:
                out.append(verify(rows, [item], [generator])[0])
            except Exception as exc:
                req = item[0]
                log.error("request %s: sampling failed: %s", req.request_id, exc)
                self.scheduler.finish_request(req, FinishReason.ABORT)
                self._fail([self._streams[req.request_id]], EngineStepError(f"sampling failed for this request: {exc}"))
                out.append(None)
        return out

    def _sample(
        self, logits: torch.Tensor, reqs: list[Request], generators: list[torch.Generator | None]
    ) -> list[SampledToken | None]:
        """The batch's tokens; if sampling the batch fails, its rows one by one, so that a row that cannot
        be sampled fails its own request alone (None in its place) and its batch-mates go on."""
        try:
            return sample(logits, reqs, generators)
        except Exception:
            log.exception("sampling a batch of %d rows failed; sampling them one by one", len(reqs))
        out: list[SampledToken | None] = []
        for i, (req, generator) in enumerate(zip(reqs, generators, strict=True)):
            try:
                out.extend(sample(logits[i : i + 1], [req], [generator]))
            except Exception as exc:
                log.error("request %s: sampling failed: %s", req.request_id, exc)
                self.scheduler.finish_request(req, FinishReason.ABORT)
                self._fail([self._streams[req.request_id]], EngineStepError(f"sampling failed for this request: {exc}"))
                out.append(None)
        return out

    def _deliver(self, deliveries: list[tuple[asyncio.Queue, GenerationDelta | BaseException]]) -> None:
        self._deliver_call(_put_all, deliveries)

    def _deliver_call(self, callback: Callable[..., None], *args: object) -> None:
        assert self.event_loop is not None
        try:
            self.event_loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _fail(self, streams: list[Stream], error: BaseException) -> None:
        for stream in streams:
            self._streams.pop(stream.request.request_id, None)
        if streams:
            self._deliver([(s.queue, error) for s in streams])


def grammar_rejected(message: str) -> RequestRejected:
    return RequestRejected(message, RejectReason.INVALID_CONSTRAINT, field="structured")


def _put_all(deliveries: list[tuple[asyncio.Queue, GenerationDelta | BaseException]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)


def _fail_queues(queues: set[asyncio.Queue], error: BaseException) -> None:
    """On the event loop: every queue being read then hears of the error."""
    for queue in queues:
        queue.put_nowait(error)
