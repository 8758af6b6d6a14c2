"""qgemm.c (`--quantization int8`) alone against oneDNN's float32 matmul, on SmolLM2-135M's projection shapes;
with --bf16, qgemm_vnni.c (int8 under bf16 activations, AVX-512 VNNI and BF16 CPUs) against gemm.c's bf16.

    .venv/bin/python benchmarks/qgemm_bench.py [--rows 1 16 64] [--layers 30] [--repeats 5] [--bf16]

For each row count and shape (qkv, o, gate_up, down): the median time of one pass over --layers distinct
weights (so that the weights come from memory, as in a decode step, not from the cache) with
qgemm.qgemm_int8 (activations quantized inside the call) and with oneDNN's `_linear_pointwise` on
the float32 weights (the path `--dtype float32` takes), per weight, and float32's time over int8's. With
--bf16 the same for qgemm_vnni against gemm_bf16 (the bf16 default's kernel), the LM head (49152 x 576,
float32 logits out, 2 distinct weights) included, with each kernel's multiply-adds per second.
"""

from __future__ import annotations

import argparse

import torch

from benchkit.kernel_timing import HEAD, SHAPES, median_time  # the same shapes and timing as kernel_bench.py's
from lmserve.config import default_c_compiler, default_cache_dir
from lmserve.engine.modeling import gemm, kernel_loader, qgemm


def bf16_table(rows_list: list[int], layers: int, repeats: int) -> None:
    """qgemm_vnni (int8 weights, bf16 activations) against gemm_bf16 on the same bf16 weights."""
    from lmserve.engine.modeling import qgemm_vnni

    if not (qgemm_vnni.available() and gemm.gemm_bf16_available()):
        raise SystemExit("qgemm_vnni.c and gemm.c need a CPU with AVX-512 VNNI and BF16")
    print(f"qgemm_vnni.c against gemm.c; {torch.get_num_threads()} threads")
    print("| rows | shape (out x in) | bf16 gemm.c | int8 qgemm_vnni.c | bf16 / int8 | G multiply-adds/s bf16, int8 |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in {**SHAPES, "head": HEAD}.items():
        count = 2 if name == "head" else layers
        out_dtype = torch.float32 if name == "head" else torch.bfloat16
        weights = [(torch.randn(out_features, in_features, generator=gen) * 0.05).bfloat16() for _ in range(count)]
        packed = [gemm.pack_weight(w) for w in weights]
        quantized = [qgemm_vnni.pack_vnni(w) for w in weights]
        for rows in rows_list:
            x = torch.randn(rows, in_features, generator=gen).bfloat16()
            bf16_s = median_time(lambda: [gemm.gemm_bf16(x, p, out_dtype=out_dtype) for p in packed], repeats) / count
            int8_s = median_time(lambda: [qgemm_vnni.qgemm_vnni(x, q, out_dtype=out_dtype) for q in quantized], repeats) / count
            macs = rows * out_features * in_features
            print(f"| {rows} | {name} ({out_features} x {in_features}) | {bf16_s * 1e6:.0f} us | {int8_s * 1e6:.0f} us | "
                  f"{bf16_s / int8_s:.2f}x | {macs / bf16_s / 1e9:.0f}, {macs / int8_s / 1e9:.0f} |", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="qgemm_vnni.c against gemm.c instead")
    args = p.parse_args()
    if kernel_loader.load_kernels(default_cache_dir(), default_c_compiler()) is None:
        raise SystemExit("the C kernels could not be built here")
    if args.bf16:
        bf16_table(args.rows, args.layers, args.repeats)
        return
    print(f"qgemm.c inner loop: {qgemm.qgemm_isa()}; {torch.get_num_threads()} threads")
    print("| rows | shape (out x in) | float32 oneDNN | int8 qgemm.c | float32 / int8 |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        weights = [torch.randn(out_features, in_features, generator=gen) * 0.05 for _ in range(args.layers)]
        quantized = [qgemm.quantize_weight(w) for w in weights]
        for rows in args.rows:
            x = torch.randn(rows, in_features, generator=gen)

            def float32() -> None:
                for w in weights:
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

            def int8() -> None:
                for q in quantized:
                    qgemm.qgemm_int8(x, q)

            f32_s = median_time(float32, args.repeats) / args.layers
            int8_s = median_time(int8, args.repeats) / args.layers
            print(f"| {rows} | {name} ({out_features} x {in_features}) | {f32_s * 1e6:.0f} us | {int8_s * 1e6:.0f} us | "
                  f"{f32_s / int8_s:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
