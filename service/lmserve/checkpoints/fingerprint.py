"""Content hashes of checkpoint files, computed once and remembered by path, size and mtime.

Cache entries are keyed by what a checkpoint holds, not where it lies, so two clones (two virtual
environments holding the same bundled GGUF) share one converted copy. Hashing a multi-GB file takes
seconds, so each file's hash is remembered in `cache_dir/.sources/`, one small JSON record per path: a
later start that finds the file with the same size and mtime_ns reuses it (a stat, no read). Editing or
replacing the file changes its size or mtime, and the hash is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lmserve.checkpoints.errors import CheckpointError, one_line
from lmserve.checkpoints.weights import write_json_atomic
from lmserve.progress import progress_step, size_text

SOURCES_DIR = ".sources"
# Hashing runs at about 1 GB/s: below this a file hashes in well under a second, with no line to announce it.
_ANNOUNCE_BYTES = 512 << 20
_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class SourceRecord:
    """A file's content hash as of one (size, mtime_ns) of it."""

    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str

    def is_current(self) -> bool:
        """The file is still there with the size and mtime it had when hashed."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


def record_path(cache_dir: Path, path: Path) -> Path:
    return Path(cache_dir) / SOURCES_DIR / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"


def read_record(file: Path) -> SourceRecord | None:
    try:
        data = json.loads(file.read_text())
        return SourceRecord(str(data["path"]), int(data["size"]), int(data["mtime_ns"]), str(data["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def source_records(cache_dir: Path) -> list[tuple[Path, SourceRecord | None]]:
    """Every record file under cache_dir/.sources with what it holds (None: unreadable)."""
    folder = Path(cache_dir) / SOURCES_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [(f, read_record(f)) for f in files]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from e
    return digest.hexdigest()


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The sha256 of `path`'s bytes, remembered in `cache_dir` by path, size and mtime_ns."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from e
    record_file = record_path(cache_dir, path)
    known = read_record(record_file)
    if known is not None and (known.path, known.size, known.mtime_ns) == (str(path), st.st_size, st.st_mtime_ns):
        return known.sha256
    if st.st_size >= _ANNOUNCE_BYTES:
        with progress_step(f"hashing {path.name} ({size_text(st.st_size)}) to find it in the cache (once per file)"):
            digest = _hash_file(path)
    else:
        digest = _hash_file(path)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not rewritten while read
        write_json_atomic(record_file, asdict(SourceRecord(str(path), st.st_size, st.st_mtime_ns, digest)))
    return digest


__all__ = ["SOURCES_DIR", "SourceRecord", "file_sha256", "read_record", "record_path", "source_records"]
