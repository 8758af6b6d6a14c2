"""benchmarks/perplexity.py measures what transformers measures: on a tiny random checkpoint in float32, its
perplexity through the engine's forward (quantization none) equals the one from transformers' own model
over the same windows, and the int8 figure is printed beside it with its ratio."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import perplexity  # noqa: E402

TEXT = ROOT / "tests" / "data" / "perplexity" / "kjv_ruth_jonah.txt"


def test_perplexity_matches_transformers_and_prints_the_int8_ratio(
    tiny_llama_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from lmserve.tokenizer import Tokenizer

    args = ["--model", str(tiny_llama_dir), "--text", str(TEXT), "--window", "48", "--max-tokens", "150",
            "--cache-dir", str(cache_dir)]  # fmt: skip
    assert perplexity.main(args) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("quantization")}
    ours = float(lines["none:float32"].split("perplexity ")[1].split()[0])
    assert "ratio to none:float32: 1.0000; greedy agreement 100.00%" in lines["none:float32"]
    assert "int8:float32" in lines and "greedy agreement" in lines["int8:float32"]

    ids = Tokenizer.from_folder(tiny_llama_dir).encode(TEXT.read_text(encoding="utf-8"))[:150]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in perplexity.windows(ids, 48):
            logits = model(torch.tensor([window])).logits[0, :-1]
            total -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None]).sum())
            count += len(window) - 1
    assert ours == pytest.approx(math.exp(total / count), rel=1e-4)
