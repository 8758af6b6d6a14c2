"""A GGUF file's own Q4_1 / Q8_0 blocks for the linear layers, for `--quantization q4_1 | q8_0`.

The model is still loaded from the float32 folder that gguf.py converts (norms, embeddings, and the shapes
and config); these blocks then replace the float weights of the decoder's projections, and of the LM head
where the file's head (or the token embedding it is tied to) is Q4_1 or Q8_0, byte for byte as stored.

llama.cpp's converter permutes the rows of attn_q and attn_k (for its RoPE layout) and transformers
un-permutes them when it loads a GGUF; a row of a weight is whole blocks, so the same permutation of the
rows of blocks gives exactly the converted float weights' rows (checked at load: `matches`).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmserve.checkpoints.bundled import BUNDLED_MODELS, require_bundled
from lmserve.checkpoints.errors import CheckpointError, one_line

GGUF_QUANTIZATIONS = ("q4_1", "q8_0")
GGUF_BLOCK = 32
# GGUF tensor name part -> the Hugging Face name of the same weight in layer i
LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Architectures whose attn_q / attn_k rows transformers un-permutes (its LlamaTensorProcessor).
PERMUTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class WeightBlocks:
    """One weight [out_features, in_features] as stored: blocks uint8 [out_features, bytes per row]."""

    blocks: np.ndarray
    kind: str  # "q4_1" | "q8_0"
    in_features: int

    def dequantize(self) -> np.ndarray:
        """The float32 weights these blocks stand for (gguf's reference dequantization)."""
        import gguf

        return gguf.quants.dequantize(self.blocks, gguf.GGMLQuantizationType[self.kind.upper()])


@dataclass(frozen=True)
class GGUFLinears:
    kind: str  # the --quantization value: every linear of the decoder is of this type
    weights: dict[str, WeightBlocks]  # Hugging Face names, e.g. "model.layers.0.self_attn.q_proj.weight"
    head: WeightBlocks | None  # the LM head (output.weight, else token_embd where tied) if Q4_1 or Q8_0


def gguf_file_of(ref: str) -> Path | None:
    """The GGUF file a model reference serves (a bundled id stored as GGUF, or a .gguf path), else None."""
    if ref in BUNDLED_MODELS:
        location = require_bundled(ref)
        return location if location.suffix == ".gguf" else None
    path = Path(ref).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


# GGUF metadata value types -> struct format of one scalar (8: string, 9: array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml type ids this module names (the rest are reported by number)
_TYPE_NAMES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 10: "q2_k", 11: "q3_k", 12: "q4_k",
    13: "q5_k", 14: "q6_k", 30: "bf16",
}
_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str  # "q4_1", "q8_0", "f32", ... ("type N" for one not named here)
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length (in_features)
    offset: int  # from the file's start


@dataclass(frozen=True)
class TensorTable:
    architecture: str
    tensors: dict[str, TensorInfo]


def read_tensor_table(path: Path) -> TensorTable:
    """The architecture and the tensor table of a GGUF file (v2/v3), read from its header alone. A small
    reader of its own: gguf.GGUFReader also parses every metadata array (the tokenizer's ~100k strings) into
    numpy objects, which takes seconds; this one skips them."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_table(mm, path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid GGUF file: {one_line(e)}") from e


def _parse_table(mm: mmap.mmap, path: Path) -> TensorTable:
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, mm, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        length = take("Q")
        pos += length
        if pos > len(mm):
            raise ValueError("a string runs past the end of the file")
        return mm[pos - length : pos].decode()

    def skip(value_type: int) -> None:
        nonlocal pos
        if value_type == 8:
            length = take("Q")  # before the +=, which would read pos first
            pos += length
        elif value_type == 9:
            item_type, count = take("IQ")
            if item_type in _SCALARS:
                pos += struct.calcsize(_SCALARS[item_type]) * count
            else:
                for _ in range(count):
                    skip(item_type)
        elif value_type in _SCALARS:
            pos += struct.calcsize(_SCALARS[value_type])
        else:
            raise ValueError(f"unknown metadata value type {value_type}")

    if mm[:4] != b"GGUF":
        raise ValueError("bad magic bytes")
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not 2 or 3")
    architecture, alignment = "", 32
    for _ in range(n_kv):
        key = string()
        value_type = take("I")
        if key == "general.architecture" and value_type == 8:
            architecture = string()
        elif key == "general.alignment" and value_type in (4, 5):
            alignment = take(_SCALARS[value_type])
        else:
            skip(value_type)
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        shape = tuple(take("Q") for _ in range(n_dims))
        type_id, offset = take("IQ")
        infos.append((name, _TYPE_NAMES.get(type_id, f"type {type_id}"), shape, offset))
    data_start = -(-pos // alignment) * alignment
    tensors = {name: TensorInfo(name, kind, shape, data_start + offset) for name, kind, shape, offset in infos}
    for t in tensors.values():
        if t.kind in _BLOCK_BYTES and t.offset + _nbytes(t) > len(mm):
            raise ValueError(f"{t.name} runs past the end of the file ({path.stat().st_size} bytes)")
    return TensorTable(architecture, tensors)


def _nbytes(t: TensorInfo) -> int:
    rows = math.prod(t.shape[1:])
    return rows * t.shape[0] // GGUF_BLOCK * _BLOCK_BYTES[t.kind]


def _read_blocks(path: Path, t: TensorInfo) -> WeightBlocks:
    """One Q4_1 / Q8_0 tensor's blocks, [rows, bytes per row], read into memory."""
    rows, row_bytes = math.prod(t.shape[1:]), t.shape[0] // GGUF_BLOCK * _BLOCK_BYTES[t.kind]
    blocks = np.fromfile(path, dtype=np.uint8, count=rows * row_bytes, offset=t.offset).reshape(rows, row_bytes)
    return WeightBlocks(blocks, t.kind, int(t.shape[0]))


def _linear_types(table: TensorTable) -> dict[str, str]:
    """Each linear tensor of the decoder -> its type name ("q4_1", "f16", ...)."""
    return {
        name: t.kind
        for name, t in table.tensors.items()
        if name.startswith("blk.") and name.endswith(".weight") and name.count(".") == 3
        and name.split(".")[2] in LINEAR_NAMES  # not their biases (Qwen2's q/k/v), which stay float
    }


def quantization_refusal(ref: str, quantization: str) -> str | None:
    """Why `--quantization q4_1 | q8_0` cannot serve model `ref` (one line), or None. Reads the GGUF header
    and tensor table only."""
    flag = f"--quantization {quantization}"
    path = gguf_file_of(ref)
    if path is None:
        return f"{flag} serves a GGUF file's own blocks, and the model {ref!r} is not a GGUF file (use --quantization none)"
    try:
        types = _linear_types(read_tensor_table(path))
    except CheckpointError as e:
        return str(e)
    if not types:
        return f"{flag}: {path.name} has no decoder linear layers (blk.N.attn_q ... ffn_down) that it knows"
    others = sorted({kind for kind in types.values() if kind != quantization})
    if others:
        found = ", ".join(sorted(set(types.values())))
        return f"{flag}: the linear layers of {path.name} are {found}, not all {quantization} (use --quantization none)"
    return None


def _unpermute_rows(blocks: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' _reverse_permute_weights on whole rows: [n_head, 2, half] row order -> [n_head, half, 2]."""
    rows = blocks.shape[0]
    order = np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(2, 1).reshape(rows)
    return np.ascontiguousarray(blocks[order])


def read_gguf_linears(path: Path, quantization: str, num_heads: int, num_kv_heads: int, tied: bool) -> GGUFLinears:
    """Every decoder linear's blocks (read into memory, un-permuted where transformers does), and the head's
    where it is Q4_1 or Q8_0. Raises CheckpointError where `quantization_refusal` would refuse."""
    table = read_tensor_table(path)
    types = _linear_types(table)
    if not types or any(kind != quantization for kind in types.values()):
        raise CheckpointError(f"{path}: its linear layers are {sorted(set(types.values()))}, not {quantization}")
    permuted = table.architecture in PERMUTED_ARCHITECTURES
    weights: dict[str, WeightBlocks] = {}
    for name in types:
        _, layer, part, _ = name.split(".")
        w = _read_blocks(path, table.tensors[name])
        if permuted and part in ("attn_q", "attn_k"):
            w = WeightBlocks(_unpermute_rows(w.blocks, num_heads if part == "attn_q" else num_kv_heads), w.kind, w.in_features)
        weights[f"model.layers.{layer}.{LINEAR_NAMES[part]}.weight"] = w
    # the head the float model computes with: the embedding where tied (as transformers ties it), else output
    head_info = table.tensors.get("token_embd.weight" if tied else "output.weight")
    head = _read_blocks(path, head_info) if head_info is not None and head_info.kind in GGUF_QUANTIZATIONS else None
    return GGUFLinears(quantization, weights, head)


def matches(blocks: WeightBlocks, weight: np.ndarray) -> bool:
    """The blocks dequantize to exactly these float32 weights (the converted checkpoint's): the same tensor,
    rows in the same order."""
    return blocks.blocks.shape[0] == weight.shape[0] and np.array_equal(blocks.dequantize(), weight)
