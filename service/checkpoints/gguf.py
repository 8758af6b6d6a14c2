"""GGUF files: validate, dequantize once to a float32 safetensors HF folder, and cache it.

Cache entry: `cache_dir / f"{stem}-{key}"`, where key hashes the file's absolute path, size and
mtime_ns (plus the converter and transformers versions). A stat key, not a content hash, because
every server start resolves its model and hashing ~100 MB-several GB of GGUF each time would cost
seconds; replacing or editing the file changes size or mtime and so the key. Float32 because it is
exactly what transformers' own GGUF loading produces, so float32 runs match it bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from service.checkpoints.errors import CheckpointError, one_line
from service.checkpoints.weights import is_complete, publish_folder, save_plain_model, write_marker

GGUF_MAGIC = b"GGUF"
# Bump when the conversion output changes, so old cache entries are not reused.
CONVERTER_VERSION = "1"


def gguf_cache_key(path: Path) -> str:
    """Short stable key of a GGUF file's identity (absolute path, size, mtime_ns) and the converter."""
    path = path.resolve()
    st = path.stat()
    identity = "\0".join(
        [str(path), str(st.st_size), str(st.st_mtime_ns), CONVERTER_VERSION, importlib.metadata.version("transformers")]
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def gguf_cache_path(path: Path, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{path.stem}-{gguf_cache_key(path)}"


def check_gguf_file(path: Path) -> None:
    """Parse the GGUF header and tensor table; a corrupt or truncated file is a CheckpointError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from e
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a valid GGUF file (bad magic bytes)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))  # numpy views over the mmap: raises ValueError on truncation
        data_end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid GGUF file (corrupt or truncated): {one_line(e)}") from e
    size = path.stat().st_size
    if data_end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {data_end} bytes, the file has {size}")


def convert_gguf(path: Path, cache_dir: Path) -> Path:
    """The cached HF folder for a GGUF file, converting it first if needed.

    A cache hit is a stat and a directory check: no transformers import, no model load.
    """
    path = Path(path).resolve()
    final = gguf_cache_path(path, cache_dir)
    if is_complete(final):
        return final
    check_gguf_file(path)
    return publish_folder(final, lambda tmp: _convert_into(path, tmp))


def _convert_into(path: Path, dest: Path) -> None:
    import torch
    import transformers

    try:
        # local_files_only: a local folder never needs the hub; make sure nothing is ever fetched
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
    except CheckpointError:
        raise
    except Exception as e:  # unsupported architecture, malformed metadata...: one line naming the file
        raise CheckpointError(f"cannot convert GGUF file {path}: {one_line(e)}") from e
    save_plain_model(model, dest)  # also writes generation_config.json
    tokenizer.save_pretrained(str(dest))
    write_marker(
        dest,
        {
            "source": "gguf",
            "origin": str(path),
            "converter_version": CONVERTER_VERSION,
            "transformers": transformers.__version__,
            "dtype": "float32",
        },
    )
