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
change a value, check_request refuses it with a 400 naming the parameter (see `to_vllm_sampling`).
EngineStats come from vLLM's own per-step SchedulerStats and IterationStats, through a stat logger that
vLLM calls after every step.

vLLM is imported only here and only when this engine is loaded; without it, `load` raises
EngineUnavailableError, which the CLI prints as one `error:` line.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import json
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
from lmserve.tokenizer import Tokenizer
from lmserve.types import (
    ConstraintKind,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    RequestTiming,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"  # the version this adapter is written and tested against (pyproject's `vllm` extra)
# vLLM raises any temperature in (0, 0.01) to 0.01 with a warning (sampling_params._MAX_TEMP): such a
# value cannot be passed through as asked, so it is refused.
VLLM_MIN_TEMPERATURE = 1e-2
# vLLM reads seed -1 as "no seed" (sampling_params.SamplingParams.__post_init__).
VLLM_NO_SEED = -1

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
# Our sampling fields, to name the parameter in a vLLM validation message that does not name it itself.
_PARAM_NAMES = tuple(SamplingParams.__dataclass_fields__)


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


def vllm_engine_kwargs(model_path: Path, model_name: str, engine: EngineConfig, settings: VLLMConfig) -> dict[str, Any]:
    """vLLM's AsyncEngineArgs for our configuration. Unset settings are left out, so vLLM's defaults apply."""
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "served_model_name": model_name,
        "dtype": engine.dtype,  # the same names; "auto" is vLLM's auto (the checkpoint's dtype, fp32 served as 16-bit)
        "max_model_len": engine.max_model_len,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        # vLLM's logging stat logger stays off; ours (below) receives the same per-step statistics.
        "disable_log_stats": True,
        # Per-step batch sizes and durations, for on_step and the steps counter.
        "enable_logging_iteration_details": True,
    }
    optional = {
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "distributed_executor_backend": settings.distributed_executor_backend,
        "kv_cache_memory_bytes": settings.kv_cache_memory_bytes,
        "block_size": settings.block_size,
        "num_gpu_blocks_override": settings.num_kv_blocks,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
    }
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    if engine.lora_enabled:  # vLLM's own LoRA support: adapters per request, batched (Punica kernels)
        kwargs.update(enable_lora=True, max_loras=engine.max_loras, max_lora_rank=engine.max_lora_rank,
                      max_cpu_loras=max(engine.num_cpu_loras, engine.max_loras))  # fmt: skip
    return kwargs


def to_vllm_sampling(params: SamplingParams, vllm_sampling_params: type, delta_kind: Any) -> Any:
    """vLLM's SamplingParams for ours; RequestRejected (naming the parameter) for what vLLM would change.

    Every field has the same meaning on both sides (the native sampler follows vLLM's order: logit bias,
    min_tokens, penalties, then temperature, top-k/top-p/min-p; logprobs of the raw logits).
    """
    if 0.0 < params.temperature < VLLM_MIN_TEMPERATURE:
        raise RequestRejected(
            f"temperature {params.temperature} is below {VLLM_MIN_TEMPERATURE}, the smallest the vLLM engine samples "
            f"at (it would raise it to {VLLM_MIN_TEMPERATURE}); use 0 for greedy decoding",
            RejectReason.UNSUPPORTED_VALUE,
            field="temperature",
        )
    if params.speculative_tokens:
        raise RequestRejected(
            "speculative_tokens (prompt-lookup speculative decoding) is a native-engine feature; the vLLM engine "
            "does not speculate per request",
            RejectReason.UNSUPPORTED_VALUE,
            field="speculative_tokens",
        )
    if params.seed == VLLM_NO_SEED:
        raise RequestRejected(
            f"seed {VLLM_NO_SEED} means 'no seed' to the vLLM engine; choose another seed",
            RejectReason.UNSUPPORTED_VALUE,
            field="seed",
        )
    logit_bias: dict[int, float] = {}
    for token_id, bias in params.logit_bias:  # a token listed twice gets both biases, as in the native sampler
        logit_bias[token_id] = logit_bias.get(token_id, 0.0) + bias
    return vllm_sampling_params(
        n=1,  # the API fans n out into separate requests (seed + j each)
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=logit_bias or None,
        seed=params.seed,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        structured_outputs=_vllm_constraint(params.structured),
        output_kind=delta_kind,
    )


def _vllm_constraint(structured: StructuredOutput | None) -> Any:
    """vLLM's StructuredOutputsParams for our constraint (the same kinds, compiled by vLLM's backend)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    kind, spec = structured.kind, structured.spec
    if kind is ConstraintKind.JSON_SCHEMA:
        return StructuredOutputsParams(json=spec)
    if kind is ConstraintKind.JSON_OBJECT:
        return StructuredOutputsParams(json_object=True)
    if kind is ConstraintKind.REGEX:
        return StructuredOutputsParams(regex=spec)
    if kind is ConstraintKind.CHOICE:
        return StructuredOutputsParams(choice=list(json.loads(spec)))
    return StructuredOutputsParams(grammar=spec)


def _param_in(message: str) -> str | None:
    return next((name for name in _PARAM_NAMES if name in message), None)


def _rejected(exc: Exception) -> RequestRejected:
    """vLLM's refusal of a sampling value, naming the field where vLLM or its message does."""
    field = getattr(exc, "parameter", None) or _param_in(str(exc))
    if field is not None and field.startswith("structured"):
        return RequestRejected(str(exc), RejectReason.INVALID_CONSTRAINT, field="structured")
    return RequestRejected(str(exc), RejectReason.UNSUPPORTED_VALUE, field=field)


class VLLMStatsCollector:
    """vLLM's per-step statistics, kept the way EngineStats reports them.

    vLLM calls `record` (through the stat logger `logger_factory` makes) from AsyncLLM's output handler,
    on the event loop, once per engine step's outputs.
    """

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.on_step: Callable[[StepStats], None] | None = None

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        num_preempted = 0 if iteration_stats is None else int(iteration_stats.num_preempted_reqs)
        self.num_preemptions += num_preempted
        if scheduler_stats is None:
            return
        self.num_running = int(scheduler_stats.num_running_reqs)
        self.num_waiting = int(scheduler_stats.num_waiting_reqs) + int(scheduler_stats.num_skipped_waiting_reqs)
        self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        prefix = scheduler_stats.prefix_cache_stats
        # New admissions and re-admissions after preemption alike, as the native engine counts them.
        self.num_prefix_query_tokens += int(prefix.queries) + int(prefix.preempted_queries)
        self.num_prefix_hit_tokens += int(prefix.hits) + int(prefix.preempted_hits)
        details = scheduler_stats.iteration_details  # None for a step that computed nothing
        if details is None or details.is_dummy:
            return
        self.num_steps += 1
        if self.on_step is not None:
            self.on_step(
                StepStats(
                    num_scheduled_seqs=int(details.num_ctx_requests + details.num_generation_requests),
                    num_batched_tokens=int(details.num_ctx_tokens + details.num_generation_tokens),
                    num_preempted=num_preempted,
                    duration_s=float(details.elapsed_ms) / 1000.0,
                )
            )

    def logger_factory(self) -> Callable[[Any, int], Any]:
        """A per-engine stat logger class for AsyncLLM(stat_loggers=[...]) that forwards to this collector."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        collector = self

        class _ForwardingStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
            ) -> None:
                collector.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _ForwardingStatLogger


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
            raise _rejected(exc) from None
        return params

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        params = self._sampling_params(request)
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        arrival = time.monotonic()
        # vLLM wants unique ids; clients may reuse theirs.
        internal_id = f"{request.request_id or 'req'}#{next(self._ids)}"
        num_prompt_tokens = len(request.prompt_token_ids)
        num_logprobs = request.sampling.logprobs
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
                    )
                    if finish_reason is not None:
                        return
        except VLLMEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine died: {exc}") from exc
        except VLLMValidationError as exc:  # check_request mirrors vLLM's checks; this is the backstop
            raise _rejected(exc) from exc
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
