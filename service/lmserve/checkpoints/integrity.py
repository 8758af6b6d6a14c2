"""Whether a cache entry (a converted GGUF, a merged LoRA) still holds exactly what was written into it.

    publish_entry(final, build)                        # build in a temp folder, record the manifest, rename
    if not is_trusted(final, cache_dir): ...rebuild    # convert_gguf / merge_lora, on every start

When an entry is built, its marker records the size and sha256 of every file in it. A later start trusts
the entry only if every file is there at its recorded size (a stat each) and hashes to its recorded
sha256. Hashing the bundled model's 540 MB takes about half a second, so a file that hashed right is
remembered in `cache_dir/.verified/` by its size, mtime, ctime and inode: any write to it, or a
`touch -m` back to the old mtime, changes its ctime, and it is hashed again. An entry that fails is moved
aside and removed with a warning, and the caller rebuilds it; one written by an lmserve that recorded no
manifest is rebuilt the same way, once.

Entries are published by an atomic rename of a complete temp folder (weights.publish_folder), so a
conversion or merge killed midway leaves only a `.tmp-*` folder, which nothing reads; this module covers
what happens to an entry after that: a disk that loses or flips bytes, a copy cut short, a stray edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmserve.checkpoints.errors import CheckpointError, one_line
from lmserve.checkpoints.weights import CACHE_MARKER, publish_folder, read_marker, write_json_atomic, write_marker

VERIFIED_DIR = ".verified"
MANIFEST_KEY = "files"  # in the marker: relative path -> {"size": bytes, "sha256": hex}
_CHUNK_BYTES = 4 << 20

log = logging.getLogger("lmserve.cache")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != CACHE_MARKER)


def add_manifest(folder: Path) -> None:
    """Record every file's size and sha256 in the folder's marker (which the builder has written)."""
    marker = read_marker(folder)
    if marker is None:
        raise RuntimeError(f"{folder} has no readable {CACHE_MARKER} to add a manifest to")
    marker[MANIFEST_KEY] = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)
    }
    write_marker(folder, marker)


def _sync(folder: Path) -> None:
    """Flush the folder's files and directory entries to disk, so that a power cut after the rename
    cannot leave a published entry whose files are empty (a killed process needs no flush: the kernel
    keeps what it wrote)."""
    for path in [*_files(folder), folder / CACHE_MARKER]:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    for directory in sorted({p.parent for p in _files(folder)} | {folder}):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_entry(final: Path, build: Callable[[Path], None]) -> Path:
    """publish_folder, with the manifest recorded in the marker (and everything flushed) before the rename."""

    def build_and_seal(tmp: Path) -> None:
        build(tmp)
        add_manifest(tmp)
        _sync(tmp)

    return publish_folder(final, build_and_seal)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verified_record_path(cache_dir: Path, folder: Path) -> Path:
    return Path(cache_dir) / VERIFIED_DIR / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]}.json"


def _read_verified(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    stamps = data.get("stamps") if isinstance(data, dict) else None
    return stamps if isinstance(stamps, dict) else {}


def verified_records(cache_dir: Path) -> list[tuple[Path, Path | None]]:
    """Every .verified/ record with the entry folder it is about (None: unreadable)."""
    folder = Path(cache_dir) / VERIFIED_DIR
    out: list[tuple[Path, Path | None]] = []
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(record.read_text()).get("entry")
        except (OSError, ValueError, AttributeError):
            entry = None
        out.append((record, Path(entry) if isinstance(entry, str) else None))
    return out


def entry_problem(folder: Path, cache_dir: Path) -> str | None:
    """What is wrong with a complete-looking cache entry, or None when every file checks out."""
    marker = read_marker(folder)
    if marker is None:
        return f"{CACHE_MARKER} is missing or unreadable"
    manifest = marker.get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or not manifest:
        return "its marker records no file sizes and hashes (written by an older lmserve)"
    for name, info in manifest.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(info, dict) or size != info.get("size"):
            return f"{name} is {size} bytes; {info.get('size') if isinstance(info, dict) else '?'} were written"
    record = verified_record_path(cache_dir, folder)
    known = _read_verified(record)
    stamps: dict[str, list[int]] = {}
    for name, info in manifest.items():
        path = folder / name
        try:
            stamp = _stamp(path)
            if known.get(name) != stamp:
                if _sha256(path) != info.get("sha256"):
                    return f"{name} does not hash to the sha256 recorded when it was written (its bytes have changed)"
                stamp = _stamp(path)
        except OSError as exc:
            return f"{name} cannot be read: {one_line(exc)}"
        stamps[name] = stamp
    if stamps != known:
        write_json_atomic(record, {"entry": str(folder.resolve()), "stamps": stamps})  # a read-only cache only loses the memo
    return None


def discard_entry(folder: Path) -> None:
    """Move an entry aside, then delete it: a reader never finds a half-removed folder under its name."""
    holder = Path(tempfile.mkdtemp(prefix=f".stale-{folder.name}-", dir=folder.parent))
    try:
        os.replace(folder, holder / folder.name)
    except FileNotFoundError:
        pass  # another process discarded it first
    shutil.rmtree(holder, ignore_errors=True)


def is_trusted(folder: Path, cache_dir: Path) -> bool:
    """True when `folder` is a complete entry whose files are as written. A damaged entry is removed
    (with a warning) and False returned, so that the caller rebuilds it."""
    if not (folder / CACHE_MARKER).is_file():
        return False
    problem = entry_problem(folder, cache_dir)
    if problem is None:
        return True
    log.warning("cache entry %s is damaged (%s); removing it and building it again", folder, problem)
    try:
        discard_entry(folder)
    except OSError as exc:
        raise CheckpointError(
            f"cache entry {folder} is damaged ({problem}) and cannot be removed: {one_line(exc)}; "
            "delete it by hand, or point LMSERVE_CACHE_DIR at a writable folder"
        ) from exc
    record = verified_record_path(cache_dir, folder)
    record.unlink(missing_ok=True)
    return False


__all__ = ["MANIFEST_KEY", "VERIFIED_DIR", "add_manifest", "discard_entry", "entry_problem", "is_trusted", "publish_entry", "verified_records"]
