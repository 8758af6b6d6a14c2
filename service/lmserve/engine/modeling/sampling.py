"""Temperature sampling of float32 logits in C (sampling.c): one inverse-CDF draw per row."""

from __future__ import annotations

import torch

from lmserve.engine.modeling import kernel_loader


def sample_temperature_supported(logits: torch.Tensor) -> bool:
    """sample_temperature runs for these logits (float32 on CPU, kernels loaded)."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and kernel_loader.library() is not None


def sample_temperature(logits: torch.Tensor, temperatures: list[float], uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 logits [rows, vocab]: row r drawn from softmax(logits[r] / T_r) by
    inverting its CDF at uniforms[r] (in [0, 1)). A token without mass (a -inf logit, or one whose
    probability underflows float32) is never drawn; a row without finite positive mass gets its argmax.
    Returns int64 [rows]."""
    rows, vocab = logits.shape
    x = logits.contiguous()
    temps = torch.tensor(temperatures, dtype=torch.float32)
    u = uniforms.to(torch.float32).contiguous().view(rows)
    out = torch.empty(rows, dtype=torch.int64)
    if rows and kernel_loader.loaded_library().sample_temperature_f32(
        x.data_ptr(), temps.data_ptr(), u.data_ptr(), out.data_ptr(), rows, vocab, torch.get_num_threads()
    ):
        raise MemoryError("the sampling kernel could not allocate its scratch buffer")
    return out
