"""The lmserve cache folder (`~/.cache/lmserve`, LMSERVE_CACHE_DIR): what is in it, what still uses it.

    listing = list_cache(cache_dir)            # `lmserve cache`
    removed = prune_cache(cache_dir)           # `lmserve cache prune`: the entries nothing uses any more

Kinds of entry:
- gguf: a converted GGUF checkpoint, `{stem}-{key}` (checkpoints/gguf.py). Used while a file remembered
  in `.sources/` is still there, unchanged, and its content has this key under the running converter.
  Several clones reading the same bundled GGUF use one entry.
- lora: a merged LoRA adapter, `{adapter}-lora-{key}` (checkpoints/lora.py). Used while one of the adapter
  folders that resolved to it (`.lora-users/`) and its base exist and still give this key (and a base in
  the cache is itself used).
- kernel: a build of the C kernels, `kernels/lmserve-kernels-{key}.so` (engine/modeling/kernel_cache.py).
  Used while a checkout that loaded it still has sources that hash to its key.
- partial: a conversion or merge cut short (`.tmp-*`, `.stale-*`) or a half-written kernel build. Left
  alone for an hour, since another process may be writing it.
- other: anything lmserve did not write. Listed, never removed.
Records in `.sources/` whose file is gone or has changed, in `.lora-users/` whose adapter is gone, and
in `.verified/` (the hashes an entry last passed, integrity.py) whose entry is gone, are dropped by prune too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.fingerprint import SOURCES_DIR, source_records
from lmserve.checkpoints.gguf import KEY_LEN, gguf_key_of_digest
from lmserve.checkpoints.integrity import VERIFIED_DIR, verified_records
from lmserve.checkpoints.lora import USERS_DIR, lora_cache_key, user_records
from lmserve.checkpoints.weights import read_marker, tree_size
from lmserve.engine.modeling.kernel_cache import KERNELS_DIR, kernel_builds

PARTIAL_GRACE_S = 3600.0  # a temp folder this old is no conversion in progress but one that was cut short


@dataclass(frozen=True)
class CacheEntry:
    name: str  # relative to the cache folder
    kind: str  # gguf | lora | kernel | partial | other
    path: Path
    size_bytes: int
    is_used: bool
    detail: str  # what it was built from, or why nothing uses it

    @property
    def is_prunable(self) -> bool:
        return not self.is_used and self.kind != "other"


@dataclass(frozen=True)
class CacheListing:
    cache_dir: Path
    entries: list[CacheEntry]
    stale_records: list[Path]  # .sources/ records of files gone or changed; .lora-users/ of adapters gone; .verified/ of entries gone

    @property
    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)

    @property
    def unused_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries if e.is_prunable)


def _key_of(name: str) -> str:
    return name.rsplit("-", 1)[-1] if len(name.rsplit("-", 1)[-1]) == KEY_LEN else ""


def _is_young(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime < PARTIAL_GRACE_S
    except OSError:
        return False


def _lora_use(folder: Path, users: list[tuple[str, str]], cache_dir: Path, unused: set[Path]) -> tuple[bool, str]:
    """Whether one of the adapter folders that resolved to this entry still gives its key (its adapter and
    base unchanged, a base in the cache itself used)."""
    reasons = []
    for adapter_text, base_text in dict.fromkeys(users):
        adapter, base = Path(adapter_text), Path(base_text)
        built_from = f"adapter {adapter} on base {base}"
        if not adapter.is_dir() or not base.is_dir():
            reasons.append(f"{built_from}: {'adapter' if not adapter.is_dir() else 'base'} is gone")
            continue
        if base.resolve() in unused:
            reasons.append(f"{built_from}: its base is an unused cache entry")
            continue
        try:
            key = lora_cache_key(adapter, base, cache_dir, allow_pickle=True)
        except (CheckpointError, OSError) as exc:
            reasons.append(f"{built_from}: {exc}")
            continue
        if key == _key_of(folder.name):
            return True, built_from
        reasons.append(f"{built_from}: the adapter, the base or the library versions have changed")
    return False, "; ".join(reasons) or "no adapter folder is known"


def list_cache(cache_dir: Path) -> CacheListing:
    cache_dir = Path(cache_dir).expanduser()
    if not cache_dir.is_dir():
        return CacheListing(cache_dir, [], [])
    now = time.time()
    records = source_records(cache_dir)
    stale = [path for path, record in records if record is None or not record.is_current()]
    # key -> the files whose content it is
    sources_of: dict[str, list[str]] = {}
    for _, record in records:
        if record is not None and record.is_current():
            sources_of.setdefault(gguf_key_of_digest(record.sha256), []).append(record.path)

    entries: list[CacheEntry] = []
    loras: list[tuple[Path, dict]] = []
    for item in sorted(cache_dir.iterdir()):
        if item.name in (SOURCES_DIR, USERS_DIR, KERNELS_DIR, VERIFIED_DIR):
            continue
        if item.name.startswith((".tmp-", ".stale-")):
            young = _is_young(item, now)
            detail = "being written now, or cut short less than an hour ago" if young else "left by an interrupted run"
            entries.append(CacheEntry(item.name, "partial", item, tree_size(item), young, detail))
            continue
        marker = read_marker(item) if item.is_dir() else None
        source = marker.get("source") if marker else None
        if marker is None or source not in ("gguf", "lora"):
            entries.append(CacheEntry(item.name, "other", item, tree_size(item), True, "not written by lmserve"))
        elif source == "lora":
            loras.append((item, marker))
        else:
            users = sources_of.get(_key_of(item.name), [])
            origin = str(marker.get("origin", "?"))
            detail = ", ".join(users) if users else f"from {origin}: no file with this content and converter is known"
            entries.append(CacheEntry(item.name, "gguf", item, tree_size(item), bool(users), detail))

    unused = {e.path.resolve() for e in entries if e.kind == "gguf" and not e.is_used}
    users_of: dict[str, list[tuple[str, str]]] = {}
    for path, record in user_records(cache_dir):
        entry_name = record.get("entry") if record else None
        if record is None or not (cache_dir / str(entry_name)).is_dir() or not Path(str(record.get("adapter"))).is_dir():
            stale.append(path)
            continue
        users_of.setdefault(str(entry_name), []).append((str(record["adapter"]), str(record.get("base"))))
    for item, marker in loras:
        users = users_of.get(item.name, []) + [(str(marker.get("origin", "")), str(marker.get("base", "")))]
        is_used, detail = _lora_use(item, users, cache_dir, unused)
        entries.append(CacheEntry(item.name, "lora", item, tree_size(item), is_used, detail))

    # .verified/ records (integrity.py) of entries that are gone
    stale += [path for path, entry in verified_records(cache_dir) if entry is None or not entry.is_dir()]

    kernels = cache_dir / KERNELS_DIR
    for build in kernel_builds(cache_dir):
        users = ", ".join(build.users) or "no checkout recorded"
        detail = users if build.is_used else f"{users}: no checkout has these sources any more"
        entries.append(CacheEntry(f"{KERNELS_DIR}/{build.path.name}", "kernel", build.path, build.size_bytes, build.is_used, detail))
    if kernels.is_dir():
        for tmp in sorted(kernels.glob("*.tmp")):
            young = _is_young(tmp, now)
            detail = "being compiled now" if young else "left by an interrupted build"
            entries.append(CacheEntry(f"{KERNELS_DIR}/{tmp.name}", "partial", tmp, tmp.stat().st_size, young, detail))
    return CacheListing(cache_dir, sorted(entries, key=lambda e: (e.kind, e.name)), stale)


def _remove(entry: CacheEntry) -> None:
    if entry.kind == "kernel":
        for sibling in (entry.path.with_suffix(".json"), entry.path.with_suffix(".lock")):
            sibling.unlink(missing_ok=True)
    if entry.path.is_dir():
        # Moved aside first: a reader never finds a half-removed folder under the entry's name.
        holder = Path(tempfile.mkdtemp(prefix=f".stale-{entry.path.name}-", dir=entry.path.parent))
        os.replace(entry.path, holder / entry.path.name)
        shutil.rmtree(holder, ignore_errors=True)
    else:
        entry.path.unlink(missing_ok=True)


def prune_cache(cache_dir: Path, dry_run: bool = False) -> tuple[list[CacheEntry], list[Path]]:
    """Remove the entries nothing uses and the stale source records; returns them (removed or, with
    dry_run, that would be)."""
    listing = list_cache(cache_dir)
    doomed = [e for e in listing.entries if e.is_prunable]
    if not dry_run:
        for entry in doomed:
            _remove(entry)
        for record in listing.stale_records:
            record.unlink(missing_ok=True)
    return doomed, listing.stale_records


__all__ = ["CacheEntry", "CacheListing", "list_cache", "prune_cache"]
