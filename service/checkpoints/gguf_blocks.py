"""A GGUF file's own Q4_1 / Q8_0 blocks for the linear layers, for `--quantization q4_1 | q8_0`.

The model is still loaded from the float32 folder that gguf.py converts (norms, embeddings, and the shapes
and config); these blocks then replace the float weights of the decoder's projections, and of the LM head
where the file's head (or the token embedding it is tied to) is Q4_1 or Q8_0, byte for byte as stored.

llama.cpp's converter permutes the rows of attn_q and attn_k (for its RoPE layout) and transformers
un-permutes them when it loads a GGUF; a row of a weight is whole blocks, so the same permutation of the
rows of blocks gives exactly the converted float weights' rows (checked at load: `matches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.checkpoints.bundled import BUNDLED_MODELS, require_bundled
from service.checkpoints.errors import CheckpointError, one_line

GGUF_QUANTIZATIONS = ("q4_1", "q8_0")
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


def _reader(path: Path):  # -> gguf.GGUFReader
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))  # numpy views over a read-only map of the file: nothing read yet
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid GGUF file: {one_line(e)}") from e


def _linear_types(reader) -> dict[str, str]:  # noqa: ANN001 (gguf.GGUFReader)
    """Each linear tensor of the decoder -> its ggml type name (lower case: "q4_1", "f16", ...)."""
    return {
        t.name: t.tensor_type.name.lower()
        for t in reader.tensors
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR_NAMES
    }


def quantization_refusal(ref: str, quantization: str) -> str | None:
    """Why `--quantization q4_1 | q8_0` cannot serve model `ref` (one line), or None. Reads the GGUF header
    and tensor table only."""
    flag = f"--quantization {quantization}"
    path = gguf_file_of(ref)
    if path is None:
        return f"{flag} serves a GGUF file's own blocks, and the model {ref!r} is not a GGUF file (use --quantization none)"
    try:
        types = _linear_types(_reader(path))
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
    """Every decoder linear's blocks (copied out of the map, un-permuted where transformers does), and the
    head's where it is Q4_1 or Q8_0. Raises CheckpointError where `quantization_refusal` would refuse."""
    reader = _reader(path)
    types = _linear_types(reader)
    if not types or any(kind != quantization for kind in types.values()):
        raise CheckpointError(f"{path}: its linear layers are {sorted(set(types.values()))}, not {quantization}")
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    permuted = architecture in PERMUTED_ARCHITECTURES
    tensors = {t.name: t for t in reader.tensors}
    weights: dict[str, WeightBlocks] = {}
    for name in types:
        _, layer, part, _ = name.split(".")
        t = tensors[name]
        blocks = np.array(t.data)  # [out_features, bytes per row]; a copy, the file stays closed to writes
        if permuted and part == "attn_q":
            blocks = _unpermute_rows(blocks, num_heads)
        elif permuted and part == "attn_k":
            blocks = _unpermute_rows(blocks, num_kv_heads)
        weights[f"model.layers.{layer}.{LINEAR_NAMES[part]}.weight"] = WeightBlocks(blocks, quantization, int(t.shape[0]))
    head_tensor = tensors.get("output.weight") or (tensors.get("token_embd.weight") if tied else None)
    head = None
    if head_tensor is not None and head_tensor.tensor_type.name.lower() in GGUF_QUANTIZATIONS:
        head = WeightBlocks(np.array(head_tensor.data), head_tensor.tensor_type.name.lower(), int(head_tensor.shape[0]))
    return GGUFLinears(quantization, weights, head)


def matches(blocks: WeightBlocks, weight: np.ndarray) -> bool:
    """The blocks dequantize to exactly these float32 weights (the converted checkpoint's): the same tensor,
    rows in the same order."""
    return blocks.blocks.shape[0] == weight.shape[0] and np.array_equal(blocks.dequantize(), weight)
