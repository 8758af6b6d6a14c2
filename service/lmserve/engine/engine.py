"""The native engine's async front: submit, stream deltas, abort by closing the stream.

One thread runs the step loop (step_loop.py: schedule -> forward -> sample -> update -> detokenize); the
asyncio side only enqueues requests and reads per-request queues. Each step hands all its deltas to the
event loop in one `call_soon_threadsafe`, so HTTP work stays off the engine's critical path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from lmserve.config import EngineConfig
from lmserve.checkpoints.errors import CheckpointError
from lmserve.engine.base import (
    EngineDeadError,
    EngineStats,
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
from lmserve.engine.grammar import GrammarCompiler, GrammarError
from lmserve.engine.lora_registry import LoraAdapter
from lmserve.engine.lora_slots import LoraSlots
from lmserve.engine.output import SequenceOutput
from lmserve.engine.prompt_lookup import PromptLookup
from lmserve.engine.request import Request
from lmserve.engine.runner import ModelRunner
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.step_loop import StepLoop, Stream, grammar_rejected
from lmserve.process import prepare_to_serve, set_thread_count
from lmserve.tokenizer import Tokenizer
from lmserve.types import GenerationDelta, GenerationRequest

log = logging.getLogger(__name__)


class _Deadline(Exception):
    """Put in a request's queue by its timeout timer (an exception, so the per-delta path checks nothing new)."""


class _QueueCheck(Exception):
    """Put in a request's queue when its queue timeout passes: still unscheduled then, it fails."""


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
        self._open_queues: set[asyncio.Queue] = set()  # event loop only: the queues generate() is reading
        self._thread: threading.Thread | None = None
        self.grammars = GrammarCompiler(tokenizer, runner.vocab_size)
        self.steps = StepLoop(runner, self.scheduler, self.grammars, self._open_queues)

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

    # ---- the step loop's state, as the engine interface names it ------------------------------

    @property
    def on_step(self) -> Callable[[StepStats], None] | None:
        """Per-step metrics hook, called on the engine thread; None costs nothing."""
        return self.steps.on_step

    @on_step.setter
    def on_step(self, hook: Callable[[StepStats], None] | None) -> None:
        self.steps.on_step = hook

    @property
    def fault(self) -> BaseException | None:
        """Why the engine loop died (a failed forward); None while it runs or after a clean stop."""
        return self.steps.fault

    @property
    def num_steps(self) -> int:
        return self.steps.num_steps

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.steps.event_loop = asyncio.get_running_loop()
        self.steps.is_stopping = False
        self.steps.is_running = True
        prepare_to_serve()
        num_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self.steps.run, args=(num_threads,), name="lmserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self.steps.is_stopping = True
        self.steps.wake()
        # End the streams still being read now: the engine thread only notices after its current step,
        # which on a loaded CPU can take a second. (It fails them again then, into queues nobody reads.)
        for queue in self._open_queues:
            queue.put_nowait(EngineStoppedError("the engine stopped"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._thread = None
        self.steps.shutdown_workers()

    @property
    def is_alive(self) -> bool:
        return self.steps.is_running and self._thread is not None and self._thread.is_alive()

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
            num_waiting=self.scheduler.num_waiting + self.steps.num_pending,
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
        Everything else about a request is validated once, before it gets here (api/plan.py)."""
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
                raise grammar_rejected(str(exc)) from None

    async def generate(self, request: GenerationRequest, *, checked: bool = False) -> AsyncIterator[GenerationDelta]:
        if not checked:
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
        self.steps.submit(Stream(req, SequenceOutput(self.tokenizer, req, request.request_id), queue, generator))
        # One timer per limit and request, nothing per token: each puts a marker in the queue when due.
        loop = asyncio.get_running_loop()
        timers = []
        if request.timeout_s is not None:
            timers.append(loop.call_later(request.timeout_s, queue.put_nowait, _Deadline()))
        if request.queue_timeout_s is not None:
            timers.append(loop.call_later(request.queue_timeout_s, queue.put_nowait, _QueueCheck()))
        finished = False
        try:
            if not self.steps.is_running:  # died between the check above and the inbox: nobody would answer
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
                self.steps.abort(internal_id)

    def _dead_error(self) -> EngineDeadError:
        if self.fault is not None:
            return EngineDeadError(f"the engine failed and takes no new work: {self.fault}")
        return EngineDeadError("the engine is not running")



def _lora_names(requests: tuple[Request, ...]) -> tuple[str, ...]:
    return tuple(sorted({r.lora.name for r in requests if r.lora is not None}))
