"""Constrained decoding's token masks applied to the logits in C (token_mask.c)."""

from __future__ import annotations

import torch

from lmserve.engine.modeling import kernel_loader


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """logits[rows[j], t] = -inf where bit t of bitmask row j is 0 (float32 CPU logits [n, vocab], in place;
    rows int64, bitmask int32 [len(rows), words]). False (nothing done) where the library is unavailable."""
    lib = kernel_loader.library() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is None or logits.stride(1) != 1 or not bitmask.is_contiguous() or not rows.is_contiguous():
        return False
    lib.apply_token_bitmask_f32(
        logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1], rows.data_ptr(), rows.numel(), logits.shape[1]
    )
    return True
