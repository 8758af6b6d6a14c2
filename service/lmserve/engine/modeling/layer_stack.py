"""A whole step's decoder layers in one C call (decoder.c): bf16 with gemm.c's or qgemm_vnni.c's weights,
or float32 with int8 / GGUF ones. The layers' tensors go in as one table of addresses (layer_table)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.engine.modeling import kernel_abi, kernel_loader
from lmserve.engine.modeling.gemm import PackedWeight
from lmserve.engine.modeling.qgemm import QuantizedWeight
from lmserve.engine.modeling.qgemm_gguf import GGUF_TYPES, GGUFWeight
from lmserve.engine.modeling.qgemm_vnni import VNNIWeight


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors for decoder_stack, named as abi.h's layer slots (lmserve_layer_slot,
    which also fixes their order in the table); None: no such tensor (a projection without a bias). The
    projections are all PackedWeight (bf16, gemm.c), all VNNIWeight (int8 under bf16, qgemm_vnni.c), all
    QuantizedWeight (int8 under float32, qgemm.c) or all GGUFWeight of one kind; int8 weights' per-channel
    scales fill the _s slots."""

    qkv_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    qkv_b: torch.Tensor | None
    o_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    o_b: torch.Tensor | None
    gate_up_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    gate_up_b: torch.Tensor | None
    down_w: PackedWeight | QuantizedWeight | VNNIWeight | GGUFWeight
    down_b: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_s: torch.Tensor | None = None
    o_s: torch.Tensor | None = None
    gate_up_s: torch.Tensor | None = None
    down_s: torch.Tensor | None = None

    @classmethod
    def of(cls, qkv, o, gate_up, down, input_norm: torch.Tensor, post_norm: torch.Tensor) -> LayerWeights:
        """From the layer's four projections, each (weight, bias), and its two norms' weights."""
        scales = {
            f"{name}_s": w.scales if isinstance(w, (QuantizedWeight, VNNIWeight)) else None
            for name, (w, _) in zip(("qkv", "o", "gate_up", "down"), (qkv, o, gate_up, down), strict=True)
        }
        return cls(
            qkv_w=qkv[0], qkv_b=qkv[1], o_w=o[0], o_b=o[1], gate_up_w=gate_up[0], gate_up_b=gate_up[1],
            down_w=down[0], down_b=down[1], input_norm=input_norm, post_norm=post_norm, **scales,
        )  # fmt: skip


WEIGHT_BF16 = kernel_abi.read().constants["WEIGHT_BF16"]
LORA_PROJECTIONS = kernel_abi.read().constants["LORA_PROJECTIONS"]
WEIGHT_INT8 = kernel_abi.read().constants["WEIGHT_INT8"]


def stack_weight_kind(layers: list[LayerWeights]) -> int:
    """decoder_stack's weight_kind for these layers (abi.h): WEIGHT_BF16 for gemm.c's, WEIGHT_INT8 for int8 ones
    (VNNIWeight under bf16, QuantizedWeight under float32), GGUF_Q4_1 or GGUF_Q8_0; raises ValueError where the
    projections are not all of one kind, or of a kind no stack takes (plain or oneDNN-packed tensors)."""
    projections = [w for layer in layers for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w)]
    kinds = {w.kind if isinstance(w, GGUFWeight) else type(w).__name__ for w in projections}
    if len(kinds) != 1:
        raise ValueError(f"decoder_stack: the projections must be of one kind, not {sorted(kinds)}")
    weight = projections[0]
    if isinstance(weight, PackedWeight):
        return WEIGHT_BF16
    if isinstance(weight, (QuantizedWeight, VNNIWeight)):
        return WEIGHT_INT8
    if isinstance(weight, GGUFWeight):
        return GGUF_TYPES[weight.kind][0]
    raise ValueError(f"decoder_stack takes packed or quantized projections, not {type(weight).__name__}")


def _stack_dtype(layers: list[LayerWeights]) -> torch.dtype:
    """The activations' dtype of a stack of these layers: bf16 for gemm.c's and qgemm_vnni.c's weights."""
    return torch.bfloat16 if isinstance(layers[0].qkv_w, (PackedWeight, VNNIWeight)) else torch.float32


def layer_table(layers: list[LayerWeights]) -> torch.Tensor:
    """[num_layers, LAYER_SLOTS] int64 addresses for decoder_stack, in abi.h's slot order; None -> 0. The
    tensors must outlive the table (they are the model's own)."""
    slots = kernel_abi.read().layer_slots
    stack_weight_kind(layers)  # one kind throughout
    dtype = _stack_dtype(layers)
    rows = []
    for layer in layers:
        row = []
        for slot in slots:
            t = getattr(layer, slot)
            if isinstance(t, (PackedWeight, QuantizedWeight, VNNIWeight, GGUFWeight)):
                t = t.data
            elif t is not None and not slot.endswith("_s"):
                kernel_loader.check_tensors("decoder_stack", t, dtype=dtype)
            if t is not None and not t.is_contiguous():
                raise ValueError(f"decoder_stack: the {slot} tensor is not contiguous")
            row.append(0 if t is None else t.data_ptr())
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64).view(len(layers), len(slots))


def decoder_stack(
    residual: torch.Tensor,  # [rows, hidden] bf16 or float32, updated in place
    table: torch.Tensor,  # layer_table(...)
    weight_kind: int,  # stack_weight_kind(...) of the same layers
    cos: torch.Tensor,  # [rows, 1, head_dim]
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # [rows] int64
    kv_caches: torch.Tensor,  # [num_layers, 2, kv_heads, num_blocks, block_size, head_dim]
    plan,  # attention.KernelPlan covering every row
    num_heads: int,
    intermediate_size: int,
    silu_gate_up: bool,  # the table's gate/up weights are packed for silu_mul (bf16 only)
    eps: float,
    scale: float,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # bf16: (table, runs, scales), lora.py's
) -> None:
    """Every decoder layer of a step in one C call (see decoder.c): the same arithmetic as running add_rms_norm,
    the projections, rope_and_cache, paged_attention_kernel and silu_mul layer by layer. bf16 (residual's
    dtype) with gemm.c's packed weights or qgemm_vnni.c's int8 ones, or float32 with quantized ones."""
    num_layers, _, num_kv_heads, num_blocks, block_size, head_dim = kv_caches.shape
    rows, hidden = residual.shape
    dtype = residual.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"decoder_stack runs bf16 or float32 activations, not {dtype}")
    kernel_loader.check_tensors("decoder_stack", residual, cos, sin, dtype=dtype)
    kernel_loader.check_tensors("decoder_stack", kv_caches)  # bf16 either way (kv_cache_dtype)
    for t in (slot_mapping, plan.block_table, plan.seq_of_query, plan.ctx_lens, plan.q_rows):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("decoder_stack: slot mapping and attention plan must be contiguous int64 tensors")
    if table.shape != (num_layers, kernel_abi.read().constants["LAYER_SLOTS"]) or slot_mapping.shape != (rows,):
        raise ValueError("decoder_stack: the layer table or slot mapping does not fit the cache and rows")
    lib = kernel_loader.loaded_library()
    common = (
        residual.data_ptr(), table.data_ptr(), num_layers, cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
        kv_caches.data_ptr(), num_blocks, block_size, plan.block_table.data_ptr(), plan.seq_of_query.data_ptr(),
        plan.ctx_lens.data_ptr(), plan.q_rows.data_ptr(), plan.q_rows.shape[0], plan.block_table.shape[1],
        plan.max_ctx, rows, hidden, num_heads, num_kv_heads, head_dim, intermediate_size,
    )  # fmt: skip
    if dtype == torch.bfloat16:
        lora_args: tuple = (None, None, None, 0)
        if lora is not None:
            lora_table, runs, scales = lora
            if silu_gate_up or lora_table.shape != (num_layers, LORA_PROJECTIONS, 3):
                raise ValueError("decoder_stack: a LoRA table needs one row per layer and gate/up without silu_mul")
            lora_args = (lora_table.data_ptr(), runs.data_ptr(), scales.data_ptr(), runs.shape[0])
        failed = lib.decoder_stack_bf16(
            *common, weight_kind, int(silu_gate_up), eps, scale, *lora_args, torch.get_num_threads()
        )
    else:
        failed = lib.decoder_stack_f32q(*common, weight_kind, eps, scale, torch.get_num_threads())
    if failed == 2:
        raise ValueError(f"decoder_stack: weight kind {weight_kind} or these sizes are not the {dtype} stack's")
    if failed:
        raise MemoryError("decoder_stack could not allocate its scratch buffers")
