"""`lmserve` command line: serve, generate, models, export.

Flags and LMSERVE_* variables become a ServeConfig here, once; nothing below reads either.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from service.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, EngineConfig, ServeConfig, VLLMConfig, default_cache_dir
from service.logs import LOG_FORMATS, LOG_LEVELS


def _env_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    return Path(env[name]) if env.get(name) else None


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    return int(env[name]) if env.get(name) else default


def _env_float(env: Mapping[str, str], name: str) -> float | None:
    return float(env[name]) if env.get(name) else None


def add_engine_flags(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=env.get("LMSERVE_MODEL", DEFAULT_MODEL),
                   help="bundled id, HF folder, .gguf file or LoRA adapter folder (env LMSERVE_MODEL)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   default=env.get("LMSERVE_DTYPE", d.dtype))
    p.add_argument("--device", default=env.get("LMSERVE_DEVICE", d.device), help="auto | cpu | cuda | cuda:N")
    p.add_argument("--kv-cache-memory", type=float, default=_env_float(env, "LMSERVE_KV_CACHE_GIB"),
                   help=f"KV pool budget in GiB (env LMSERVE_KV_CACHE_GIB; native default {d.kv_cache_memory_bytes / 2**30:g})")
    p.add_argument("--num-kv-blocks", type=int, default=_env_int(env, "LMSERVE_NUM_KV_BLOCKS"))
    p.add_argument("--block-size", type=int, default=_env_int(env, "LMSERVE_BLOCK_SIZE"),
                   help=f"native default {d.block_size}")
    p.add_argument("--max-num-seqs", type=int, default=_env_int(env, "LMSERVE_MAX_NUM_SEQS"),
                   help=f"native default {d.max_num_seqs}")
    p.add_argument("--max-num-batched-tokens", type=int, default=_env_int(env, "LMSERVE_MAX_NUM_BATCHED_TOKENS"),
                   help=f"native default {d.max_num_batched_tokens}")
    p.add_argument("--max-model-len", type=int, default=int(env["LMSERVE_MAX_MODEL_LEN"]) if "LMSERVE_MAX_MODEL_LEN" in env else None)
    p.add_argument("--no-prefix-caching", action="store_true", default=_env_bool(env.get("LMSERVE_NO_PREFIX_CACHING", "")))
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM's spelling of the prefix-cache switch (on by default); must agree with --no-prefix-caching")
    p.add_argument("--num-threads", type=int, default=int(env["LMSERVE_NUM_THREADS"]) if "LMSERVE_NUM_THREADS" in env else None)
    p.add_argument("--attention", choices=["auto", "kernel", "torch"], default=env.get("LMSERVE_ATTENTION", d.attention),
                   help="auto: the C kernels where a compiler builds them; kernel: require them; torch: torch ops only "
                   "(env LMSERVE_ATTENTION)")
    p.add_argument("--allow-pickle", action="store_true", default=_env_bool(env.get("LMSERVE_ALLOW_PICKLE", "")),
                   help="allow .bin/.pt pickle checkpoints (they can run code)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(dict(env)))


def _kv_cache_bytes(args: argparse.Namespace) -> int | None:
    return None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)


def _prefix_caching(args: argparse.Namespace) -> bool:
    if args.enable_prefix_caching is None:
        return not args.no_prefix_caching
    if args.enable_prefix_caching and args.no_prefix_caching:
        raise ValueError("--enable-prefix-caching and --no-prefix-caching contradict each other")
    return bool(args.enable_prefix_caching)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    d = EngineConfig()
    kv_bytes = _kv_cache_bytes(args)
    return EngineConfig(
        dtype=args.dtype,
        device=args.device,
        block_size=d.block_size if args.block_size is None else args.block_size,
        kv_cache_memory_bytes=d.kv_cache_memory_bytes if kv_bytes is None else kv_bytes,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=d.max_num_seqs if args.max_num_seqs is None else args.max_num_seqs,
        max_num_batched_tokens=d.max_num_batched_tokens if args.max_num_batched_tokens is None else args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=_prefix_caching(args),
        num_threads=args.num_threads,
        attention=args.attention,
        allow_pickle=args.allow_pickle,
    )


def add_vllm_flags(p: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Settings only vLLM's engine has (--engine vllm); see service/engine/vllm_backend.py."""
    g = p.add_argument_group("vLLM engine (--engine vllm)")
    g.add_argument("--tensor-parallel-size", type=int, default=_env_int(env, "LMSERVE_TENSOR_PARALLEL_SIZE", 1),
                   help="GPUs each layer is split over (env LMSERVE_TENSOR_PARALLEL_SIZE)")
    g.add_argument("--pipeline-parallel-size", type=int, default=_env_int(env, "LMSERVE_PIPELINE_PARALLEL_SIZE", 1),
                   help="pipeline stages (nodes, with Ray) the layers are split over (env LMSERVE_PIPELINE_PARALLEL_SIZE)")
    g.add_argument("--gpu-memory-utilization", type=float, default=_env_float(env, "LMSERVE_GPU_MEMORY_UTILIZATION"),
                   help="fraction of GPU memory vLLM may use, weights and KV cache (vLLM's default 0.9; env "
                   "LMSERVE_GPU_MEMORY_UTILIZATION)")
    g.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                   default=env.get("LMSERVE_DISTRIBUTED_EXECUTOR_BACKEND") or None,
                   help="mp: processes on this node; ray: a Ray cluster, for more than one node (vLLM picks when unset; "
                   "env LMSERVE_DISTRIBUTED_EXECUTOR_BACKEND)")


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


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="Serve transformer checkpoints over HTTP and gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP (and gRPC) server")
    add_engine_flags(serve, env)
    serve.add_argument("--embedding-model", default=env.get("LMSERVE_EMBEDDING_MODEL", DEFAULT_EMBEDDING_MODEL),
                       help="bundled id or folder; 'none' to serve no embeddings")
    serve.add_argument("--host", default=env.get("LMSERVE_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env.get("LMSERVE_PORT", 8000)))
    serve.add_argument("--grpc-port", type=int, default=int(env.get("LMSERVE_GRPC_PORT", 50051)),
                       help="gRPC port; 0 turns gRPC off (env LMSERVE_GRPC_PORT)")
    serve.add_argument("--grpc-tls-cert", type=Path, default=_env_path(env, "LMSERVE_GRPC_TLS_CERT"),
                       help="PEM certificate chain: gRPC serves TLS only (env LMSERVE_GRPC_TLS_CERT)")
    serve.add_argument("--grpc-tls-key", type=Path, default=_env_path(env, "LMSERVE_GRPC_TLS_KEY"),
                       help="PEM private key for --grpc-tls-cert (env LMSERVE_GRPC_TLS_KEY)")
    serve.add_argument("--grpc-tls-client-ca", type=Path, default=_env_path(env, "LMSERVE_GRPC_TLS_CLIENT_CA"),
                       help="PEM CA: clients must present a certificate it signed (mutual TLS; env LMSERVE_GRPC_TLS_CLIENT_CA)")
    serve.add_argument("--engine", choices=["native", "vllm"], default=env.get("LMSERVE_ENGINE", "native"))
    add_vllm_flags(serve, env)
    serve.add_argument("--api-key-file", default=env.get("LMSERVE_API_KEY_FILE"))
    d = ServeConfig()
    serve.add_argument("--log-format", choices=LOG_FORMATS, default=env.get("LMSERVE_LOG_FORMAT", d.log_format),
                       help="JSON lines or plain text (env LMSERVE_LOG_FORMAT)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                       default=env.get("LMSERVE_LOG_LEVEL", d.log_level), help="env LMSERVE_LOG_LEVEL")
    serve.add_argument("--log-prompts", action="store_true",
                       default=_env_bool(env.get("LMSERVE_LOG_PROMPTS", "")),
                       help="put prompts and outputs on the access lines (env LMSERVE_LOG_PROMPTS)")

    gen = sub.add_parser("generate", help="print one completion from the model")
    add_engine_flags(gen, env)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template (prompt = user message)")
    gen.add_argument("--system", default=None, help="system message with --chat")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)

    models = sub.add_parser("models", help="list bundled model ids and the conversion cache")
    models.add_argument("--cache-dir", type=Path, default=default_cache_dir(dict(env)))

    export = sub.add_parser("export", help="write a model as a plain Hugging Face folder")
    export.add_argument("ref")
    export.add_argument("dest", type=Path)
    export.add_argument("--cache-dir", type=Path, default=default_cache_dir(dict(env)))
    export.add_argument("--allow-pickle", action="store_true")
    return parser


def serve_config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ServeConfig:
    embedding = None if str(args.embedding_model).lower() in {"", "none"} else args.embedding_model
    base = ServeConfig()
    return replace(
        base,
        model=args.model,
        embedding_model=embedding,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        grpc_tls_cert=args.grpc_tls_cert,
        grpc_tls_key=args.grpc_tls_key,
        grpc_tls_client_ca=args.grpc_tls_client_ca,
        engine_kind=args.engine,
        api_key_file=args.api_key_file,
        log_format=args.log_format,
        log_level=args.log_level,
        log_prompts=args.log_prompts,
        cache_dir=args.cache_dir,
        engine=engine_config_from_args(args),
        vllm=vllm_config_from_args(args),
        **serve_overrides_from_env(env),
    )


def serve_overrides_from_env(env: Mapping[str, str]) -> dict:
    """ServeConfig fields read from LMSERVE_* only (no flag of their own)."""
    from service import config as config_module

    hook = getattr(config_module, "serve_config_from_env", None)
    return dict(hook(dict(env))) if hook is not None else {}


def cmd_generate(args: argparse.Namespace) -> int:
    from service.checkpoints import resolve_model
    from service.engine.engine import NativeEngine
    from service.types import GenerationRequest, SamplingParams

    resolved = resolve_model(args.model, args.cache_dir, allow_pickle=args.allow_pickle)
    engine = NativeEngine.load(resolved.path, resolved.name, engine_config_from_args(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt_ids = engine.tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    async def run() -> None:
        await engine.start()
        try:
            async for delta in engine.generate(GenerationRequest(prompt_ids, params, "cli")):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        finally:
            await engine.stop()
        sys.stdout.write("\n")

    asyncio.run(run())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from service.checkpoints import list_models

    for listing in list_models(args.cache_dir):
        print(listing)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from service.checkpoints import export_model

    dest = export_model(args.ref, args.dest, args.cache_dir, allow_pickle=args.allow_pickle)
    print(dest)
    return 0


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from service.app import run

    try:
        config = serve_config_from_args(args, env)
    except ValueError as exc:  # an inconsistent combination of flags (ServeConfig checks it)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    env = dict(os.environ)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model is a local folder, a GGUF file or a bundled id
    args = build_parser(env).parse_args(argv)
    if args.command != "serve":  # serve sets up its own logging from its config (app.run)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from service.checkpoints import CheckpointError
    from service.engine.base import EngineUnavailableError

    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "export":
            return cmd_export(args)
        return cmd_serve(args, env)
    except (CheckpointError, EngineUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
