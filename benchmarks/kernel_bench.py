"""The bf16 C kernels alone, on SmolLM2-135M's shapes: gemm.c against oneDNN, paged attention's read rate.

    .venv/bin/python benchmarks/kernel_bench.py [--rows 1 16 64 512] [--seqs 16 64] [--context 200]

Runs on a second thread after prepare_to_serve(), as the engine does. For each row count: every projection
of one layer (qkv, o, gate_up with gemm.c's SiLU epilogue, down) and the LM head, median time of gemm.c and
of oneDNN's packed matmul,
and their GFLOP/s. Each weight is used once per timed pass over 30 layers' worth of distinct weights, so
that the weights come from memory, not from the cache, as in a decode step. For attention: one layer's
decode step over `--context` cached tokens per sequence in blocks scattered over the pool (as after
hours of traffic), and the KV bytes it reads per second, with the pool on 2 MiB pages (as the engine
asks for) and on 4 KiB pages.
"""

from __future__ import annotations

import argparse
import threading

import torch

from benchkit.kernel_timing import HEAD, SHAPES, median_time
from lmserve.config import default_c_compiler, default_cache_dir
from lmserve.engine.modeling import gemm, kernel_loader
from lmserve.engine.modeling.attention import SeqLayout, build_metadata, paged_attention
from lmserve.engine.runner import advise_huge_pages
from lmserve.process import prepare_to_serve

LAYERS = 30


def bench_gemm(rows: list[int]) -> None:
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    ours = gemm.gemm_bf16
    print(f"{'rows':>5} {'matmul':>8} {'gemm.c ms':>10} {'GFLOP/s':>8} {'oneDNN ms':>10} {'GFLOP/s':>8} {'ratio':>6}")
    for m in rows:
        total = {"gemm.c": 0.0, "oneDNN": 0.0}
        for name, (n, k) in [*SHAPES.items(), ("lm_head", HEAD)]:
            count = 1 if name == "lm_head" else LAYERS
            weights = [torch.randn(n, k).mul(0.05).bfloat16() for _ in range(count)]
            # gate/up as the model runs it: SiLU-and-multiply in gemm.c's epilogue (oneDNN: the matmul only).
            packed = {"gemm.c": [gemm.pack_weight(w, silu_mul=name == "gate_up") for w in weights],
                      "oneDNN": [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]}
            x = torch.randn(m, k).bfloat16()
            t = {}
            for kind, fn in (("gemm.c", ours), ("oneDNN", onednn)):
                t[kind] = median_time(lambda: [fn(x, w) for w in packed[kind]]) / count  # noqa: B023
                total[kind] += t[kind] * count
            flops = 2 * m * n * k
            print(f"{m:5d} {name:>8} {t['gemm.c'] * 1e3:10.3f} {flops / t['gemm.c'] / 1e9:8.0f} "
                  f"{t['oneDNN'] * 1e3:10.3f} {flops / t['oneDNN'] / 1e9:8.0f} {t['oneDNN'] / t['gemm.c']:6.2f}")
        print(f"{m:5d} {'step':>8} {total['gemm.c'] * 1e3:10.2f} {'':>8} {total['oneDNN'] * 1e3:10.2f} {'':>8} "
              f"{total['oneDNN'] / total['gemm.c']:6.2f}   (all {LAYERS} layers and the head)")


def bench_attention(seqs: list[int], context: int, huge_pages: bool) -> None:
    heads, kv_heads, head_dim, block = 9, 3, 64, 16
    for n in seqs:
        blocks_per_seq = -(-(context + 1) // block)
        num_blocks = n * blocks_per_seq * LAYERS
        perm = torch.randperm(num_blocks).view(LAYERS, n, blocks_per_seq)  # scattered, as a busy pool is
        cache = torch.empty(2, kv_heads, num_blocks, block, head_dim, dtype=torch.bfloat16)
        if huge_pages:
            advise_huge_pages(cache)  # as the engine's KV pool is
        cache.normal_()
        q = torch.randn(n, heads, head_dim).bfloat16()
        k = torch.randn(n, kv_heads, head_dim).bfloat16()
        metas = [build_metadata([SeqLayout(i, 1, context, perm[layer, i].tolist()) for i in range(n)], block,
                                torch.device("cpu"), torch.bfloat16, use_kernel=True) for layer in range(LAYERS)]
        t = median_time(lambda: [paged_attention(q, k, k, cache, m, head_dim**-0.5, cache_written=True)
                                 for m in metas]) / LAYERS  # fmt: skip
        kv_bytes = 2 * n * kv_heads * (context + 1) * head_dim * 2
        print(f"attention ({'2 MiB' if huge_pages else '4 KiB'} pages): {n:3d} seqs x {context + 1} keys, one layer {t * 1e3:.3f} ms, "
              f"{LAYERS} layers {t * LAYERS * 1e3:.1f} ms, KV read {kv_bytes / t / 1e9:.1f} GB/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    p.add_argument("--seqs", type=int, nargs="+", default=[16, 64])
    p.add_argument("--context", type=int, default=200)
    args = p.parse_args()
    kernel_loader.load_kernels(default_cache_dir(), default_c_compiler())
    if not gemm.gemm_bf16_available():
        raise SystemExit("gemm.c does not run here (no C compiler, no AVX-512 BF16, or AMX present)")
    num_threads = torch.get_num_threads()
    prepare_to_serve()

    def run() -> None:
        torch.set_num_threads(num_threads)
        bench_gemm(args.rows)
        for huge_pages in (True, False):
            bench_attention(args.seqs, args.context, huge_pages)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()


if __name__ == "__main__":
    main()
