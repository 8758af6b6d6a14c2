"""GGUF files: validate, dequantize once to a float32 safetensors HF folder, and cache it.

Cache entry: `cache_dir / f"{stem}-{key}"`, where key hashes the file's content (its sha256, computed
once and remembered by path, size and mtime_ns: fingerprint.py) plus the converter and transformers
versions. Keyed by content, not path, so two clones whose virtual environments hold the same bundled
GGUF share one converted copy; an entry of the same content under another file name is reused too.
Float32 because it is exactly what transformers' own GGUF loading produces, so float32 runs match it
bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from service.checkpoints.errors import CheckpointError, one_line
from service.checkpoints.fingerprint import file_sha256
from service.checkpoints.integrity import is_trusted, publish_entry
from service.checkpoints.weights import is_complete, save_plain_model, write_marker
from service.progress import progress_step, size_text

GGUF_MAGIC = b"GGUF"
# Bump when the conversion output changes, so old cache entries are not reused.
CONVERTER_VERSION = "1"
KEY_LEN = 12


def gguf_key_of_digest(content_sha256: str) -> str:
    """The cache key of a GGUF file with this content under the running converter and transformers."""
    identity = "\0".join(["gguf", content_sha256, CONVERTER_VERSION, importlib.metadata.version("transformers")])
    return hashlib.sha256(identity.encode()).hexdigest()[:KEY_LEN]


def gguf_cache_key(path: Path, cache_dir: Path) -> str:
    return gguf_key_of_digest(file_sha256(path, cache_dir))


def gguf_cache_path(path: Path, cache_dir: Path) -> Path:
    """Where the converted folder of `path` is (or will be): `{stem}-{key}`, or an existing complete entry
    with the same key under another stem (the same content, saved under another name)."""
    key = gguf_cache_key(path, cache_dir)
    final = Path(cache_dir) / f"{Path(path).stem}-{key}"
    if not is_complete(final) and Path(cache_dir).is_dir():
        for other in sorted(Path(cache_dir).glob(f"*-{key}")):
            if not other.name.startswith(".") and is_complete(other):
                return other
    return final


def check_gguf_magic(path: Path) -> None:
    """The first four bytes: a file that is not GGUF at all fails here, before it is hashed."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from e
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a valid GGUF file (bad magic bytes)")


def check_gguf_file(path: Path) -> None:
    """Parse the GGUF header and tensor table; a corrupt or truncated file is a CheckpointError."""
    check_gguf_magic(path)
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

    A cache hit is a few stats and small JSON reads (integrity.py: each file's size, and its hash unless it
    is unchanged since it last hashed right): no transformers import, no model load.
    """
    path = Path(path).resolve()
    check_gguf_magic(path)
    final = gguf_cache_path(path, cache_dir)
    if is_trusted(final, cache_dir):  # a damaged entry is removed here, and converted again below
        return final
    check_gguf_file(path)
    message = (
        f"converting {path.name} ({size_text(path.stat().st_size)}) to a float32 safetensors folder in "
        f"{final.parent} (once per file; about 20 s for the bundled model on 2 cores)"
    )
    with progress_step(message):
        return publish_entry(final, lambda tmp: _convert_into(path, tmp))


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
            "content_sha256": file_sha256(path, dest.parent),  # dest is a temp folder in the cache: a lookup
            "converter_version": CONVERTER_VERSION,
            "transformers": transformers.__version__,
            "dtype": "float32",
        },
    )
