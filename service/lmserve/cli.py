"""`lmserve` command line: serve, generate, models, cache, export (the commands are cli_commands.py's).

Flags and LMSERVE_* variables become a ServeConfig here, once; nothing below reads either. Every value is
checked as it is parsed: a bad flag is an argparse error (exit 2, one `error:` line), a bad variable an
`error: LMSERVE_PORT='abc': ...` line (exit 2), never a traceback from deep inside.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from lmserve.cli_args import (
    PORT, EnvError, Flags, HelpFormatter, device_name, float_in, int_at_least, lora_module, lora_module_list, one_of,
)
from lmserve.cli_commands import cmd_cache, cmd_export, cmd_generate, cmd_models, cmd_serve
from lmserve.config import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    KERNEL_VARIANTS,
    MODEL_IMPLS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    EngineConfig,
    LimitsConfig,
    ServeConfig,
    VLLMConfig,
    default_cache_dir,
    serve_config_from_env,
)
from lmserve.logs import LOG_FORMATS, LOG_LEVELS

# `lmserve generate`'s sampling defaults (the HTTP API has OpenAI's own: temperature 1, max_tokens 16).
GENERATE_MAX_TOKENS = 128
GENERATE_TEMPERATURE = 0.0
GENERATE_TOP_P = 1.0


def add_engine_flags(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    d = EngineConfig()
    f = Flags(p, env)
    f.value("--model", "LMSERVE_MODEL", str, DEFAULT_MODEL,
            "generation model: a bundled id (lmserve models), a Hugging Face folder, a .gguf file or a LoRA "
            "adapter folder; nothing is downloaded", metavar="REF")
    f.value("--dtype", "LMSERVE_DTYPE", one_of(("auto", "float32", "bfloat16", "float16")), d.dtype,
            "weights and KV cache dtype; auto: bfloat16 on CPUs with AVX-512-BF16/AMX and on CUDA GPUs with "
            "bf16, else float32", choices=["auto", "float32", "bfloat16", "float16"])
    f.value("--device", "LMSERVE_DEVICE", device_name, d.device, "auto | cpu | cuda | cuda:N; auto: cuda when "
            "available, else cpu")
    # Unset (None) sizing flags mean "the engine's own default": the native engine's below, vLLM's own with
    # --engine vllm, so that vLLM sees only the values that were asked for.
    f.value("--kv-cache-memory", "LMSERVE_KV_CACHE_GIB", float_in(0.0, exclusive_min=True), None,
            f"KV pool budget in GiB (ignored with --num-kv-blocks); unset: {d.kv_cache_memory_bytes / 2**30:g} "
            "on the native engine, vLLM's sizing by --gpu-memory-utilization with --engine vllm", metavar="GIB")
    f.value("--num-kv-blocks", "LMSERVE_NUM_KV_BLOCKS", int_at_least(1), d.num_kv_blocks,
            "exact KV pool size in blocks; unset: as many as --kv-cache-memory holds", metavar="N")
    f.value("--block-size", "LMSERVE_BLOCK_SIZE", int_at_least(1), None,
            f"tokens per KV block; unset: {d.block_size} on the native engine, vLLM's default with --engine vllm",
            metavar="N")
    f.value("--max-num-seqs", "LMSERVE_MAX_NUM_SEQS", int_at_least(1), None,
            f"most sequences in one engine step; unset: {d.max_num_seqs} on the native engine, vLLM's default "
            "with --engine vllm", metavar="N")
    f.value("--max-num-batched-tokens", "LMSERVE_MAX_NUM_BATCHED_TOKENS", int_at_least(1), None,
            f"token budget of one engine step (prefill chunks plus decodes); unset: {d.max_num_batched_tokens} on "
            "the native engine, vLLM's default with --engine vllm", metavar="N")
    f.value("--max-model-len", "LMSERVE_MAX_MODEL_LEN", int_at_least(1), d.max_model_len,
            "context length (prompt + output tokens); unset: the checkpoint's own", metavar="N")
    f.switch("--no-prefix-caching", "LMSERVE_NO_PREFIX_CACHING", "do not reuse the KV blocks of shared prompt prefixes")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM's spelling of the prefix-cache switch (on unless turned off); must agree with "
                   "--no-prefix-caching")
    f.value("--speculative-tokens", "LMSERVE_SPECULATIVE_TOKENS", int_at_least(0), d.speculative_tokens,
            "speculative decoding by prompt lookup: draft tokens per step for requests that do not set "
            "speculative_tokens themselves; 0: off", metavar="K")
    f.value("--prompt-lookup-min", "LMSERVE_PROMPT_LOOKUP_MIN", int_at_least(1), d.prompt_lookup_min,
            "shortest n-gram prompt lookup matches against the sequence", metavar="N")
    f.value("--prompt-lookup-max", "LMSERVE_PROMPT_LOOKUP_MAX", int_at_least(1), d.prompt_lookup_max,
            "longest n-gram prompt lookup matches (tried first)", metavar="N")
    f.value("--num-threads", "LMSERVE_NUM_THREADS", int_at_least(1), d.num_threads,
            "CPU threads for the model; unset: every core", metavar="N")
    f.value("--attention", "LMSERVE_ATTENTION", one_of(("auto", "kernel", "torch")), d.attention,
            "auto: the C kernels where a compiler builds them; kernel: require them; torch: torch ops only",
            choices=["auto", "kernel", "torch"])
    f.value("--model-impl", "LMSERVE_MODEL_IMPL", one_of(MODEL_IMPLS), d.model_impl,
            "auto: lmserve's own modules where the model's family has them, else transformers' model class over "
            "the paged KV cache; native: require the former; transformers: the latter (any decoder family)",
            choices=list(MODEL_IMPLS))
    f.value("--quantization", "LMSERVE_QUANTIZATION", one_of(("none", "int8", "q4_1", "q8_0")), d.quantization,
            "none: the weights in --dtype; int8: the decoder's projections and the LM head as int8 weights with "
            "per-channel scales times int8 activations (a scale per 32 values); q4_1 | q8_0: a GGUF model's linear "
            "layers served as the file stores them, in its own Q4_1 / Q8_0 blocks (the file's linears must be that "
            "type). C kernels, on CPU: float32 activations (--dtype float32), or for int8 bf16 ones where the CPU has "
            "AVX-512 VNNI and BF16 (there --dtype auto is bf16)", choices=["none", "int8", "q4_1", "q8_0"])
    f.value("--kernel-variant", "LMSERVE_KERNEL_VARIANT", one_of(KERNEL_VARIANTS), d.kernel_variant,
            "which instruction-set build of the C kernels to load; auto: the best this CPU runs (logged at start); "
            "one this CPU cannot run is refused", choices=list(KERNEL_VARIANTS))
    f.switch("--allow-pickle", "LMSERVE_ALLOW_PICKLE", "allow .bin/.pt pickle checkpoints (they can run code)")
    add_cache_dir_flag(p, env)


def add_cache_dir_flag(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    # default_cache_dir reads LMSERVE_CACHE_DIR itself; shown as the variable like the other flags.
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(dict(env)), metavar="DIR",
                   help="converted models and built kernels (lmserve cache) [env LMSERVE_CACHE_DIR]")


def _kv_cache_bytes(args: argparse.Namespace) -> int | None:
    return None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)


def _prefix_caching(args: argparse.Namespace) -> bool:
    if args.enable_prefix_caching is None:
        return not args.no_prefix_caching
    if args.enable_prefix_caching and args.no_prefix_caching:
        raise ValueError("--enable-prefix-caching and --no-prefix-caching contradict each other")
    return bool(args.enable_prefix_caching)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    d = EngineConfig()
    return EngineConfig(
        dtype=args.dtype,
        device=args.device,
        block_size=_or(args.block_size, d.block_size),
        kv_cache_memory_bytes=_or(_kv_cache_bytes(args), d.kv_cache_memory_bytes),
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=_or(args.max_num_seqs, d.max_num_seqs),
        max_num_batched_tokens=_or(args.max_num_batched_tokens, d.max_num_batched_tokens),
        max_model_len=args.max_model_len,
        enable_prefix_caching=_prefix_caching(args),
        speculative_tokens=args.speculative_tokens,
        prompt_lookup_min=args.prompt_lookup_min,
        prompt_lookup_max=args.prompt_lookup_max,
        num_threads=args.num_threads,
        attention=args.attention,
        model_impl=args.model_impl,
        quantization=args.quantization,
        kernel_variant=args.kernel_variant,
        # Serve's flags only (`lmserve generate` runs the base).
        lora_modules=tuple(getattr(args, "lora_modules", ())),
        max_loras=getattr(args, "max_loras", d.max_loras),
        max_lora_rank=getattr(args, "max_lora_rank", d.max_lora_rank),
        max_cpu_loras=getattr(args, "max_cpu_loras", d.max_cpu_loras),
        allow_runtime_lora=getattr(args, "allow_runtime_lora", False),
        allow_pickle=args.allow_pickle,
        cache_dir=args.cache_dir,  # the C kernels are built into the same cache as the converted models
    )


def add_vllm_flags(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Settings only vLLM's engine has (--engine vllm; service/lmserve/engine/vllm_backend.py)."""
    f = Flags(p, env)
    f.value("--tensor-parallel-size", "LMSERVE_TENSOR_PARALLEL_SIZE", int_at_least(1), 1,
            "with --engine vllm: GPUs each layer is split over", metavar="N")
    f.value("--pipeline-parallel-size", "LMSERVE_PIPELINE_PARALLEL_SIZE", int_at_least(1), 1,
            "with --engine vllm: pipeline stages the layers are split over (nodes, with Ray)", metavar="N")
    f.value("--gpu-memory-utilization", "LMSERVE_GPU_MEMORY_UTILIZATION", float_in(0.0, 1.0, exclusive_min=True),
            None, "with --engine vllm: fraction of GPU memory vLLM may take for weights and KV cache; unset: "
            "vLLM's 0.9", metavar="F")
    f.value("--distributed-executor-backend", "LMSERVE_DISTRIBUTED_EXECUTOR_BACKEND", one_of(("mp", "ray")), None,
            "with --engine vllm: mp, processes on this node; ray, a Ray cluster (more than one node); unset: "
            "vLLM picks", choices=["mp", "ray"])


def vllm_config_from_args(args: argparse.Namespace) -> VLLMConfig:
    """The vLLM-only flags always (the native engine refuses them); the sizing flags both engines share
    only with --engine vllm, where an unset one leaves vLLM's default."""
    config = VLLMConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        distributed_executor_backend=args.distributed_executor_backend,
    )
    if args.engine != "vllm":
        return config
    return replace(
        config,
        kv_cache_memory_bytes=_kv_cache_bytes(args),
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


GENERATE_DESCRIPTION = (
    "Print one completion of PROMPT, generated in this process (no server). Sampling defaults: greedy "
    f"decoding (--temperature {GENERATE_TEMPERATURE:g}), --top-p {GENERATE_TOP_P:g}, at most "
    f"{GENERATE_MAX_TOKENS} new tokens. --seed makes sampling with --temperature above 0 repeatable; greedy "
    "decoding needs no seed."
)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The whole CLI; raises EnvError for a malformed LMSERVE_* variable."""
    from importlib import metadata

    parser = argparse.ArgumentParser(
        prog="lmserve", description="Serve transformer checkpoints over HTTP (OpenAI API) and gRPC.",
        formatter_class=HelpFormatter,
    )
    try:
        version = metadata.version("lmserve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"lmserve {version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the models over HTTP and gRPC until Ctrl-C/SIGTERM",
                           description="Serve a generation model (and embedding and rerank models) over HTTP and gRPC. "
                           "The first Ctrl-C/SIGTERM drains (in-flight requests finish, new ones get 503); "
                           "a second one stops at once.", formatter_class=HelpFormatter)
    add_engine_flags(serve, env)
    f = Flags(serve, env)
    f.value("--embedding-model", "LMSERVE_EMBEDDING_MODEL", str, DEFAULT_EMBEDDING_MODEL,
            "embedding model: a bundled id or a folder; none: serve no embeddings", metavar="REF")
    f.value("--rerank-model", "LMSERVE_RERANK_MODEL", str, None,
            "cross-encoder folder (BERT/XLM-RoBERTa *ForSequenceClassification, one output) served on /v1/rerank, "
            "/v1/score and gRPC Rerank; unset or none: no rerank model", metavar="REF")
    f.names("--served-model-name", "LMSERVE_SERVED_MODEL_NAME",
            "the generation model's ids in the API: the first is the one /v1/models lists and responses "
            "carry, every one is accepted as `model`; unset: the model's own name")
    f.names("--served-embedding-model-name", "LMSERVE_SERVED_EMBEDDING_MODEL_NAME",
            "the same for the embedding model")
    f.value("--host", "LMSERVE_HOST", str, "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    f.value("--port", "LMSERVE_PORT", PORT, 8000, "HTTP port; 0 turns HTTP off", metavar="PORT")
    f.value("--grpc-port", "LMSERVE_GRPC_PORT", PORT, 50051, "gRPC port; 0 turns gRPC off", metavar="PORT")
    f.value("--grpc-tls-cert", "LMSERVE_GRPC_TLS_CERT", Path, None,
            "PEM certificate chain: gRPC serves TLS only (needs --grpc-tls-key)", metavar="PEM")
    f.value("--grpc-tls-key", "LMSERVE_GRPC_TLS_KEY", Path, None, "PEM private key of --grpc-tls-cert", metavar="PEM")
    f.value("--grpc-tls-client-ca", "LMSERVE_GRPC_TLS_CLIENT_CA", Path, None,
            "PEM CA: clients must present a certificate it signed (mutual TLS)", metavar="PEM")
    e = EngineConfig()
    serve.add_argument("--lora-modules", nargs="+", type=lora_module, metavar="NAME=PATH",
                       default=f.env_default("LMSERVE_LORA_MODULES", lora_module_list, ()),
                       help="PEFT LoRA adapter folders served beside the base model, each chosen per request by its "
                       "NAME as `model` (vLLM's JSON form {\"name\": ..., \"path\": ...} is taken too) "
                       "[env LMSERVE_LORA_MODULES, comma-separated]")
    f.value("--max-loras", "LMSERVE_MAX_LORAS", int_at_least(1), e.max_loras,
            "LoRA adapters one engine step can hold (slots); requests for more wait", metavar="N")
    f.value("--max-lora-rank", "LMSERVE_MAX_LORA_RANK", int_at_least(1), e.max_lora_rank,
            "the highest LoRA rank accepted (the slots are sized for it)", metavar="R")
    f.value("--max-cpu-loras", "LMSERVE_MAX_CPU_LORAS", int_at_least(1), e.max_cpu_loras,
            "adapters' factors kept in host memory, least recently used dropped (read again when needed); "
            "unset: --max-loras", metavar="N")
    f.switch("--allow-runtime-lora", "LMSERVE_ALLOW_RUNTIME_LORA",
             "allow /v1/load_lora_adapter and /v1/unload_lora_adapter (and gRPC's LoadLoraAdapter) at run time")
    serve.add_argument("--engine", choices=["native", "vllm"], default=env.get("LMSERVE_ENGINE", "native"),
                       help="generation engine [env LMSERVE_ENGINE]")
    add_vllm_flags(serve, env)
    f.value("--api-key-file", "LMSERVE_API_KEY_FILE", str, None,
            "file of API keys, one per line (blank lines and # comments skipped); unset (and no "
            "LMSERVE_API_KEYS): every endpoint is open", metavar="FILE")
    f.value("--safety-policy", "LMSERVE_SAFETY_POLICY", Path, None,
            "safety policy YAML; unset: the packaged default policy", metavar="YAML")
    f.switch("--no-safety", "LMSERVE_NO_SAFETY", "turn the safety filter off (input and output)")
    d = ServeConfig()
    f.value("--log-format", "LMSERVE_LOG_FORMAT", one_of(LOG_FORMATS), d.log_format,
            "JSON lines or plain text, on stderr", choices=LOG_FORMATS)
    f.value("--log-level", "LMSERVE_LOG_LEVEL", one_of(LOG_LEVELS, lower=True), d.log_level, "log level",
            choices=LOG_LEVELS)
    f.switch("--log-prompts", "LMSERVE_LOG_PROMPTS", "put prompts and outputs on the access lines")
    f.value("--tool-call-parser", "LMSERVE_TOOL_CALL_PARSER", one_of(TOOL_CALL_PARSERS), None,
            "the format chat tool calls are prompted for, parsed from and forced into; unset: the one the chat "
            "template writes, else hermes", choices=TOOL_CALL_PARSERS)
    f.value("--reasoning-parser", "LMSERVE_REASONING_PARSER", one_of(REASONING_PARSERS), None,
            "split <think>...</think> off chat answers into reasoning_content; unset: the chat template's "
            "(deepseek_r1 where it has DeepSeek's turns and <think>, qwen3 where it has <think>), else off",
            choices=REASONING_PARSERS)
    f.value("--queue-timeout", "LMSERVE_QUEUE_TIMEOUT_S", float_in(0.0), LimitsConfig().queue_timeout_s,
            "seconds a generation request may wait in the engine's queue before its first step; past it, 503 "
            "with Retry-After; 0: no bound", metavar="S")

    gen = sub.add_parser("generate", help="print one completion (no server)", description=GENERATE_DESCRIPTION,
                         formatter_class=HelpFormatter)
    add_engine_flags(gen, env)
    gen.add_argument("prompt", help="the prompt (with --chat: the user message)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template (prompt = user message)")
    gen.add_argument("--system", default=None, help="system message, with --chat")
    gen.add_argument("--max-tokens", type=int_at_least(1), default=GENERATE_MAX_TOKENS, metavar="N",
                     help="most new tokens")
    gen.add_argument("--temperature", type=float_in(0.0), default=GENERATE_TEMPERATURE, metavar="T",
                     help="sampling temperature; 0: greedy (the most likely token each step)")
    gen.add_argument("--top-p", type=float_in(0.0, 1.0, exclusive_min=True), default=GENERATE_TOP_P, metavar="P",
                     help="nucleus sampling mass, with --temperature above 0")
    gen.add_argument("--seed", type=int_at_least(0, 2**63 - 1), default=None, metavar="S",
                     help="random seed, with --temperature above 0 (the same seed gives the same text)")

    models = sub.add_parser("models", help="list the bundled models and the converted ones in the cache",
                            formatter_class=HelpFormatter)
    add_cache_dir_flag(models, env)

    cache = sub.add_parser("cache", help="list the cache's entries and sizes, or prune the unused ones",
                           description="The cache holds converted GGUF checkpoints, merged LoRA adapters and C "
                           "kernel builds, keyed by content so that clones share them. `prune` removes the "
                           "entries no model file, adapter or checkout uses any more.", formatter_class=HelpFormatter)
    cache.add_argument("action", nargs="?", choices=["list", "prune"], default="list", help="what to do")
    cache.add_argument("--dry-run", action="store_true", help="with prune: only say what would be removed")
    add_cache_dir_flag(cache, env)

    export = sub.add_parser("export", help="write a model as a plain Hugging Face folder", formatter_class=HelpFormatter)
    export.add_argument("ref", help="a model reference, as for --model")
    export.add_argument("dest", type=Path, help="the folder to write (absent or empty)")
    add_cache_dir_flag(export, env)
    export.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints")
    return parser


def serve_config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ServeConfig:
    embedding = None if str(args.embedding_model).lower() in {"", "none"} else args.embedding_model
    rerank = None if str(args.rerank_model).lower() in {"", "none"} else args.rerank_model
    base = ServeConfig()
    config = replace(
        base,
        model=args.model,
        embedding_model=embedding,
        rerank_model=rerank,
        served_model_names=tuple(args.served_model_name),
        served_embedding_model_names=tuple(args.served_embedding_model_name),
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        grpc_tls_cert=args.grpc_tls_cert,
        grpc_tls_key=args.grpc_tls_key,
        grpc_tls_client_ca=args.grpc_tls_client_ca,
        safety=not args.no_safety,
        safety_policy=args.safety_policy,
        engine_kind=args.engine,
        api_key_file=args.api_key_file,
        log_format=args.log_format,
        log_level=args.log_level,
        log_prompts=args.log_prompts,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        cache_dir=args.cache_dir,
        engine=engine_config_from_args(args),
        vllm=vllm_config_from_args(args),
        **serve_config_from_env(dict(env)),  # the ServeConfig fields read from LMSERVE_* only (no flag)
    )
    # A flag over the env-only limits (serve_config_from_env replaces the whole LimitsConfig).
    return replace(config, limits=replace(config.limits, queue_timeout_s=args.queue_timeout))


def main(argv: Sequence[str] | None = None) -> int:
    env = dict(os.environ)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model is a local folder, a GGUF file or a bundled id
    # transformers' and gguf's tqdm bars are not log lines (and \r-redraws in a JSON log): progress.py
    # writes one line per slow step instead. Set either variable to 0 to get the bars back.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # With --engine vllm: a service must not report usage to vLLM's stats server unless its operator asks.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        args = build_parser(env).parse_args(argv)
    except EnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command != "serve":  # serve sets up its own logging from its config (app.run)
        from lmserve.progress import PROGRESS_LOGGER

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)  # slow first-run steps say what they do
    from lmserve.checkpoints import CheckpointError
    from lmserve.engine.base import EngineUnavailableError

    try:
        if args.command == "generate":
            return cmd_generate(args, engine_config_from_args(args))
        if args.command == "models":
            return cmd_models(args)
        if args.command == "cache":
            return cmd_cache(args)
        if args.command == "export":
            return cmd_export(args)
        try:
            config = serve_config_from_args(args, env)
        except ValueError as exc:  # an inconsistent combination of flags, a bad env-only variable
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return cmd_serve(config)
    except (CheckpointError, EngineUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
