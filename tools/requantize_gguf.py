"""Rewrite a GGUF file with its quantized linears in another GGUF block type (as llama.cpp's
`llama-quantize --allow-requantize` would), metadata and tokenizer copied as they are.

    PYTHONPATH=. .venv/bin/python tools/requantize_gguf.py SOURCE.gguf DEST.gguf [--type Q8_0]

Made for `--quantization q8_0`, which serves a file whose linears are all Q8_0: the bundled model is Q4_1,
so its Q8_0 twin is made here (every Q4_0/Q4_1/Q5_x/Q8_0/F16/BF16 2-D weight dequantized by gguf-py and
quantized again to --type; 1-D tensors such as the norms stay as stored). Requantizing 4-bit weights to 8
bits cannot bring back what 4 bits lost: the point is a real file of the target type, not a better model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys
from gguf.quants import dequantize, quantize

# llama.cpp's llama_ftype for a file "mostly" of one type (general.file_type).
FILE_TYPES = {GGMLQuantizationType.Q8_0: 7, GGMLQuantizationType.Q4_1: 3, GGMLQuantizationType.Q4_0: 2}
REQUANTIZABLE = {
    GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
}  # fmt: skip


def requantize(source: Path, dest: Path, target: GGMLQuantizationType) -> dict[str, int]:
    """Write dest; returns how many tensors were requantized and kept."""
    reader = GGUFReader(source)
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    writer = GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = FILE_TYPES[target] if field.name == Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    counts = {"requantized": 0, "kept": 0}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
        if tensor.tensor_type in REQUANTIZABLE and len(shape) == 2 and tensor.tensor_type != target:
            weights = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
            writer.add_tensor(tensor.name, quantize(weights, target), raw_dtype=target)
            counts["requantized"] += 1
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
            counts["kept"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--type", default="Q8_0", choices=["Q8_0", "Q4_1", "Q4_0"])
    args = p.parse_args()
    counts = requantize(args.source, args.dest, GGMLQuantizationType[args.type])
    print(f"wrote {args.dest} ({args.dest.stat().st_size / 2**20:.1f} MiB): {counts['requantized']} tensors "
          f"requantized to {args.type}, {counts['kept']} kept as stored")  # fmt: skip


if __name__ == "__main__":
    main()
