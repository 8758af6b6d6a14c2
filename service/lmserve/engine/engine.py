"""The native engine's async front: submit, stream deltas, abort by closing the stream.

One thread runs the step loop (schedule -> forward -> sample -> update -> detokenize); the asyncio
side only enqueues requests and reads per-request queues. Each step hands all its deltas to the
event loop in one `call_soon_threadsafe`, so HTTP work stays off the engine's critical path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

import torch

from lmserve.config import EngineConfig
from lmserve.engine.base import (
    EngineDeadError,
    EngineFaultError,
    EngineStats,
    EngineStepError,
    EngineStoppedError,
    LoraAdapterError,
    LoraAdapterInfo,
    QueueTimeoutError,
    RejectReason,
    RequestRejected,
    StepStats,
    timeout_delta,
)
from lmserve.engine.block_manager import BlockManager
from lmserve.checkpoints.errors import CheckpointError
from lmserve.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmask,
)
from lmserve.engine.lora_registry import LoraAdapter
from lmserve.engine.lora_slots import LoraSlots
from lmserve.engine.output import SequenceOutput
from lmserve.engine.prompt_lookup import PromptLookup
from lmserve.engine.request import Request
from lmserve.engine.runner import ModelRunner
from lmserve.engine.sampler import SampledToken, sample
from lmserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from lmserve.engine.speculative import verify
from lmserve.process import prepare_to_serve, set_thread_count
from lmserve.tokenizer import Tokenizer
from lmserve.types import FinishReason, GenerationDelta, GenerationRequest

log = logging.getLogger(__name__)


class _Deadline(Exception):
    """Put in a request's queue by its timeout timer (an exception, so the per-delta path checks nothing new)."""


class _QueueCheck(Exception):
    """Put in a request's queue when its queue timeout passes: still unscheduled then, it fails."""


@dataclass
class _Stream:
    """Engine-thread state of one in-flight request."""

    request: Request
    output: SequenceOutput
    queue: asyncio.Queue
    generator: torch.Generator | None


class NativeEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, model_name: str, config: EngineConfig) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.family = runner.architecture.family
        self.config = config
        self.max_model_len = runner.max_model_len
        self.vocab_size = runner.vocab_size
        self.block_manager = BlockManager(
            runner.kv_spec.num_blocks, runner.kv_spec.block_size, config.enable_prefix_caching, runner.kv_window
        )
        self.lora_registry = runner.lora_registry  # None unless LoRA is enabled
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            lora_slots=LoraSlots(config.max_loras) if runner.loras is not None else None,
        )
        self.eos_token_ids = tokenizer.eos_token_ids
        self._ids = itertools.count()
        self._inbox: deque[_Stream] = deque()
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._open_queues: set[asyncio.Queue] = set()  # event loop only: the queues generate() is reading
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._is_alive = False
        # Why the engine loop died (a failed forward); None while it runs or after a clean stop.
        self.fault: BaseException | None = None
        self.num_steps = 0
        self.grammars = GrammarCompiler(tokenizer, runner.vocab_size)
        # Constrained requests whose matcher is being built off the engine thread (the first one also builds
        # the token trie, ~1-3 s), so neither the event loop nor the running batch waits. Engine thread only.
        self._compiling: list[tuple[_Stream, Future[GrammarMatcher]]] = []
        # Made on first use, so unconstrained serving starts no threads for them.
        self._grammar_pool: ThreadPoolExecutor | None = None
        self._mask_pool: ThreadPoolExecutor | None = None
        self._bitmask: torch.Tensor | None = None
        # Masks are computed on a worker thread while the forward runs when that has a core to itself (a
        # GPU forward, or CPU threads to spare); a CPU forward on every core would only be slowed by it.
        self.overlap_masks = runner.device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)
        # Per-step metrics hook, called on the engine thread; None costs nothing.
        self.on_step: Callable[[StepStats], None] | None = None

    @classmethod
    def load(cls, model_path: Path, model_name: str, config: EngineConfig) -> NativeEngine:
        set_thread_count(config.num_threads)
        runner = ModelRunner(model_path, config)
        engine = cls(runner, Tokenizer.from_folder(model_path), model_name, config)
        for name, path in config.lora_modules:
            try:
                engine.add_lora_adapter(name, str(path))
            except LoraAdapterError as exc:
                raise CheckpointError(f"--lora-modules {name}: {exc}") from None
        return engine

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._is_alive = True
        prepare_to_serve()
        num_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run_loop, args=(num_threads,), name="lmserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        # End the streams still being read now: the engine thread only notices after its current step,
        # which on a loaded CPU can take a second. (It fails them again then, into queues nobody reads.)
        for queue in self._open_queues:
            queue.put_nowait(EngineStoppedError("the engine stopped"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._thread = None
        for pool in (self._grammar_pool, self._mask_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._grammar_pool = self._mask_pool = None

    @property
    def is_alive(self) -> bool:
        return self._is_alive and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        slots, registry = self.scheduler.lora_slots, self.lora_registry
        lora = {}
        if slots is not None and registry is not None:
            lora = dict(
                num_loras_resident=slots.num_resident,
                num_loras_loaded=len(registry.adapters()),
                max_loras=len(slots.adapter_ids),
                num_lora_loads_total=registry.num_loads,
                num_lora_evictions_total=slots.num_evictions,
                running_loras=_lora_names(self.scheduler.running),
                waiting_loras=_lora_names(self.scheduler.waiting),
            )
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self._inbox) + len(self._compiling),
            num_kv_blocks_used=self.block_manager.num_used_blocks,
            num_kv_blocks_total=self.block_manager.num_blocks,
            block_size=self.block_manager.block_size,
            is_alive=self.is_alive,
            num_steps_total=self.num_steps,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            num_prefix_cache_query_tokens_total=self.block_manager.num_prefix_queries,
            num_prefix_cache_hit_tokens_total=self.block_manager.num_prefix_hits,
            num_draft_tokens_total=self.scheduler.num_draft_tokens_total,
            num_accepted_tokens_total=self.scheduler.num_accepted_tokens_total,
            **lora,
        )

    # ---- LoRA adapters ---------------------------------------------------------------------

    def lora_adapters(self) -> list[LoraAdapterInfo]:
        if self.lora_registry is None:
            return []
        return [LoraAdapterInfo(a.name, str(a.path), a.created) for a in self.lora_registry.adapters()]

    def add_lora_adapter(self, name: str, path: str) -> None:
        """Read, check and register an adapter (blocking: the server's start, or a worker thread)."""
        if self.lora_registry is None:
            raise LoraAdapterError("this server serves no LoRA adapters (start it with --lora-modules or --allow-runtime-lora)", "unsupported")
        if name == self.model_name:
            raise LoraAdapterError(f"{name!r} is the base model's name", "conflict")
        if self.lora_registry.get(name) is not None:
            raise LoraAdapterError(f"a LoRA adapter named {name!r} is already loaded", "conflict")
        try:
            adapter = self.lora_registry.add(name, Path(path))
        except CheckpointError as exc:
            raise LoraAdapterError(str(exc), "invalid") from None
        except ValueError as exc:  # the name was taken meanwhile
            raise LoraAdapterError(str(exc), "conflict") from None
        log.info("LoRA adapter %s loaded from %s (rank %d, %.1f MiB)", name, path, adapter.rank, adapter.num_bytes / 2**20)

    async def load_lora_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self.add_lora_adapter, name, path)

    async def unload_lora_adapter(self, name: str) -> None:
        """New requests for `name` are refused from now on; those already submitted finish with it."""
        adapter = None if self.lora_registry is None else self.lora_registry.remove(name)
        if adapter is None:
            raise LoraAdapterError(f"no LoRA adapter named {name!r} is loaded", "not_found")
        log.info("LoRA adapter %s unloaded", name)

    def _lora(self, request: GenerationRequest) -> LoraAdapter | None:
        if request.lora is None:
            return None
        adapter = None if self.lora_registry is None else self.lora_registry.get(request.lora)
        if adapter is None:
            raise RequestRejected(f"The model '{request.lora}' does not exist.", RejectReason.UNKNOWN_ADAPTER, field="model")
        return adapter

    # ---- requests --------------------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> None:
        """This engine's own limits: the context and the KV pool, and whether the constraint compiles.
        Everything else about a request is validated once, before it gets here (api/generation.py)."""
        self._lora(request)
        num_prompt_tokens = len(request.prompt_token_ids)
        message = self.scheduler.can_ever_fit(num_prompt_tokens, request.sampling.max_tokens)
        if message is not None:
            # The prompt is what must change when even one output token cannot fit beside it.
            prompt_alone = self.scheduler.can_ever_fit(num_prompt_tokens, 1) is not None
            reason = RejectReason.PROMPT_TOO_LONG if prompt_alone else RejectReason.OUTPUT_TOO_LONG
            raise RequestRejected(message, reason, max_seq_len=self.scheduler.max_seq_len)
        structured = request.sampling.structured
        if structured is not None:
            try:
                self.grammars.validate(structured)
            except GrammarError as exc:
                raise _grammar_rejected(str(exc)) from None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self.check_request(request)
        if not self.is_alive:
            raise self._dead_error()
        internal_id = f"{request.request_id or 'req'}#{next(self._ids)}"
        req = Request(internal_id, request.prompt_token_ids, request.sampling, self.eos_token_ids, lora=self._lora(request))
        num_speculative = request.sampling.speculative_tokens
        req.num_speculative_tokens = self.config.speculative_tokens if num_speculative is None else num_speculative
        if req.num_speculative_tokens > 0:
            req.lookup = PromptLookup(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        seed = request.sampling.seed
        generator = None
        if seed is not None and not request.sampling.is_greedy:
            generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        queue: asyncio.Queue = asyncio.Queue()
        self._open_queues.add(queue)
        stream = _Stream(req, SequenceOutput(self.tokenizer, req, request.request_id), queue, generator)
        self._inbox.append(stream)
        self._wake.set()
        # One timer per limit and request, nothing per token: each puts a marker in the queue when due.
        loop = asyncio.get_running_loop()
        timers = []
        if request.timeout_s is not None:
            timers.append(loop.call_later(request.timeout_s, queue.put_nowait, _Deadline()))
        if request.queue_timeout_s is not None:
            timers.append(loop.call_later(request.queue_timeout_s, queue.put_nowait, _QueueCheck()))
        finished = False
        try:
            if not self._is_alive:  # died between the check above and the inbox: nobody would answer
                raise self._dead_error()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, _QueueCheck):
                        if req.first_scheduled_time is not None:
                            continue
                        waited = request.queue_timeout_s or 0.0
                        raise QueueTimeoutError(f"waited {waited:g} s in the queue without being scheduled", waited)
                    if isinstance(item, _Deadline):
                        # The `finally` aborts it (finished stays False), which frees its KV blocks.
                        yield timeout_delta(request)
                        return
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            for timer in timers:
                timer.cancel()
            self._open_queues.discard(queue)
            if not finished:
                self._aborts.append(internal_id)
                self._wake.set()

    def _dead_error(self) -> EngineDeadError:
        if self.fault is not None:
            return EngineDeadError(f"the engine failed and takes no new work: {self.fault}")
        return EngineDeadError("the engine is not running")

    def _fail_open_queues(self, error: BaseException) -> None:
        """Event loop: end every stream being read, the ones still in the inbox or compiling included."""
        for queue in self._open_queues:
            queue.put_nowait(error)

    # ---- engine thread ---------------------------------------------------------------------

    def _run_loop(self, num_threads: int) -> None:
        torch.set_num_threads(num_threads)  # OpenMP's thread count is per thread: carry it over
        try:
            while not self._stopping:
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
            self._is_alive = False
            error = exc if isinstance(exc, EngineFaultError) else EngineFaultError(f"the engine loop died: {exc}")
            self._fail(list(self._streams.values()), error)
            self._deliver_call(self._fail_open_queues, error)
        finally:
            self._is_alive = False
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
        pending: list[tuple[_Stream, Future[GrammarMatcher]]] = []
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
                self._fail([stream], _grammar_rejected(str(exc)))
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
            logits = self.runner.execute(scheduled)
        except Exception as exc:
            # The forward failed: the KV cache (or on a GPU the device) may be corrupt, so no request can
            # trust this engine any more. The loop ends; the process should exit and be restarted.
            if masks is not None:
                wait_futures([masks])
            raise EngineFaultError(f"the model forward failed: {exc}") from exc
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
                deliveries.append((stream.queue, _grammar_rejected(error)))
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
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _fail(self, streams: list[_Stream], error: BaseException) -> None:
        for stream in streams:
            self._streams.pop(stream.request.request_id, None)
        if streams:
            self._deliver([(s.queue, error) for s in streams])


def _lora_names(requests: tuple[Request, ...]) -> tuple[str, ...]:
    return tuple(sorted({r.lora.name for r in requests if r.lora is not None}))


def _grammar_rejected(message: str) -> RequestRejected:
    return RequestRejected(message, RejectReason.INVALID_CONSTRAINT, field="structured")


def _put_all(deliveries: list[tuple[asyncio.Queue, GenerationDelta | BaseException]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)
