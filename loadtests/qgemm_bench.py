"""qgemm.c (`--quantization int8`) alone against oneDNN's float32 matmul, on SmolLM2-135M's projection shapes.

    PYTHONPATH=. .venv/bin/python loadtests/qgemm_bench.py [--rows 1 16 64] [--layers 30] [--repeats 5]

For each row count and shape (qkv, o, gate_up, down): the median time of one pass over --layers distinct
weights (so that the weights come from memory, as in a decode step, not from the cache) with
native_kernels.qgemm_int8 (activations quantized inside the call) and with oneDNN's `_linear_pointwise` on
the float32 weights (the path `--dtype float32` takes), per weight, and float32's time over int8's.
"""

from __future__ import annotations

import argparse

import torch

from service.config import default_c_compiler, default_cache_dir
from service.engine.modeling import native_kernels

from kernel_bench import SHAPES, median_time  # the same shapes and timing as the bf16 kernels' bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if native_kernels.load_kernels(default_cache_dir(), default_c_compiler()) is None:
        raise SystemExit("the C kernels could not be built here")
    print(f"qgemm.c inner loop: {native_kernels.qgemm_isa()}; {torch.get_num_threads()} threads")
    print("| rows | shape (out x in) | float32 oneDNN | int8 qgemm.c | float32 / int8 |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        weights = [torch.randn(out_features, in_features, generator=gen) * 0.05 for _ in range(args.layers)]
        quantized = [native_kernels.quantize_weight(w) for w in weights]
        for rows in args.rows:
            x = torch.randn(rows, in_features, generator=gen)

            def float32() -> None:
                for w in weights:
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

            def int8() -> None:
                for q in quantized:
                    native_kernels.qgemm_int8(x, q)

            f32_s = median_time(float32, args.repeats) / args.layers
            int8_s = median_time(int8, args.repeats) / args.layers
            print(f"| {rows} | {name} ({out_features} x {in_features}) | {f32_s * 1e6:.0f} us | {int8_s * 1e6:.0f} us | "
                  f"{f32_s / int8_s:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
