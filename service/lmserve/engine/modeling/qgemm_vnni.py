"""int8 weights with bf16 activations (qgemm_vnni.c): `--quantization int8` where the CPU has AVX-512 BF16 and
VNNI, the bf16 path's fused C code around int8 matrix multiplies (decoder.c's decoder_stack_bf16 with
LMSERVE_WEIGHT_INT8), and the LM head in int8 too.

    weight = pack_vnni(linear.weight)                 # at load: int8 per output channel, +128 as u8, packed
    y = qgemm_vnni(x_bf16, weight, bias)              # bf16 out; out_dtype=torch.float32 for logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.engine.modeling import kernel_abi, kernel_loader
from lmserve.engine.modeling.gemm import bf16_matmul, interleave_gate_up

_VCOLS = kernel_abi.read().constants["VNNI_GROUP_COLS"]
_QK = kernel_abi.read().constants["QGEMM_K_ALIGN"]


@dataclass(frozen=True)
class VNNIWeight:
    """A weight [out_features, in_features] as symmetric int8 with one float32 scale per output channel
    (|row|max / 127, as qgemm.QuantizedWeight's), stored plus 128 as uint8 and packed for
    qgemm_vnni (see qgemm_vnni.c): data [ceil(out / 32), Kp / 4, 32, 4] uint8, Kp = in_features rounded up to
    32, padding 128 (weight 0); scales [out padded to 32] float32, padding zero. silu_mul: a gate/up weight
    whose group g holds gate columns 16g..16g+15 then the matching up columns (qgemm_vnni then writes
    silu(gate) * up; the bias stays in its own order)."""

    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int
    silu_mul: bool = False

    def int8_values(self) -> torch.Tensor:
        """The int8 weights [out_features, in_features] in the checkpoint's column order, as int16."""
        groups, quads = self.data.shape[:2]
        q = self.data.permute(0, 2, 1, 3).reshape(groups * _VCOLS, quads * 4).to(torch.int16) - 128
        if self.silu_mul:
            q = _deinterleave(q)
        return q[: self.out_features, : self.in_features]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] these int8 values and scales stand for."""
        scales = _deinterleave(self.scales) if self.silu_mul else self.scales
        return self.int8_values().float() * scales[: self.out_features, None]


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """gemm.interleave_gate_up(t, 32) undone: gate rows, then up rows."""
    half = _VCOLS // 2
    return t.reshape(t.shape[0] // _VCOLS, 2, half, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def available() -> bool:
    """qgemm_vnni runs here: the kernels are loaded and were built with AVX-512 VNNI and BF16."""
    lib = kernel_loader.library()
    return lib is not None and bool(lib.lmserve_has_int8_bf16())


def silu_mul_packable(weight: torch.Tensor) -> bool:
    """A fused gate/up weight [2 * intermediate, in] pack_vnni can pack for silu_mul: intermediate a multiple
    of 16, so that every group holds 16 gate and 16 up columns."""
    return weight.shape[0] % _VCOLS == 0


def pack_vnni(weight: torch.Tensor, silu_mul: bool = False) -> VNNIWeight:
    """Quantize a float weight [out, in] per output channel (symmetric: scale = |row|max / 127, values
    rounded to nearest even and clamped to [-127, 127], as qgemm.quantize_weight) and pack it for
    qgemm_vnni; silu_mul (a fused gate/up weight, silu_mul_packable): so that qgemm_vnni applies
    SiLU-and-multiply as it writes."""
    if silu_mul and not silu_mul_packable(weight):
        raise ValueError(f"a gate/up weight of shape {tuple(weight.shape)} cannot be packed for silu_mul")
    w = weight.detach().float()
    out_features, in_features = w.shape
    scales = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-127, 127).to(torch.int16)
    if silu_mul:
        q, scales = interleave_gate_up(q, _VCOLS), interleave_gate_up(scales, _VCOLS)
    n_pad = -(-out_features // _VCOLS) * _VCOLS
    k_pad = -(-in_features // _QK) * _QK
    padded = torch.full((n_pad, k_pad), 128, dtype=torch.uint8)
    padded[:out_features, :in_features] = (q + 128).to(torch.uint8)
    data = padded.view(n_pad // _VCOLS, _VCOLS, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
    padded_scales = torch.zeros(n_pad, dtype=torch.float32)
    padded_scales[:out_features] = scales
    return VNNIWeight(data, padded_scales, out_features, in_features, silu_mul)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation quantization qgemm_vnni applies: bf16 [M, K] -> (int8 [M, Kp] with zero padding, float32
    scales [M, Kp / 32], int32 corrections -128 * sum(q) [M, Kp / 32]). For the tests; qgemm_vnni does it
    inside its own call."""
    x2 = x.contiguous()
    kernel_loader.check_tensors("quantize_rows", x2)
    rows, k = x2.shape
    k_pad = -(-k // _QK) * _QK
    xq = torch.empty(rows, k_pad, dtype=torch.int8)
    sx = torch.empty(rows, k_pad // _QK, dtype=torch.float32)
    cx = torch.empty(rows, k_pad // _QK, dtype=torch.int32)
    if rows:
        lib = kernel_loader.loaded_library()
        lib.quantize_rows_bf16(x2.data_ptr(), xq.data_ptr(), sx.data_ptr(), cx.data_ptr(), rows, k, torch.get_num_threads())
    return xq, sx, cx


def qgemm_vnni(
    x: torch.Tensor, weight: VNNIWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """x [..., in_features] bf16 @ weight.T (+ bias, bf16) -> [..., out_features] bf16, or (out_dtype float32)
    the float32 sums as they are; a weight packed for silu_mul gives silu(gate) * up, [..., out / 2] bf16."""
    def call(x_ptr: int, bias_ptr: int | None, y_ptr: int | None, y_f32_ptr: int | None, rows: int) -> int:
        return kernel_loader.loaded_library().qgemm_vnni(
            x_ptr, weight.data.data_ptr(), weight.scales.data_ptr(), bias_ptr, y_ptr, y_f32_ptr, rows,
            weight.out_features, weight.in_features, int(weight.silu_mul), torch.get_num_threads(),
        )  # fmt: skip

    return bf16_matmul("qgemm_vnni", x, weight, bias, out_dtype, call)
