"""Run a model's forward for one ForwardPath over a list of batched steps, from an empty KV cache: the
decoder-stack tests compare paths with it."""

from __future__ import annotations

import torch

from lmserve.engine.modeling.attention import SeqLayout, build_metadata
from lmserve.engine.modeling.forward_path import ForwardPath
from lmserve.engine.runner import ModelRunner

Step = list[tuple[int, int, int, list[int]]]  # per sequence: (start_row, new tokens, cached tokens, blocks)

# The decoder-stack tests' schedule over three sequences (fed ids[:60]): prefills, then a prompt's later chunk
# beside two decodes, then decodes.
MIXED_STEPS: list[Step] = [
    [(0, 18, 0, [2, 3]), (18, 30, 0, [4, 5]), (48, 5, 0, [6])],  # prefills
    [(0, 7, 18, [2, 3]), (7, 1, 30, [4, 5]), (8, 1, 5, [6])],  # a chunk, two decodes
    [(0, 1, 25, [2, 3]), (1, 1, 31, [4, 5]), (2, 1, 6, [6])],  # decodes
]


def forward_steps(
    runner: ModelRunner, path: ForwardPath, steps: list[Step], ids: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each step's hidden states (rows fed ids[:rows]) and the KV cache after the last, through `path`'s
    forward, with the runner's block size and dtype and the C attention kernel's plan."""
    forward = runner.model.forward_for(path)
    runner.kv_caches.zero_()
    outputs = []
    for step in steps:
        layouts = [SeqLayout(*s) for s in step]
        rows = sum(s.num_new_tokens for s in layouts)
        positions = torch.cat([torch.arange(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens) for s in layouts])
        meta = build_metadata(layouts, runner.kv_spec.block_size, runner.device, runner.dtype, use_kernel=True)
        with torch.inference_mode():
            outputs.append(forward(ids[:rows], positions, runner.kv_caches, meta).clone())
    return outputs, runner.kv_caches.clone()
