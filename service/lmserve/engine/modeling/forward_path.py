"""Which forward the runner runs: chosen once, when the runner is built, from the config and the machine.

    path = choose_forward_path(config.attention, model, dtype, device)   # one named strategy
    forward = model.forward_for(path)                                     # the callable the runner steps
    hidden = forward(input_ids, positions, kv_caches, meta)

Each path is a superset of the one before it, and each one's arithmetic is tested against the one before
(tests/engine/test_fused_ops.py): a broken kernel shows up as a difference, not as a silent fallback.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

import torch

from lmserve.engine.modeling import attention_kernel, fused_ops

ATTENTION_CHOICES = ("auto", "kernel", "torch")


class ForwardPath(str, Enum):
    TORCH = "torch ops"  # torch ops throughout, attention included (no C compiler, a GPU, attention=torch)
    ATTENTION_KERNEL = "C paged attention"  # torch ops, attention by the C kernel (float32 on CPU)
    # bf16 on CPU (int8 weights or not), or float32 with quantized weights (--quantization), one layer at a time
    FUSED_OPS = "C paged attention + fused C elementwise ops"
    DECODER_STACK = "one C call for the decoder stack"  # the fused ops, every layer in one call (decoder.c)

    @property
    def uses_attention_kernel(self) -> bool:
        return self is not ForwardPath.TORCH


class PathModel(Protocol):
    """What choosing a path asks of a model (decoder.DecoderModel, generic.TransformersCausalLM); a protocol,
    since both models import ForwardPath from here."""

    def has_window_or_softcap(self) -> bool: ...

    def quantized(self) -> bool: ...

    def supports_fused_ops(self) -> bool: ...

    def can_run_decoder_stack(self) -> bool: ...


def choose_forward_path(attention: str, model: PathModel, dtype: torch.dtype, device: torch.device) -> ForwardPath:
    """The fastest path this machine and model allow under `attention` (auto | kernel | torch).

    Call after the weights are packed or quantized: the decoder stack needs every projection packed for gemm.c,
    or every one quantized alike. Unquantized float32 stays on torch's elementwise ops (ATTENTION_KERNEL): that
    is the path held token-exact to transformers.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be auto, kernel or torch, not {attention!r}")
    has_kernel = attention != "torch" and attention_kernel.paged_attention_supported(dtype, device)
    if attention == "kernel" and not has_kernel:
        raise RuntimeError("attention=kernel, but the C paged-attention kernel is unavailable here")
    if model.has_window_or_softcap() and model.quantized() and dtype == torch.float32:
        # A window or soft-cap over the quantized path's bf16 cache under float32 queries: no C kernel has both.
        if attention == "kernel":
            raise RuntimeError("attention=kernel, but no C kernel has a window or soft-cap over a quantized model's cache")
        return ForwardPath.TORCH
    if not has_kernel:
        return ForwardPath.TORCH
    if (
        not model.supports_fused_ops()
        or not fused_ops.fused_ops_supported(dtype, device)
        or (dtype == torch.float32 and not model.quantized())
    ):
        return ForwardPath.ATTENTION_KERNEL
    if model.can_run_decoder_stack():
        return ForwardPath.DECODER_STACK
    return ForwardPath.FUSED_OPS
