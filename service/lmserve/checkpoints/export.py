"""What models are available (bundled and cached), and exporting a resolved model as a plain folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmserve.checkpoints.bundled import BUNDLED_MODELS, bundled_location
from lmserve.checkpoints.errors import CheckpointError, one_line
from lmserve.checkpoints.resolve import resolve_model
from lmserve.checkpoints.gguf import gguf_cache_path
from lmserve.checkpoints.weights import CACHE_MARKER, is_complete, read_marker, tree_size


@dataclass(frozen=True)
class ModelListing:
    name: str  # bundled id, or the cache folder's name
    source: str  # "bundled" for bundled ids; "gguf" | "lora" for cache entries
    kind: str | None  # "generation" | "embedding"; None when not known
    installed: bool  # bundled: its wheel is installed; cache entries are always True
    path: Path | None  # bundled: the shipped file/folder; cache entries: the converted folder
    detail: str  # description, or what the cache entry was built from
    size_bytes: int | None = None  # of `path` (None: not installed)
    needs_conversion: bool = False  # a GGUF: served from a converted folder in the cache
    converted: Path | None = None  # that folder, once it exists


def _converted(location: Path, cache_dir: Path) -> Path | None:
    """The complete converted folder of a bundled GGUF in `cache_dir`, if there is one. Hashes the file the
    first time (about 0.1 s for the bundled one), but never creates a cache folder that is not there."""
    if not cache_dir.is_dir():
        return None
    folder = gguf_cache_path(location, cache_dir)
    return folder if is_complete(folder) else None


def list_models(cache_dir: Path) -> list[ModelListing]:
    """Bundled ids first (installed or not), then complete cache entries sorted by name."""
    cache_dir = Path(cache_dir).expanduser()
    listings = []
    for model_id, info in BUNDLED_MODELS.items():
        location = bundled_location(model_id)
        is_gguf = info.relative_path.endswith(".gguf")
        listings.append(
            ModelListing(
                name=model_id,
                source="bundled",
                kind=info.kind,
                installed=location is not None,
                path=location,
                detail=f"{info.description} [{info.license}]",
                size_bytes=tree_size(location) if location is not None else None,
                needs_conversion=is_gguf,
                converted=_converted(location, cache_dir) if location is not None and is_gguf else None,
            )
        )
    entries = sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []
    for entry in entries:
        marker = read_marker(entry) if entry.is_dir() and not entry.name.startswith(".") else None
        if marker is None:  # temp dirs of a conversion in progress, foreign files
            continue
        origin = marker.get("origin", "?")
        detail = f"from {origin}" + (f" on base {marker['base']}" if marker.get("base") else "")
        listings.append(
            ModelListing(
                name=entry.name,
                source=str(marker.get("source", "?")),
                kind="generation",  # both GGUF conversion and LoRA merge produce causal LMs
                installed=True,
                path=entry,
                detail=detail,
                size_bytes=tree_size(entry),
            )
        )
    return listings


def export_model(ref: str, dest: Path, cache_dir: Path, allow_pickle: bool = False) -> Path:
    """Copy the resolved folder of `ref` to `dest` (which must be absent or empty); returns `dest`."""
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"export destination {dest} already exists and is not empty; refusing to overwrite it")
    resolved = resolve_model(ref, cache_dir, allow_pickle)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy beside dest, then rename: an interrupted export leaves no half folder at dest.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        try:
            shutil.copytree(resolved.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CACHE_MARKER))
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise CheckpointError(f"cannot export to {dest}: {one_line(e)}") from e
    return dest
