"""GGUF files: validate, dequantize once to a float32 safetensors HF folder, and cache it.

Cache entry: `cache_dir / f"{stem}-{key}"`, where key hashes the file's content (its sha256, computed
once and remembered by path, size and mtime_ns: fingerprint.py) plus the converter and transformers
versions. Keyed by content, not path, so two clones whose virtual environments hold the same bundled
GGUF share one converted copy; an entry of the same content under another file name is reused too.
Float32 because it is exactly what transformers' own GGUF loading produces, so float32 runs match it
bit for bit.

Where transformers' GGUF loading drops what the file states (soft-caps, sliding windows, rope scaling: see
`dropped_config`), the converted config takes it back from the file's own metadata; rope scaling it cannot state
exactly is refused rather than converted wrong. The saved tokenizer reloads as the pipeline transformers built.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lmserve.checkpoints.errors import CheckpointError, one_line
from lmserve.checkpoints.fingerprint import file_sha256
from lmserve.checkpoints.integrity import is_trusted, publish_entry
from lmserve.checkpoints.weights import is_complete, save_plain_model, write_marker
from lmserve.progress import progress_step, size_text

GGUF_MAGIC = b"GGUF"
# Bump when the conversion output changes, so old cache entries are not reused.
CONVERTER_VERSION = "2"
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
        dropped = dropped_config(path)  # first: a file refused for its rope scaling costs no model load
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
    _restore_config(model.config, dropped)
    save_plain_model(model, dest)  # also writes generation_config.json
    _save_tokenizer(tokenizer, dest)
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


# What transformers' GGUF loading (5.23) does not read, per architecture: GGUF key (after "{arch}.") -> config field.
_DROPPED_KEYS: dict[str, dict[str, str]] = {
    "gemma2": {
        "attn_logit_softcapping": "attn_logit_softcapping",  # else always 50.0
        "final_logit_softcapping": "final_logit_softcapping",  # else always 30.0
    },
    "phi3": {
        "attention.sliding_window": "sliding_window",  # 0 is llama.cpp's "none"
        "rope.scaling.original_context_length": "original_max_position_embeddings",
    },
}
# Rope scaling llama.cpp states in keys, which no architecture here reads: rope.scaling.{key} -> rope_parameters.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "yarn_attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
_ROPE_SCALING_TYPES = ("linear", "yarn")
# What llama.cpp's converter computes Llama 3's rope_freqs from, beside the factor: its original context is the
# config's top-level original_max_position_embeddings, else 8192 (it never reads the rope's own), and every
# Llama 3.x states these three.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def dropped_config(path: Path) -> dict[str, Any]:
    """The config fields the GGUF file states and transformers' GGUF loading drops (keeping the config class's
    defaults), as the Hugging Face config names them; "rope_parameters" holds the rope scaling, to merge over the
    rope transformers read. A CheckpointError naming the file for rope scaling this cannot state exactly."""
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict, read_gguf_metadata

    def refuse(why: str) -> NoReturn:
        raise CheckpointError(f"cannot convert GGUF file {path}: {why}")

    metadata, tensor_names = read_gguf_metadata(str(path))
    arch = metadata["general.architecture"]
    key = lambda name: metadata.get(f"{arch}.{name}")  # noqa: E731
    fields = {field: _decimal(key(k)) for k, field in _DROPPED_KEYS.get(arch, {}).items() if key(k) is not None}
    if fields.get("sliding_window") == 0:
        fields["sliding_window"] = None
    rope: dict[str, Any] = {}
    if arch in ("gemma2", "phi3"):
        width = key("embedding_length") // key("attention.head_count")
        head_dim = key("attention.key_length") or width
        if arch == "gemma2":  # no key: llama.cpp scales queries by hidden/heads for the 27B (46 layers), else head_dim
            fields["query_pre_attn_scalar"] = width if key("block_count") == 46 else head_dim
        elif key("rope.dimension_count") not in (None, head_dim):  # a partial rotary (Phi-4-mini)
            rope["partial_rotary_factor"] = key("rope.dimension_count") / head_dim

    prefix = f"{arch}.rope.scaling."
    scaling = {name.removeprefix(prefix): v for name, v in metadata.items() if name.startswith(prefix)}
    kind = scaling.pop("type", "none")
    scaling.pop("finetuned", None)  # a note, not a parameter
    if kind in _ROPE_SCALING_TYPES:
        if unknown := sorted(set(scaling) - set(_ROPE_SCALING_KEYS)):
            refuse(f"its {kind} rope scaling states {', '.join(prefix + k for k in unknown)}, which is not supported")
        rope |= {"rope_type": kind} | {_ROPE_SCALING_KEYS[k]: _decimal(v) for k, v in scaling.items()}
    elif kind != "none":
        refuse(f"rope scaling type {kind!r} ({prefix}type) is not supported")

    rope_tensors = sorted(name for name in tensor_names if name.startswith("rope_"))
    if rope_tensors:  # the rest of the rope scaling llama.cpp writes: per-frequency factors, as tensors
        stored = load_gguf_state_dict(GgufHeader.from_file(str(path)))
        values = lambda name: stored[name][...].float()  # noqa: E731
        if rope_tensors == ["rope_freqs.weight"] and "rope_type" not in rope:
            dim = key("rope.dimension_count") or key("attention.key_length")
            dim = dim or key("embedding_length") // key("attention.head_count")
            rope |= _llama3_rope(values("rope_freqs.weight"), key("rope.freq_base") or 10000.0, dim, refuse)
        elif rope_tensors == ["rope_factors_long.weight", "rope_factors_short.weight"] and arch == "phi3":
            # LongRoPE (Phi-3 128k). transformers reads the factors as float32 too, and derives the attention
            # factor llama.cpp stores from max_position_embeddings / original_max_position_embeddings, as here.
            rope |= {
                "rope_type": "longrope",
                "long_factor": [_decimal(v) for v in values("rope_factors_long.weight").tolist()],
                "short_factor": [_decimal(v) for v in values("rope_factors_short.weight").tolist()],
                "original_max_position_embeddings": fields.get("original_max_position_embeddings", 4096),
            }
        else:
            refuse(f"its rope tensors {', '.join(rope_tensors)} are not supported")
    if rope:
        fields["rope_parameters"] = rope
    return fields


def _decimal(value: Any) -> Any:
    """A float32 metadata value as the decimal a config states: 1.1, not 1.100000023841858."""
    import numpy as np

    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def _llama3_rope(divisors: Any, base: float, dim: int, refuse: Callable[[str], NoReturn]) -> dict[str, Any]:
    """Llama 3 rope scaling, which llama.cpp stores as one divisor per frequency (rope_freqs.weight). The divisors
    fix the factor (the largest) but only ratios of the rest, so llama.cpp's own values stand for those
    (_LLAMA3_ROPE), taken only if they give back the stored divisors."""
    import torch

    if bool((divisors == 1).all()):
        return {}
    params = {"rope_type": "llama3", "factor": _decimal(float(divisors.max())), **_LLAMA3_ROPE}
    # llama.cpp's computation (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors), in float32 as there
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    smoothed = 1 / ((1 - smooth) / factor + smooth)
    expected = torch.where(wavelen < context / high, 1.0, torch.where(wavelen > context / low, factor, smoothed))
    if expected.shape != divisors.shape or not torch.allclose(expected, divisors, rtol=1e-5, atol=0.0):
        refuse(
            "its rope_freqs.weight tensor (llama.cpp's per-frequency rope scaling) is not supported: only Llama 3 "
            f"rope scaling with low/high frequency factors {low:g}/{high:g} and an original context of {context} "
            "converts exactly, and these divisors are not that"
        )
    return params


def _restore_config(config: Any, dropped: dict[str, Any]) -> None:
    """Set what dropped_config found on the config transformers built; its rope scaling only over a rope
    transformers read as plain (it keeps rope_theta)."""
    dropped = dict(dropped)
    rope = dropped.pop("rope_parameters", None)
    for name, value in dropped.items():
        setattr(config, name, value)
    current = dict(getattr(config, "rope_parameters", None) or {})
    if rope and current.get("rope_type", "default") == "default":
        config.rope_parameters = current | rope


def _save_tokenizer(tokenizer: Any, dest: Path) -> None:
    """save_pretrained, so that the folder reloads as the pipeline transformers built from the file where it can.
    transformers builds the pipeline the file's vocabulary states but names the architecture's tokenizer class,
    which may build its own on reload: a Gemma 2 file with a byte-level BPE vocabulary reloads as sentencepiece,
    every space unknown. There the folder names transformers' generic fast tokenizer, which takes tokenizer.json as
    saved. (For some model types, Qwen2's among them, AutoTokenizer loads the registered class whatever the folder
    names: those keep it.)"""
    import transformers

    tokenizer.save_pretrained(str(dest))
    built = tokenizer.backend_tokenizer.to_str()

    def reloads_as_built() -> bool:
        reloaded = transformers.AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
        return reloaded.backend_tokenizer.to_str() == built

    if reloads_as_built():
        return
    config_path = dest / "tokenizer_config.json"
    saved = config_path.read_text()
    generic = json.loads(saved) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    config_path.write_text(json.dumps(generic, indent=2, ensure_ascii=False) + "\n")
    if not reloads_as_built():
        config_path.write_text(saved)
