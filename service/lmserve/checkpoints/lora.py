"""PEFT LoRA adapters: merge into their base model once and cache the merged safetensors folder.

Cache entry: `cache_dir / f"{adapter_name}-lora-{key}"`, key = hash of the adapter folder's bytes
(adapters are small) and of the base's config and weight files (their content hashes, computed once
and remembered by size and mtime: fingerprint.py), plus the peft/transformers versions. Keyed by
content, so the same adapter on the same base merges once whichever folders they are read from. Each
adapter folder that resolves to an entry is recorded in `cache_dir/.lora-users/`, so that `lmserve cache`
knows which entries something still uses.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from lmserve.checkpoints.errors import CheckpointError, one_line
from lmserve.checkpoints.fingerprint import file_sha256
from lmserve.checkpoints.integrity import is_trusted, publish_entry
from lmserve.checkpoints.weights import (
    CACHE_MARKER,
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    check_safetensors_header,
    read_json_object,
    save_plain_model,
    weight_files,
    write_json_atomic,
    write_marker,
)
from lmserve.progress import progress_step

USERS_DIR = ".lora-users"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# Written by save_pretrained of the merged model; every other top-level base file is copied over.
_NOT_COPIED_FROM_BASE = {"config.json", "generation_config.json", CACHE_MARKER}


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    config = read_json_object(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: adapter type {config.get('peft_type')!r} is not supported, only LORA")
    if not config.get("base_model_name_or_path"):
        raise CheckpointError(f"{path} has no base_model_name_or_path; lmserve needs it to find the base model")
    return config


def base_reference(adapter_dir: Path, config: dict[str, Any]) -> str:
    """The adapter's base as a reference; a relative path that exists beside the adapter is taken from there."""
    ref = str(config["base_model_name_or_path"])
    beside = adapter_dir / ref
    if not Path(ref).is_absolute() and not Path(ref).exists() and beside.exists():
        return str(beside)
    return ref


def check_adapter_weights(adapter_dir: Path, allow_pickle: bool) -> None:
    if (adapter_dir / ADAPTER_SAFETENSORS).is_file():
        check_safetensors_header(adapter_dir / ADAPTER_SAFETENSORS)
    elif (adapter_dir / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise CheckpointError(f"{adapter_dir / ADAPTER_PICKLE} is a pickle checkpoint; {PICKLE_HINT}")
    else:
        raise CheckpointError(f"{adapter_dir} has no adapter weights: expected {ADAPTER_SAFETENSORS}")


def lora_cache_key(adapter_dir: Path, base_path: Path, cache_dir: Path, allow_pickle: bool = False) -> str:
    digest = hashlib.sha256(b"lora\0")
    for file in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(adapter_dir)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    for file in [base_path / "config.json", *weight_files(base_path, allow_pickle)]:
        digest.update(f"{file.name}:{file_sha256(file, cache_dir)}\0".encode())
    for dist in ("peft", "transformers"):
        digest.update(importlib.metadata.version(dist).encode() + b"\0")
    return digest.hexdigest()[:12]


def merge_lora(adapter_dir: Path, base_path: Path, cache_dir: Path, allow_pickle: bool = False) -> Path:
    """The cached merged folder for `adapter_dir` applied to the HF folder `base_path`."""
    adapter_dir = Path(adapter_dir).resolve()
    check_adapter_weights(adapter_dir, allow_pickle)
    final = Path(cache_dir) / f"{adapter_dir.name}-lora-{lora_cache_key(adapter_dir, base_path, cache_dir, allow_pickle)}"
    if not is_trusted(final, Path(cache_dir)):  # a damaged entry is removed here, and merged again
        with progress_step(f"merging LoRA adapter {adapter_dir.name} into {base_path.name} (once per adapter and base)"):
            publish_entry(final, lambda tmp: _merge_into(adapter_dir, base_path, tmp))
    remember_user(Path(cache_dir), adapter_dir, base_path, final)
    return final


def user_record_path(cache_dir: Path, adapter_dir: Path) -> Path:
    return cache_dir / USERS_DIR / f"{hashlib.sha256(str(adapter_dir).encode()).hexdigest()[:24]}.json"


def remember_user(cache_dir: Path, adapter_dir: Path, base_path: Path, entry: Path) -> None:
    """Record that `adapter_dir` (on `base_path`) resolves to the cache entry `entry`; a later resolve of
    the same folder to another entry (the adapter changed) replaces the record."""
    record = {"adapter": str(adapter_dir), "base": str(Path(base_path).resolve()), "entry": entry.name}
    path = user_record_path(cache_dir, adapter_dir)
    if read_json_record(path) != record:
        write_json_atomic(path, record)


def read_json_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def user_records(cache_dir: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    folder = Path(cache_dir) / USERS_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [(f, read_json_record(f)) for f in files]


def _stored_dtype(base_path: Path) -> str:
    config = json.loads((base_path / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _merge_into(adapter_dir: Path, base_path: Path, dest: Path) -> None:
    import peft
    import torch
    import transformers

    try:
        # Merge in float32 whatever the stored dtype, so W + BA is not rounded twice.
        base = transformers.AutoModelForCausalLM.from_pretrained(
            str(base_path), dtype=torch.float32, local_files_only=True
        )
        merged = peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).merge_and_unload()
    except CheckpointError:
        raise
    except Exception as e:  # shape mismatch, unknown target modules...: one line naming the adapter
        raise CheckpointError(f"cannot merge LoRA adapter {adapter_dir} into {base_path}: {one_line(e)}") from e
    dtype = getattr(torch, _stored_dtype(base_path), torch.float32)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        merged = merged.to(dtype)
    save_plain_model(merged, dest)
    for item in base_path.iterdir():
        is_weights = item.suffix in (".safetensors", *PICKLE_SUFFIXES) or item.name.endswith(".index.json")
        if item.is_file() and not is_weights and item.name not in _NOT_COPIED_FROM_BASE:
            shutil.copy2(item, dest / item.name)  # tokenizer files, chat template, README...
    write_marker(
        dest,
        {
            "source": "lora",
            "origin": str(adapter_dir),
            "base": str(base_path),
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
    )
