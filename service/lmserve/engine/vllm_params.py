"""What `--engine vllm` hands vLLM: its engine arguments for our configuration (`vllm_engine_kwargs`) and its
SamplingParams for ours (`to_vllm_sampling`), with a RequestRejected naming the parameter wherever vLLM would
change or refuse a value. Imports nothing of vLLM's but its structured-output parameters, when used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmserve.config import EngineConfig, VLLMConfig
from lmserve.engine.base import RejectReason, RequestRejected
from lmserve.types import ConstraintKind, SamplingParams, StructuredOutput

# vLLM raises any temperature in (0, 0.01) to 0.01 with a warning (sampling_params._MAX_TEMP): such a
# value cannot be passed through as asked, so it is refused.
VLLM_MIN_TEMPERATURE = 1e-2
# vLLM reads seed -1 as "no seed" (sampling_params.SamplingParams.__post_init__).
VLLM_NO_SEED = -1

# Our sampling fields, to name the parameter in a vLLM validation message that does not name it itself.
_PARAM_NAMES = tuple(SamplingParams.__dataclass_fields__)


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
        prompt_logprobs=params.prompt_logprobs,
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


def rejected(exc: Exception) -> RequestRejected:
    """vLLM's refusal of a sampling value, naming the field where vLLM or its message does."""
    field = getattr(exc, "parameter", None) or _param_in(str(exc))
    if field is not None and field.startswith("structured"):
        return RequestRejected(str(exc), RejectReason.INVALID_CONSTRAINT, field="structured")
    return RequestRejected(str(exc), RejectReason.UNSUPPORTED_VALUE, field=field)
