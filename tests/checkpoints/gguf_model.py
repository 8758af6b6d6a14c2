"""A loaded model's own float weights as GGUF blocks (Q4_1 or Q8_0, by gguf-py's quantizer), for tests of the
GGUF weight path without a GGUF file."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from lmserve.engine.modeling import qgemm_gguf
from lmserve.engine.modeling.decoder import DecoderModel

QTYPES = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def _blocks_of(weight: torch.Tensor, kind: str) -> qgemm_gguf.GGUFWeight:
    """Blocks of `weight`, and `weight` overwritten with their dequantized values (the float reference)."""
    blocks = gguf.quants.quantize(weight.numpy(), QTYPES[kind])
    weight.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, QTYPES[kind])))
    return qgemm_gguf.GGUFWeight(torch.from_numpy(np.ascontiguousarray(blocks)), kind, *weight.shape)


@torch.inference_mode()
def gguf_blocks_of(
    model: DecoderModel, kind: str
) -> tuple[dict[str, qgemm_gguf.GGUFWeight], qgemm_gguf.GGUFWeight]:
    """Every decoder projection's blocks by Hugging Face name, and the LM head's (the embedding's where tied),
    as DecoderModel.use_gguf_weights takes them; the model's float weights now hold the blocks' values."""
    attn = model.layers[0].self_attn
    q_rows, kv_rows = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    inter = model.layers[0].mlp.intermediate_size
    weights: dict[str, qgemm_gguf.GGUFWeight] = {}
    for i, layer in enumerate(model.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.split([q_rows, kv_rows, kv_rows])
        gate, up = layer.mlp.gate_up_proj.weight.split([inter, inter])
        for name, part in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                           ("self_attn.o_proj", layer.self_attn.o_proj.weight), ("mlp.gate_proj", gate),
                           ("mlp.up_proj", up), ("mlp.down_proj", layer.mlp.down_proj.weight)):  # fmt: skip
            weights[f"model.layers.{i}.{name}.weight"] = _blocks_of(part, kind)
    head = _blocks_of(model.embed_tokens.weight if model.tie_word_embeddings else model.lm_head.weight, kind)
    return weights, head
