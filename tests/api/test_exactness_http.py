"""Greedy text over HTTP equals Hugging Face transformers' greedy `generate` in float32.

One prompt, to prove the API path (tokenize -> engine -> detokenize -> JSON) adds or loses nothing;
tests/engine/test_exactness.py holds the full exactness suite.
"""

from __future__ import annotations

from pathlib import Path

import httpx

PROMPT = "The three primary colors are"
MAX_TOKENS = 12


def test_greedy_completion_matches_transformers(smollm2_dir: Path, http: httpx.Client) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    model.eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    expected_ids = [t for t in out[0, input_ids.shape[1] :].tolist() if t != tokenizer.eos_token_id]
    expected_text = tokenizer.decode(expected_ids, skip_special_tokens=True)

    resp = http.post(
        "/v1/completions",
        json={
            "model": "smollm2-135m-instruct",
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "logprobs": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"] == expected_text
    assert resp.json()["usage"]["prompt_tokens"] == input_ids.shape[1]
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in expected_ids]
