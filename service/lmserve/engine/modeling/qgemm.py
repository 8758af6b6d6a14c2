"""The int8 matrix multiply of `--quantization int8` under float32 activations (qgemm.c): weights quantized
per output channel and packed once (quantize_weight), multiplied by qgemm_int8."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.engine.modeling import kernel_abi, kernel_loader

_QCOLS = kernel_abi.read().constants["QGEMM_GROUP_COLS"]
_QK = kernel_abi.read().constants["QGEMM_K_ALIGN"]
QGEMM_ISAS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C"}
# qgemm_gguf.c's block along K: its kernel fails (2) for an in_features off it (quantized_matmul).
_GGUF_BLOCK = kernel_abi.read().constants["GGUF_BLOCK"]


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [out_features, in_features] as symmetric int8 with one float32 scale per output channel
    (|row|max / 127), packed for qgemm_int8 (see qgemm.c): data [ceil(out / 4), Kp / 32, 4, 32] int8 with
    Kp = in_features rounded up to 32, padding zero; scales [out padded to 4] float32, padding zero."""

    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] these int8 values and scales stand for."""
        groups, steps = self.data.shape[:2]
        q = self.data.permute(0, 2, 1, 3).reshape(groups * _QCOLS, steps * _QK)
        w = q[: self.out_features, : self.in_features].float()
        return w * self.scales[: self.out_features, None]


def qgemm_available() -> bool:
    """qgemm_int8 runs here: the kernels are loaded (any CPU; the instruction set is qgemm_isa's)."""
    return kernel_loader.library() is not None


def qgemm_isa() -> str:
    """Which inner loop the loaded library's qgemm_int8 runs: AVX-512 VNNI, AVX2 or plain C."""
    return QGEMM_ISAS[int(kernel_loader.loaded_library().lmserve_qgemm_isa())]


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Quantize a float weight [out, in] per output channel (symmetric: scale = |row|max / 127, values
    rounded to nearest even and clamped to [-127, 127]) and pack it for qgemm_int8."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    scales = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    n_pad = -(-out_features // _QCOLS) * _QCOLS
    k_pad = -(-in_features // _QK) * _QK
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int8)
    padded[:out_features, :in_features] = q
    data = padded.view(n_pad // _QCOLS, _QCOLS, k_pad // _QK, _QK).permute(0, 2, 1, 3).contiguous()
    padded_scales = torch.zeros(n_pad, dtype=torch.float32)
    padded_scales[:out_features] = scales
    return QuantizedWeight(data, padded_scales, out_features, in_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization qgemm_int8 applies: float32 [M, K] -> (int8 [M, Kp] with zero padding,
    float32 scales [M, Kp / 32], one per block of 32 along K). For the tests; qgemm_int8 does it inside
    its own call."""
    x2 = x.contiguous()
    rows, k = x2.shape
    k_pad = -(-k // _QK) * _QK
    xq = torch.empty(rows, k_pad, dtype=torch.int8)
    sx = torch.empty(rows, k_pad // _QK, dtype=torch.float32)
    if rows:
        kernel_loader.loaded_library().quantize_rows_int8(
            x2.data_ptr(), xq.data_ptr(), sx.data_ptr(), rows, k, k_pad, torch.get_num_threads()
        )
    return xq, sx


def quantized_matmul(
    kind: str, x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None, call
) -> torch.Tensor:
    """What qgemm_int8 and gguf_gemm share: float32 x [..., in_features] flattened to rows, a float32 out
    [rows, out_features], `call(x_ptr, bias_ptr or None, out_ptr, rows)` (the kernel; 0, 1: no memory, 2: K
    not a multiple of 32, qgemm_gguf.c's) where there are rows, and out shaped as x's leading dimensions."""
    if x.dtype != torch.float32:
        raise ValueError(f"{kind} takes float32 activations, not {x.dtype}")
    if bias is not None:
        kernel_loader.check_tensors(kind, bias, dtype=torch.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.float32)
    failed = call(x2.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), rows) if rows else 0
    if failed == 2:
        raise ValueError(f"{kind}: in_features {in_features} is not a multiple of {_GGUF_BLOCK}")
    if failed:
        raise MemoryError(f"{kind} could not allocate its activation buffer")
    return out.view(*lead, out_features)


def qgemm_int8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] float32 @ weight.T -> [..., out_features] float32, by qgemm.c: x quantized to
    int8 with a scale per block of 32 values of a row, the products summed in int32 per block, scaled back
    (+ bias, float32, added in the same call)."""

    def call(x_ptr: int, bias_ptr: int | None, out_ptr: int, rows: int) -> int:
        return kernel_loader.loaded_library().qgemm_int8(
            x_ptr, weight.data.data_ptr(), weight.scales.data_ptr(), bias_ptr, out_ptr, rows, weight.out_features,
            weight.in_features, torch.get_num_threads(),
        )  # fmt: skip

    return quantized_matmul("qgemm_int8", x, weight.in_features, weight.out_features, bias, call)
