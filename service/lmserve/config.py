"""Configuration: frozen dataclasses built once at the edge. The only reader of LMSERVE_* variables."""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("LMSERVE_CACHE_DIR") or Path.home() / ".cache" / "lmserve")


def default_c_compiler(environ: dict[str, str] | None = None) -> str:
    """The C compiler for the kernels: $CC (as make and pip honour it), else the one Python was built with,
    else `cc`; its first word (a CC of "gcc -pthread" names gcc)."""
    env = os.environ if environ is None else environ
    command = env.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return command.split()[0]


MODEL_IMPLS = ("auto", "native", "transformers")  # --model-impl
# vLLM's names; api/tool_formats.py and api/reasoning.py implement exactly these (tests/api/test_tool_formats.py).
TOOL_CALL_PARSERS = ("hermes", "mistral", "llama3_json", "pythonic")  # --tool-call-parser
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # --reasoning-parser
# --kernel-variant: the C kernels' instruction-set variants (engine/modeling/kernel_cache.VARIANTS), best first.
KERNEL_VARIANTS = ("auto", "avx512-bf16", "avx512-vnni", "avx512", "avx2", "native")


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the native generation engine."""

    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_bytes: int = 1 << 30  # budget for the KV pool; ignored when num_kv_blocks is set
    num_kv_blocks: int | None = None  # exact pool size (tests use it to force preemption)
    max_num_seqs: int = 256  # most sequences in one step's batch
    max_num_batched_tokens: int = 512  # the per-step token budget (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the checkpoint's own context length
    enable_prefix_caching: bool = True
    # Speculative decoding by prompt lookup: draft tokens per step for requests that do not set their own
    # (0: off), and the n-gram sizes matched against the sequence, longest first.
    speculative_tokens: int = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    attention: str = "auto"  # auto: the C paged-attention kernel where it builds, else torch ops | kernel | torch
    # auto: lmserve's own modules where the family has a spec, else transformers' class over the paged cache;
    # native: require the former; transformers: the latter for any family (checkpoints/architectures.py)
    model_impl: str = "auto"
    # none | int8 | q4_1 | q8_0: int8: the decoder's projections and the LM head as int8 weights with per-channel
    # scales, times activations quantized per 32 values of a row (qgemm.c under float32 activations, qgemm_vnni.c
    # under bf16 ones where the CPU has AVX-512 VNNI and BF16); q4_1 | q8_0: a GGUF checkpoint's linear layers as
    # the file's own blocks, times activations quantized per block (qgemm_gguf.c; float32 activations). CPU only.
    # none: the float paths, unchanged.
    quantization: str = "none"
    num_threads: int | None = None  # torch intra-op threads on CPU; None: every core
    # LoRA adapters served beside the base, chosen per request by name (engine/modeling/lora.py): those
    # registered at start, the slots for adapters in one step, the highest rank taken, the host-memory
    # copies kept (None: max_loras), and whether /v1/load_lora_adapter may add more at run time.
    lora_modules: tuple[tuple[str, Path], ...] = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    allow_runtime_lora: bool = False
    allow_pickle: bool = False  # load .bin (pickle) checkpoints only when set
    # The C kernels are built into cache_dir/kernels (the same cache as ServeConfig.cache_dir) with c_compiler.
    cache_dir: Path = field(default_factory=default_cache_dir)
    c_compiler: str = field(default_factory=default_c_compiler)
    # Which instruction-set build of the C kernels to load (KERNEL_VARIANTS); auto: the best this CPU runs.
    kernel_variant: str = "auto"

    def __post_init__(self) -> None:
        if self.speculative_tokens < 0:
            raise ValueError("--speculative-tokens must be 0 (off) or more")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("--prompt-lookup-min must be at least 1 and at most --prompt-lookup-max")
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"--model-impl must be one of {', '.join(MODEL_IMPLS)}, not {self.model_impl!r}")
        if self.kernel_variant not in KERNEL_VARIANTS:
            raise ValueError(f"--kernel-variant must be one of {', '.join(KERNEL_VARIANTS)}, not {self.kernel_variant!r}")
        if self.max_loras < 1 or self.max_lora_rank < 1 or (self.max_cpu_loras is not None and self.max_cpu_loras < 1):
            raise ValueError("--max-loras, --max-lora-rank and --max-cpu-loras must be at least 1")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"--lora-modules names the same adapter twice: {sorted(n for n in names if names.count(n) > 1)[0]}")

    @property
    def lora_enabled(self) -> bool:
        return bool(self.lora_modules) or self.allow_runtime_lora

    @property
    def num_cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


@dataclass(frozen=True)
class VLLMConfig:
    """Settings handed to vLLM's engine with `--engine vllm`; None leaves vLLM's own default.

    dtype, max_model_len and prefix caching come from EngineConfig, whose meaning is the same for
    both engines; these are the knobs only vLLM has, and the native knobs that vLLM should see
    only when they were asked for (their native defaults would be wrong on a GPU: a 1 GiB KV pool,
    512 tokens per step).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # vLLM: 0.9 of GPU memory (of CPU memory on its CPU build)
    distributed_executor_backend: str | None = None  # mp | ray; None: vLLM picks (ray when the world spans nodes)
    kv_cache_memory_bytes: int | None = None
    block_size: int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
        if self.gpu_memory_utilization is not None and not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError("--distributed-executor-backend must be mp or ray")

    @property
    def has_vllm_only_settings(self) -> bool:
        return (
            self.tensor_parallel_size != 1
            or self.pipeline_parallel_size != 1
            or self.gpu_memory_utilization is not None
            or self.distributed_executor_backend is not None
        )


@dataclass(frozen=True)
class LimitsConfig:
    """Caps enforced by api/ on both transports."""

    max_request_body_bytes: int = 4 << 20
    max_n: int = 16
    max_tokens_cap: int = 4096
    max_stop_strings: int = 8
    max_prompts: int = 64
    max_queue: int = 256  # admitted-but-unfinished requests before 503 server_overloaded
    # Seconds an admitted generation request may wait in the engine's queue before its first step; past it,
    # 503 queue_timeout with Retry-After instead of an ever longer wait. 0: no bound.
    queue_timeout_s: float = 60.0
    requests_per_minute: int = 0  # per API key; 0: unlimited
    tokens_per_minute: int = 0
    embedding_max_batch_tokens: int = 8192
    max_embedding_inputs: int = 2048  # inputs in one /v1/embeddings request (OpenAI's cap)
    max_rerank_documents: int = 1000  # documents in one rerank request, pairs in one score request (Cohere's cap)
    max_grammar_bytes: int = 64 * 1024  # a structured-output schema, regex, grammar or tool set; larger: 400
    # The Responses API's in-memory store (`store: true`), server-wide: the oldest response is evicted past
    # either bound; 0 responses: nothing is stored.
    responses_store_max_responses: int = 1000
    responses_store_max_bytes: int = 64 << 20


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL
    embedding_model: str | None = DEFAULT_EMBEDDING_MODEL
    # The ids clients use (--served-model-name): the first is listed and echoed, all are accepted; empty:
    # the model's own name (and the reference it was loaded from).
    served_model_names: tuple[str, ...] = ()
    served_embedding_model_names: tuple[str, ...] = ()
    rerank_model: str | None = None  # a cross-encoder folder for /v1/rerank and /v1/score; None: not served
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051  # 0: no gRPC
    grpc_tls_cert: Path | None = None  # PEM; with grpc_tls_key, gRPC serves TLS only
    grpc_tls_key: Path | None = None
    grpc_tls_client_ca: Path | None = None  # PEM CA; set: clients must present a certificate it signed (mTLS)
    engine_kind: str = "native"  # native | vllm
    api_key_file: str | None = None
    api_keys: tuple[str, ...] = ()
    metrics_open: bool = False  # /metrics readable without an API key
    cors_origins: tuple[str, ...] = ()
    # How chat output is read: the tool-call format and the reasoning parser (None: the chat template's,
    # where it shows one; api/tool_formats.py, api/reasoning.py).
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    log_format: str = "json"  # json | text
    log_level: str = "info"  # debug | info | warning | error
    log_prompts: bool = False  # the access line carries prompts and outputs (off: they are never logged)
    otlp_endpoint: str | None = None  # OTLP/HTTP collector base URL; None: no tracing
    safety: bool = True  # the safety filter on input and output (--no-safety turns it off)
    safety_policy: Path | None = None  # a policy YAML; None: the packaged default policy
    drain_timeout_s: float = 30.0  # on SIGTERM: readyz 503, wait this long for in-flight requests, then exit
    cache_dir: Path = field(default_factory=default_cache_dir)
    engine: EngineConfig = field(default_factory=EngineConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # used with engine_kind "vllm" only
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        if self.engine_kind == "native" and self.vllm.has_vllm_only_settings:
            raise ValueError(
                "--tensor-parallel-size, --pipeline-parallel-size, --gpu-memory-utilization and "
                "--distributed-executor-backend need --engine vllm"
            )
        if self.engine_kind == "vllm":
            # vLLM chooses its device from the platform it was built for and runs its own kernels.
            if self.engine.device != "auto":
                raise ValueError("--device is not used with --engine vllm (vLLM's build decides the device)")
            if self.engine.attention != "auto":
                raise ValueError("--attention is not used with --engine vllm (vLLM runs its own attention)")
            if self.engine.model_impl != "auto":
                raise ValueError("--model-impl is the native engine's choice, not used with --engine vllm")
            if self.engine.kernel_variant != "auto":
                raise ValueError("--kernel-variant chooses the native engine's C kernels, not used with --engine vllm")
            if self.engine.speculative_tokens:
                raise ValueError(
                    "--speculative-tokens is the native engine's prompt lookup, not used with --engine vllm "
                    "(vLLM's speculative decoding is not configured through lmserve)"
                )
            if self.engine.quantization != "none":
                raise ValueError("--quantization is not used with --engine vllm (it is the native engine's C kernels)")
            if self.engine.num_threads is not None:
                raise ValueError(
                    "--num-threads is not used with --engine vllm (its CPU build reads VLLM_CPU_OMP_THREADS_BIND)"
                )
        shared = set(self.served_model_names) & set(self.served_embedding_model_names)
        if shared:
            raise ValueError(f"a served model name names both models: {', '.join(sorted(shared))}")
        if self.served_embedding_model_names and not self.embedding_model:
            raise ValueError("--served-embedding-model-name needs an embedding model (not --embedding-model none)")
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("gRPC TLS needs both a certificate and a key (--grpc-tls-cert and --grpc-tls-key)")
        if self.grpc_tls_client_ca is not None and self.grpc_tls_cert is None:
            raise ValueError("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def parse_bool(value: str) -> bool:
    """An LMSERVE_* switch: 1/true/yes/on or 0/false/no/off (any case); anything else is an error."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected one of 1, true, yes, on, 0, false, no, off; got {value!r}")


def _env_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _env_number(environ: dict[str, str], var: str, kind: type, minimum: float) -> int | float:
    raw = environ[var]
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{var}={raw!r} must be a finite number of at least {minimum}")
    return value


# LMSERVE_* variable -> (LimitsConfig field, smallest value); all integers
_LIMIT_VARS = {
    "LMSERVE_MAX_REQUEST_BODY_BYTES": ("max_request_body_bytes", 1024),
    "LMSERVE_MAX_N": ("max_n", 1),
    "LMSERVE_MAX_TOKENS_CAP": ("max_tokens_cap", 1),
    "LMSERVE_MAX_STOP_STRINGS": ("max_stop_strings", 0),
    "LMSERVE_MAX_PROMPTS": ("max_prompts", 1),
    "LMSERVE_MAX_QUEUE": ("max_queue", 1),
    "LMSERVE_REQUESTS_PER_MINUTE": ("requests_per_minute", 0),
    "LMSERVE_TOKENS_PER_MINUTE": ("tokens_per_minute", 0),
    "LMSERVE_EMBEDDING_MAX_BATCH_TOKENS": ("embedding_max_batch_tokens", 1),
    "LMSERVE_MAX_EMBEDDING_INPUTS": ("max_embedding_inputs", 1),
    "LMSERVE_RESPONSES_STORE_MAX_RESPONSES": ("responses_store_max_responses", 0),
    "LMSERVE_RESPONSES_STORE_MAX_BYTES": ("responses_store_max_bytes", 0),
    "LMSERVE_MAX_RERANK_DOCUMENTS": ("max_rerank_documents", 1),
}


def serve_config_from_env(environ: dict[str, str]) -> dict:
    """ServeConfig fields that come only from LMSERVE_* variables (the CLI has no flag for them).

    LMSERVE_API_KEYS (comma-separated), LMSERVE_METRICS_OPEN, LMSERVE_CORS_ORIGINS (comma-separated),
    LMSERVE_OTLP_ENDPOINT, LMSERVE_DRAIN_TIMEOUT_S and the limits in _LIMIT_VARS. Unset variables are left
    out, so the dataclass defaults stay the single source of defaults. A malformed value is a ValueError
    naming the variable.
    """
    out: dict = {}
    if environ.get("LMSERVE_API_KEYS"):
        out["api_keys"] = _env_list(environ["LMSERVE_API_KEYS"])
    if "LMSERVE_METRICS_OPEN" in environ:
        try:
            out["metrics_open"] = parse_bool(environ["LMSERVE_METRICS_OPEN"])
        except ValueError as exc:
            raise ValueError(f"LMSERVE_METRICS_OPEN: {exc}") from None
    if environ.get("LMSERVE_CORS_ORIGINS"):
        out["cors_origins"] = _env_list(environ["LMSERVE_CORS_ORIGINS"])
    if environ.get("LMSERVE_OTLP_ENDPOINT"):
        out["otlp_endpoint"] = environ["LMSERVE_OTLP_ENDPOINT"]
    if environ.get("LMSERVE_DRAIN_TIMEOUT_S"):
        out["drain_timeout_s"] = float(_env_number(environ, "LMSERVE_DRAIN_TIMEOUT_S", float, 0.0))
    limits = {
        field_name: int(_env_number(environ, var, int, minimum))
        for var, (field_name, minimum) in _LIMIT_VARS.items()
        if environ.get(var)
    }
    if limits:
        out["limits"] = LimitsConfig(**limits)
    return out
