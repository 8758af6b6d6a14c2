"""DecoderModel.use_gguf_weights, Q4_1 and Q8_0: a tiny random model (untied head, GQA) whose float
weights are replaced by GGUF blocks of themselves gives the logits of the same model with those blocks'
dequantized values as float weights, within what the activations' 8-bit rounding allows (measured below); q/k/v and gate/up
are fused, and the head taken, as the float weights are (a wrong order would be far off)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.modeling import qgemm_gguf
from lmserve.engine.modeling.attention import SeqLayout
from lmserve.engine.runner import ModelRunner
from tests.checkpoints.gguf_model import gguf_blocks_of


def _logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    meta = runner.attention_metadata([SeqLayout(0, len(ids), 0, [0, 1])])
    hidden = runner.forward(torch.tensor(ids), torch.arange(len(ids)), meta)
    return runner.model.compute_logits(hidden).double()


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@torch.inference_mode()
def test_gguf_weights_give_the_dequantized_models_logits(kind: str, tiny_llama_dir: Path, cache_dir: Path) -> None:
    runner = ModelRunner(tiny_llama_dir, EngineConfig(dtype="float32", device="cpu", num_kv_blocks=4, cache_dir=cache_dir))
    assert qgemm_gguf.gguf_gemm_available()
    model = runner.model
    weights, head = gguf_blocks_of(model, kind)

    ids = [1, 17, 300, 4000, 12, 99, 5, 42, 7]
    reference = _logits(runner, ids)  # float weights holding the blocks' values
    described = model.use_gguf_weights(weights, head)
    assert described.startswith(f"GGUF {kind} blocks (head {kind}), qgemm_gguf.c")
    assert isinstance(model.layers[1].self_attn.qkv_proj.packed, qgemm_gguf.GGUFWeight)
    got = _logits(runner, ids)
    relative = ((got - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
    # 8-bit activations: about 0.5% per matmul, compounded over this random model's 9 (3.4% for Q8_0, 4.1% for
    # Q4_1 here); k and v of layer 0 swapped would be 150%
    assert 0 < relative < 0.1, relative
    assert torch.equal(got.argmax(dim=1), reference.argmax(dim=1))
