"""`--engine vllm`: the GenerationEngine interface over vLLM's async engine (AsyncLLM), in this process.

The service keeps everything above the engine (tokenizer, chat templates, limits, safety, metrics, both
transports); vLLM gets token ids and sampling parameters and streams back deltas. vLLM's own layout is
kept: AsyncLLM (its detokenizer, stop strings and output queues) runs on our event loop, its EngineCore
(scheduler, KV cache, model) in a child process, and with tensor/pipeline parallelism its workers in
more processes, or on other nodes through Ray.

    engine = VLLMEngine.load(path, name, engine_config, vllm_config)   # resolves vLLM's config, no weights yet
    await engine.start()                                              # spawns the engine core, loads weights
    async for delta in engine.generate(request): ...                  # closing the stream aborts in vLLM

Sampling parameters map one to one onto vLLM's (both follow vLLM's semantics); where vLLM would silently
change a value, check_request refuses it with a 400 naming the parameter (vllm_params.to_vllm_sampling).
EngineStats come from vLLM's own per-step SchedulerStats and IterationStats, through a stat logger that
vLLM calls after every step (vllm_stats.py).

vLLM is imported only here and only when this engine is loaded; without it, `load` raises
EngineUnavailableError, which the CLI prints as one `error:` line.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from types import ModuleType
from typing import Any

from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.lora_adapter import read_lora_adapter
from lmserve.config import EngineConfig, VLLMConfig
from lmserve.engine.base import (
    EngineDeadError,
    EngineStats,
    EngineUnavailableError,
    LoraAdapterError,
    LoraAdapterInfo,
    RejectReason,
    RequestRejected,
    StepStats,
    timeout_delta,
)
from lmserve.engine.vllm_params import rejected, to_vllm_sampling, vllm_engine_kwargs
from lmserve.engine.vllm_stats import VLLMStatsCollector
from lmserve.tokenizer import Tokenizer
from lmserve.types import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    PromptLogprob,
    RequestTiming,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"  # the version this adapter is written and tested against (pyproject's `vllm` extra)

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class VLLMRequestError(RuntimeError):
    """vLLM failed one request (its finish reason "error", or an error out of its generate())."""


def unavailable_message(reason: str) -> str:
    """The one line for `error:` when vLLM cannot be imported."""
    return (
        f"--engine vllm needs vLLM {VLLM_VERSION}, which cannot be imported here ({reason}); install it with "
        f"pip install 'lmserve[vllm]' (GPU), or make vllm-venv for vLLM's CPU build"
    )


def find_vllm() -> str | None:
    """None when a `vllm` package is installed, else why not: a check that imports nothing (pre-flight)."""
    return None if importlib.util.find_spec("vllm") is not None else "No module named 'vllm'"


def import_vllm() -> ModuleType:
    """vLLM, or EngineUnavailableError with a one-line message saying how to get it."""
    # VLLM_NO_USAGE_STATS is set by the CLI (service/lmserve/cli.py), the only place that touches the environment.
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as exc:
        raise EngineUnavailableError(unavailable_message(" ".join(str(exc).split()))) from None
    version = str(getattr(vllm, "__version__", "?"))
    if not version.startswith(VLLM_VERSION.rsplit(".", 1)[0]):
        log.warning("vLLM %s found; lmserve's vLLM backend is written for %s", version, VLLM_VERSION)
    return vllm


class VLLMEngine:
    """GenerationEngine over vLLM's AsyncLLM (see the module docstring)."""

    def __init__(self, vllm_config: Any, tokenizer: Tokenizer, model_name: str) -> None:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VLLMSamplingParams

        self.vllm_config = vllm_config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.family = f"{getattr(vllm_config.model_config.hf_config, 'model_type', 'unknown')} (vllm)"
        self.max_model_len: int = int(vllm_config.model_config.max_model_len)
        self.vocab_size: int = int(vllm_config.model_config.get_vocab_size())
        self._sampling_params_cls = VLLMSamplingParams
        self._delta_kind = RequestOutputKind.DELTA
        self._stats = VLLMStatsCollector()
        self._ids = itertools.count()
        self._llm: Any = None
        # LoRA adapters by name: vLLM's LoRARequest for each, and when it was loaded.
        self._loras: dict[str, tuple[Any, int]] = {}
        self._lora_ids = itertools.count(1)
        self._lora_modules: tuple[tuple[str, Path], ...] = ()
        self._max_lora_rank = 0

    @classmethod
    def load(cls, model_path: Path, model_name: str, engine: EngineConfig, settings: VLLMConfig) -> VLLMEngine:
        """vLLM's resolved configuration for the model folder (weights load in `start`)."""
        import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext

        args = AsyncEngineArgs(**vllm_engine_kwargs(model_path, model_name, engine, settings))
        # The API server's context gives the defaults `vllm serve` has (e.g. the per-step token budget).
        vllm_config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        backend = cls(vllm_config, Tokenizer.from_folder(model_path), model_name)
        backend._lora_modules, backend._max_lora_rank = engine.lora_modules, engine.max_lora_rank
        if engine.lora_enabled:
            for name, path in engine.lora_modules:  # checked now, registered with vLLM once it runs (start)
                read_lora_adapter(path, engine.max_lora_rank)
        return backend

    @property
    def on_step(self) -> Callable[[StepStats], None] | None:
        return self._stats.on_step

    @on_step.setter
    def on_step(self, hook: Callable[[StepStats], None] | None) -> None:
        self._stats.on_step = hook

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn vLLM's engine core and load the weights (minutes on a CPU); blocks the loop meanwhile,
        which is before anything is served."""
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_vllm_config(
            self.vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[self._stats.logger_factory()],
            disable_log_stats=True,
        )
        for name, path in self._lora_modules:
            await self.load_lora_adapter(name, str(path))

    async def stop(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()  # aborts what is left, stops the engine core and its workers

    @property
    def is_alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def stats(self) -> EngineStats:
        cache = self.vllm_config.cache_config
        num_blocks = int(cache.num_gpu_blocks or 0)  # set once the engine core has sized its KV cache
        return EngineStats(
            num_running=self._stats.num_running,
            num_waiting=self._stats.num_waiting,
            num_kv_blocks_used=round(self._stats.kv_cache_usage * num_blocks),
            num_kv_blocks_total=num_blocks,
            block_size=int(cache.block_size),
            is_alive=self.is_alive,
            num_steps_total=self._stats.num_steps,
            num_preemptions_total=self._stats.num_preemptions,
            num_prefix_cache_query_tokens_total=self._stats.num_prefix_query_tokens,
            num_prefix_cache_hit_tokens_total=self._stats.num_prefix_hit_tokens,
        )

    # ---- LoRA adapters ---------------------------------------------------------------------

    def lora_adapters(self) -> list[LoraAdapterInfo]:
        return [LoraAdapterInfo(name, str(req.lora_path), created) for name, (req, created) in self._loras.items()]

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Check the folder as the native engine does (config, safetensors, rank, finite values), then hand it
        to vLLM, whose own load checks it against the model."""
        from vllm.lora.request import LoRARequest

        if self.vllm_config.lora_config is None:
            raise LoraAdapterError("this server serves no LoRA adapters (start it with --lora-modules or --allow-runtime-lora)", "unsupported")
        if name in self._loras or name == self.model_name:
            raise LoraAdapterError(f"a LoRA adapter or model named {name!r} is already served", "conflict")
        try:
            await asyncio.to_thread(read_lora_adapter, Path(path), self._max_lora_rank or self.vllm_config.lora_config.max_lora_rank)
        except CheckpointError as exc:
            raise LoraAdapterError(str(exc), "invalid") from None
        request = LoRARequest(name, next(self._lora_ids), str(path))
        try:
            added = await self._llm.add_lora(request)
        except Exception as exc:  # vLLM's own checks against the model (shapes, target modules)
            raise LoraAdapterError(f"vLLM cannot load it: {exc}", "invalid") from None
        if added is False:
            raise LoraAdapterError("vLLM did not load it (see the server's log)", "invalid")
        self._loras[name] = (request, int(time.time()))

    async def unload_lora_adapter(self, name: str) -> None:
        entry = self._loras.pop(name, None)
        if entry is None:
            raise LoraAdapterError(f"no LoRA adapter named {name!r} is loaded", "not_found")
        # vLLM keeps it for the requests already running with it; new ones are refused above it (check_request).
        await self._llm.remove_lora(entry[0].lora_int_id)

    def _lora_request(self, request: GenerationRequest) -> Any:
        if request.lora is None:
            return None
        entry = self._loras.get(request.lora)
        if entry is None:
            raise RequestRejected(f"The model '{request.lora}' does not exist.", RejectReason.UNKNOWN_ADAPTER, field="model")
        return entry[0]

    # ---- requests --------------------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> None:
        self._lora_request(request)
        self._sampling_params(request)

    def _sampling_params(self, request: GenerationRequest) -> Any:
        """The request's vLLM SamplingParams, after every check vLLM would make when it is added."""
        from vllm.exceptions import VLLMValidationError

        num_prompt_tokens, max_tokens = len(request.prompt_token_ids), request.sampling.max_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            reason = RejectReason.PROMPT_TOO_LONG if num_prompt_tokens >= self.max_model_len else RejectReason.OUTPUT_TOO_LONG
            raise RequestRejected(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{num_prompt_tokens + max_tokens} tokens, more than the model's context length of {self.max_model_len}",
                reason,
                max_seq_len=self.max_model_len,
            )
        params = to_vllm_sampling(request.sampling, self._sampling_params_cls, self._delta_kind)
        config = self.vllm_config
        try:
            # vLLM's tokenizer (its structured-output checks need one; None would read as skip_tokenizer_init).
            tokenizer = self._llm.tokenizer if self._llm is not None else None
            params.verify(config.model_config, config.speculative_config, config.structured_outputs_config, tokenizer)
        except (VLLMValidationError, ValueError) as exc:
            raise rejected(exc) from None
        return params

    async def generate(self, request: GenerationRequest, *, checked: bool = False) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        if not checked:
            self.check_request(request)
        # Checked once (check_request, vLLM's own checks included): here only built; vLLM's add_request
        # checks again on its side, which the VLLMValidationError handler below answers.
        params = to_vllm_sampling(request.sampling, self._sampling_params_cls, self._delta_kind)
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        arrival = time.monotonic()
        # vLLM wants unique ids; clients may reuse theirs.
        internal_id = f"{request.request_id or 'req'}#{next(self._ids)}"
        num_prompt_tokens = len(request.prompt_token_ids)
        num_logprobs = request.sampling.logprobs
        # prompt_logprobs: owed to the first delta with tokens (vLLM sends them with the first output).
        owes_prompt_logprobs = request.sampling.prompt_logprobs is not None
        num_output_tokens = 0
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        outputs = self._llm.generate(prompt, params, internal_id, lora_request=self._lora_request(request))
        # The request's own deadline (timeout_s): each output is awaited for the time left; at the deadline
        # wait_for cancels the wait inside vLLM's generator, which aborts the request as a disconnect does.
        deadline = None if request.timeout_s is None else arrival + request.timeout_s
        try:
            # Leaving this block early (our stream closed or cancelled) closes vLLM's generator, which aborts
            # the request in the engine core and frees its KV blocks.
            async with aclosing(outputs):
                while True:
                    try:
                        if deadline is None:
                            output = await anext(outputs)
                        else:
                            output = await asyncio.wait_for(anext(outputs), max(deadline - time.monotonic(), 0.0))
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        # And by id: cancelled while vLLM was still adding it, the generator could not.
                        await self._llm.abort(internal_id)
                        yield timeout_delta(request, num_output_tokens)
                        return
                    completion = output.outputs[0]
                    finish_reason = self._finish_reason(completion.finish_reason)
                    token_ids = list(completion.token_ids)
                    num_output_tokens += len(token_ids)
                    if not token_ids and not completion.text and finish_reason is None:
                        continue
                    prompt_logprobs = None
                    if owes_prompt_logprobs and output.prompt_logprobs is not None:
                        prompt_logprobs = self._prompt_logprobs(request, output.prompt_logprobs)
                        owes_prompt_logprobs = False
                    yield GenerationDelta(
                        request_id=request.request_id,
                        text=completion.text,
                        token_ids=token_ids,
                        logprobs=None
                        if num_logprobs is None
                        else self._logprobs(token_ids, completion.logprobs or [], num_logprobs),
                        finish_reason=finish_reason,
                        stop_reason=completion.stop_reason if finish_reason is not None else None,
                        num_prompt_tokens=num_prompt_tokens,
                        num_output_tokens=num_output_tokens,
                        num_cached_tokens=int(output.num_cached_tokens or 0),
                        timing=None if finish_reason is None else _timing(arrival, output.metrics),
                        prompt_logprobs=prompt_logprobs,
                    )
                    if finish_reason is not None:
                        return
        except VLLMEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine died: {exc}") from exc
        except VLLMValidationError as exc:  # check_request mirrors vLLM's checks; this is the backstop
            raise rejected(exc) from exc
        except Exception as exc:
            if isinstance(exc, (RequestRejected, EngineDeadError, VLLMRequestError)):
                raise
            raise VLLMRequestError(f"vLLM failed the request: {exc!r}") from exc

    @staticmethod
    def _finish_reason(reason: str | None) -> FinishReason | None:
        if reason is None:
            return None
        if reason in _FINISH_REASONS:
            return _FINISH_REASONS[reason]
        # "error" (a request-level failure in vLLM); "repetition" needs repetition_detection, never set here.
        raise VLLMRequestError(f"vLLM ended the request with finish reason {reason!r}")

    def _logprobs(self, token_ids: Sequence[int], positions: Sequence[Mapping[int, Any]], k: int) -> list[TokenLogprob]:
        """Ours from vLLM's: each position maps the sampled token and the top k to Logprob(logprob, rank)."""
        out: list[TokenLogprob] = []
        for token_id, position in zip(token_ids, positions, strict=True):
            top = sorted(
                ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k),
                key=lambda item: item[1].rank,
            )
            # Token strings as the native engine gives them (the tokenizer's pieces), not vLLM's decoded text.
            strs = self.tokenizer.convert_ids_to_tokens([token_id] + [tid for tid, _ in top])
            out.append(
                TokenLogprob(
                    token_id=token_id,
                    token=strs[0],
                    logprob=float(position[token_id].logprob),
                    top=tuple(
                        TopLogprob(token_id=tid, token=s, logprob=float(lp.logprob))
                        for (tid, lp), s in zip(top, strs[1:], strict=True)
                    ),
                )
            )
        return out


    def _prompt_logprobs(
        self, request: GenerationRequest, positions: Sequence[Mapping[int, Any] | None]
    ) -> list[PromptLogprob | None]:
        """Ours from vLLM's prompt_logprobs: per prompt token (the first None), a map of the prompt's token and
        the top k to Logprob(logprob, rank)."""
        k = request.sampling.prompt_logprobs or 0
        out: list[PromptLogprob | None] = [None]
        for token_id, position in zip(request.prompt_token_ids[1:], list(positions)[1:], strict=True):
            assert position is not None
            top = sorted(
                ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k),
                key=lambda item: item[1].rank,
            )
            strs = self.tokenizer.convert_ids_to_tokens([token_id] + [tid for tid, _ in top])
            chosen = position[token_id]
            out.append(
                PromptLogprob(
                    token_id=token_id,
                    token=strs[0],
                    logprob=float(chosen.logprob),
                    rank=int(chosen.rank or 0),
                    top=tuple(
                        TopLogprob(token_id=tid, token=s, logprob=float(lp.logprob))
                        for (tid, lp), s in zip(top, strs[1:], strict=True)
                    ),
                )
            )
        return out


def _timing(arrival: float, stats: Any) -> RequestTiming:
    """RequestTiming from vLLM's RequestStateStats. Its *_ts fields are the engine core's time.monotonic(),
    the same clock as ours on one host (CLOCK_MONOTONIC); 0.0 means the event did not happen."""
    now = time.monotonic()
    if stats is None:
        return RequestTiming(arrival_time=arrival, first_scheduled_time=None, first_token_time=None, finished_time=now)
    return RequestTiming(
        arrival_time=arrival,
        first_scheduled_time=stats.scheduled_ts or None,
        first_token_time=stats.first_token_ts or None,
        finished_time=stats.last_token_ts or now,
        num_preemptions=int(stats.num_preemptions),
    )
