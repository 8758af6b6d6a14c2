"""Random prompts encode to exactly the asked number of tokens of the bundled model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lmload.prompts import PromptMaker


def test_prompts_encode_to_the_asked_length(smollm2_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    maker = PromptMaker(smollm2_dir, seed=0)
    for num_tokens in (1, 2, 16, 128, 1000):
        for _ in range(5):
            prompt = maker.make(num_tokens)
            assert prompt.num_tokens == num_tokens
            assert len(tokenizer.encode(prompt.text, add_special_tokens=False).ids) == num_tokens


def test_same_seed_same_prompts_and_different_prompts_in_turn(smollm2_dir: Path) -> None:
    a, b = PromptMaker(smollm2_dir, seed=3), PromptMaker(smollm2_dir, seed=3)
    texts = [a.make(32).text for _ in range(3)]
    assert texts == [b.make(32).text for _ in range(3)]
    assert len(set(texts)) == 3


def test_without_a_tokenizer_the_length_is_in_words() -> None:
    prompt = PromptMaker(None, seed=1).make(20)
    assert prompt.num_tokens is None and len(prompt.text.split()) == 20


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        PromptMaker(None).make(0)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        PromptMaker(Path("/nonexistent"))
