"""Turn a model reference into a local, validated, plain Hugging Face folder.

A reference is a bundled id, a local HF folder, a local .gguf file, or a local PEFT LoRA adapter
folder whose base is itself one of the former. Nothing is ever downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmserve.checkpoints.architectures import read_config
from lmserve.checkpoints.bundled import BUNDLED_MODELS, require_bundled
from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.gguf import convert_gguf
from lmserve.checkpoints.lora import ADAPTER_CONFIG, base_reference, merge_lora, read_adapter_config
from lmserve.checkpoints.weights import weight_files

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the user passed
    name: str  # served model name: the bundled id, else the folder/file stem
    path: Path  # a plain HF folder: config.json, weights, tokenizer files (generation_config.json when known)
    source: str  # "bundled" | "folder" | "gguf" | "lora"


def _accepted() -> str:
    return (
        f"expected a bundled model id ({', '.join(BUNDLED_MODELS)}), a local Hugging Face folder, "
        "a local .gguf file, or a local LoRA adapter folder; nothing is downloaded"
    )


def validate_model_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Cheap checks (JSON, headers, file presence) that a folder is a loadable HF checkpoint."""
    read_config(folder)
    weight_files(folder, allow_pickle)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")


def resolve_model(ref: str, cache_dir: Path, allow_pickle: bool = False) -> ResolvedModel:
    """Resolve `ref` to a local HF folder, converting GGUF or merging LoRA into `cache_dir` on first use."""
    cache_dir = Path(cache_dir).expanduser()
    if not ref.strip():
        raise CheckpointError(f"empty model reference: {_accepted()}")
    if ref in BUNDLED_MODELS:
        location = require_bundled(ref)
        folder = convert_gguf(location, cache_dir) if location.suffix == ".gguf" else location
        validate_model_folder(folder, allow_pickle)
        return ResolvedModel(ref=ref, name=ref, path=folder, source="bundled")

    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf: {_accepted()}")
        folder = convert_gguf(path, cache_dir)
        return ResolvedModel(ref=ref, name=path.stem, path=folder, source="gguf")
    if path.is_dir():
        path = path.resolve()
        if (path / ADAPTER_CONFIG).is_file():
            return _resolve_lora(ref, path, cache_dir, allow_pickle)
        validate_model_folder(path, allow_pickle)
        return ResolvedModel(ref=ref, name=path.name, path=path, source="folder")
    if path.exists():
        raise CheckpointError(f"{path} is neither a folder nor a .gguf file: {_accepted()}")
    if _HUB_ID.match(ref):
        raise CheckpointError(f"model {ref!r} looks like a Hugging Face Hub id and is not a local path: {_accepted()}")
    raise CheckpointError(f"model {ref!r} not found: {_accepted()}")


def _resolve_lora(ref: str, adapter_dir: Path, cache_dir: Path, allow_pickle: bool) -> ResolvedModel:
    base_ref = base_reference(adapter_dir, read_adapter_config(adapter_dir))
    try:
        base = resolve_model(base_ref, cache_dir, allow_pickle)
    except CheckpointError as e:
        raise CheckpointError(f"base model of LoRA adapter {adapter_dir}: {e}") from e
    if base.source == "lora":
        raise CheckpointError(f"{adapter_dir}: its base {base_ref!r} is itself a LoRA adapter, which is not supported")
    folder = merge_lora(adapter_dir, base.path, cache_dir, allow_pickle)
    return ResolvedModel(ref=ref, name=adapter_dir.name, path=folder, source="lora")
