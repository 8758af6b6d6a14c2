"""GGUF Q4_1 / Q8_0 blocks as weights (qgemm_gguf.c): a GGUF file's quantized projections kept as they
are stored, multiplied by gguf_gemm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.engine.modeling import kernel_abi, kernel_loader
from lmserve.engine.modeling.qgemm import quantized_matmul

GGUF_BLOCK = kernel_abi.read().constants["GGUF_BLOCK"]
# --quantization value -> (ggml type id, bytes per block of GGUF_BLOCK weights)
GGUF_TYPES = {
    "q4_1": (kernel_abi.read().constants["GGUF_Q4_1"], 20),
    "q8_0": (kernel_abi.read().constants["GGUF_Q8_0"], 34),
}
GGUF_ISAS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C"}


@dataclass(frozen=True)
class GGUFWeight:
    """A weight [out_features, in_features] as a GGUF file stores it: data uint8 [out_features, in_features /
    32 * block bytes], each row its blocks of 32 weights (Q4_1: f16 d, f16 m, 16 bytes of nibbles; Q8_0: f16
    d, 32 int8), for gguf_gemm. `kind` is "q4_1" or "q8_0"."""

    data: torch.Tensor
    kind: str
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        block_bytes = GGUF_TYPES[self.kind][1]
        expected = (self.out_features, self.in_features // GGUF_BLOCK * block_bytes)
        if self.in_features % GGUF_BLOCK or self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(
                f"a {self.kind} weight [{self.out_features}, {self.in_features}] needs uint8 blocks {expected}, "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
            )
        if not self.data.is_contiguous():
            raise ValueError("GGUF weight blocks must be contiguous")


def gguf_gemm_available() -> bool:
    """gguf_gemm runs here: the kernels are loaded (any CPU; the instruction set is gguf_isa's)."""
    return kernel_loader.library() is not None


def gguf_isa() -> str:
    """Which inner loop the loaded library's gguf_gemm runs: AVX-512 VNNI, AVX2 or plain C."""
    return GGUF_ISAS[int(kernel_loader.loaded_library().lmserve_gguf_isa())]


def gguf_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation quantization gguf_gemm applies, alone (for the tests): float32 [M, K] -> (int8 [M, K],
    block scales dx [M, K / 32], dx * block sums [M, K / 32])."""
    x2 = x.float().contiguous()
    rows, k = x2.shape
    qx = torch.empty(rows, k, dtype=torch.int8)
    dx = torch.empty(rows, k // GGUF_BLOCK, dtype=torch.float32)
    sx = torch.empty_like(dx)
    kernel_loader.loaded_library().gguf_quantize_rows(
        x2.data_ptr(), qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), rows, k, torch.get_num_threads()
    )
    return qx, dx, sx


def gguf_gemm(x: torch.Tensor, weight: GGUFWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] float32 @ weight.T -> [..., out_features] float32 by qgemm_gguf.c (x quantized
    per block of 32 inside the call; + bias, float32, in the same call)."""

    def call(x_ptr: int, bias_ptr: int | None, out_ptr: int, rows: int) -> int:
        return kernel_loader.loaded_library().gguf_gemm(
            x_ptr, weight.data.data_ptr(), bias_ptr, out_ptr, rows, weight.out_features, weight.in_features,
            GGUF_TYPES[weight.kind][0], torch.get_num_threads(),
        )  # fmt: skip

    return quantized_matmul("gguf_gemm", x, weight.in_features, weight.out_features, bias, call)
