"""The shared tiny checkpoints are real, loadable, and not degenerate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmserve.checkpoints import generation_architecture, load_weights

PROMPTS = ["Hello, how are you?", "The capital of France is", "1 2 3 4", "def f(x):"]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_checkpoint_is_real_and_not_degenerate(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    assert generation_architecture(folder).path == "native"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    weights = load_weights(folder)
    assert all(t.dtype == torch.float32 for t in weights.values())
    if fixture == "tiny_qwen2_dir":
        biases = [t for name, t in weights.items() if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
        assert len(biases) == 9 and all(b.abs().min() > 0 for b in biases)
        assert "lm_head.weight" not in weights  # tied
    else:
        assert "lm_head.weight" in weights  # untied

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=2)
            top_prob = model(ids).logits[0, -1].softmax(-1).max().item()
        outputs.append(tuple(out[0, ids.shape[1] :].tolist()))
        assert len(set(outputs[-1])) > 1, f"greedy output of {prompt!r} repeats one token"
        assert top_prob > 0.01, "logits are near-uniform"  # uniform would be 1/49152
    assert len(set(outputs)) == len(PROMPTS), "greedy outputs should differ across prompts"
