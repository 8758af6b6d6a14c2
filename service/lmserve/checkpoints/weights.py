"""Weight folders on disk: find and validate weight files, load them, publish new folders atomically.

Validation only reads headers and stats files, so a bad checkpoint fails in milliseconds with a
CheckpointError naming the file, before any heavy load starts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve.checkpoints.errors import CheckpointError, one_line

if TYPE_CHECKING:  # torch is heavy to import; only the loaders below need it at run time
    import torch

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_HINT = "pass --allow-pickle to load pickle weights (they can run code)"

# Written last into every folder lmserve builds in its cache: its presence means the folder is complete.
CACHE_MARKER = "lmserve-cache.json"

_MAX_HEADER_BYTES = 100 << 20  # safetensors itself refuses headers above 100 MB


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file is long enough for every tensor it lists."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (shorter than 8 bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path} is truncated or corrupt: its header length exceeds the file")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from e
    try:
        data_end = max(
            (int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"),
            default=0,
        )
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: malformed safetensors header") from e
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes, the file has {size}"
        )
    return header


def _index_shards(index: Path) -> dict[str, str]:
    """tensor name -> shard file name, from a *.index.json."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index: {one_line(e)}") from e
    return {str(k): str(v) for k, v in weight_map.items()}


def _shard_files(folder: Path, index: Path) -> list[Path]:
    shards = sorted(set(_index_shards(index).values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise CheckpointError(f"{index} names shard {shard}, which is missing from {folder}")
    return [folder / s for s in shards]


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of an HF folder, in load order, validated cheaply (no tensor is read)."""
    return _weight_layout(folder, allow_pickle)[0]


def _weight_layout(folder: Path, allow_pickle: bool) -> tuple[list[Path], Path | None]:
    """(weight files, the shard index they came from or None). Safetensors win over pickle, as in transformers."""
    for index_name, single_name, is_pickle in (
        (SAFETENSORS_INDEX, SAFETENSORS_FILE, False),
        (PICKLE_INDEX, PICKLE_FILE, True),
    ):
        index: Path | None
        if (folder / index_name).is_file():
            index = folder / index_name
            files = _shard_files(folder, index)
        elif (folder / single_name).is_file():
            files, index = [folder / single_name], None
        else:
            continue
        if is_pickle and not allow_pickle:
            raise CheckpointError(f"{files[0]} is a pickle checkpoint; {PICKLE_HINT}")
        if not is_pickle:
            for f in files:
                check_safetensors_header(f)
        return files, index

    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    hint = f" (found {', '.join(found)}, but no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX})" if found else ""
    raise CheckpointError(
        f"{folder} has no weights{hint}: expected {SAFETENSORS_FILE}, or shards with {SAFETENSORS_INDEX}"
    )


def _load_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError and OSError: rephrase, the user needs the file name
            raise CheckpointError(f"cannot load {path}: {one_line(e)}") from e
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is not a weights file: expected .safetensors (or .bin/.pt with --allow-pickle)")
    if not allow_pickle:
        raise CheckpointError(f"{path} is a pickle checkpoint; {PICKLE_HINT}")
    try:
        # weights_only even when allowed: the opt-in accepts the format, not arbitrary code
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {path}: {one_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat name -> tensor state dict")
    return state


def load_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all shards, per the index) or of one weights file.

    Tensors stay on CPU in their stored dtype. Raises CheckpointError for anything malformed.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    files, index = ([path], None) if path.is_file() else _weight_layout(path, allow_pickle)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_file(f, allow_pickle)
        clash = tensors.keys() & part.keys()
        if clash:
            raise CheckpointError(f"{f} repeats tensor {sorted(clash)[0]}, already loaded from another shard")
        tensors.update(part)
    if index is not None:
        missing = _index_shards(index).keys() - tensors.keys()
        if missing:
            raise CheckpointError(f"{index} lists tensor {sorted(missing)[0]}, which no shard holds")
    return tensors


# ---- writing folders into the cache -------------------------------------------------------------


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def is_complete(folder: Path) -> bool:
    """A cache folder is complete once its marker exists (the marker is written last, then renamed in)."""
    return (folder / CACHE_MARKER).is_file()


def write_marker(folder: Path, info: dict[str, Any]) -> None:
    (folder / CACHE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def write_json_atomic(path: Path, data: dict[str, Any]) -> bool:
    """Write a small JSON record through a temp file and a rename (concurrent writers never interleave);
    False when the cache is read-only, which only costs the record."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def publish_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temp dir beside `final`, then rename it into place atomically.

    Readers and concurrent builders never see a half-written `final`: rename(2) is atomic, and a
    rename onto a folder another process already published fails, in which case theirs is kept.
    `build` must write CACHE_MARKER last.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not is_complete(final):
        # Not made by publish_folder (e.g. a hand copy cut short): move it out of the way.
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=final.parent))
        os.replace(final, stale / final.name)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if not is_complete(tmp):
            raise RuntimeError(f"builder for {final} did not write {CACHE_MARKER}")
        _make_readable(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and some writers 0600 files); a cache is read by every local user."""
    for item in [folder, *folder.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)


def save_plain_model(model: Any, dest: Path) -> None:
    """save_pretrained a transformers model as plain safetensors weights, with no quantization state.

    A GGUF-loaded model carries a GGUF quantizer that makes save_pretrained refuse; its weights are
    already dequantized, so dropping the quantizer and its config entry leaves an ordinary model.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(str(dest))
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a one-line CheckpointError."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {one_line(e)}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config
