"""Random prompts of a set length, measured in the served model's tokens.

With a tokenizer (a Hugging Face folder holding tokenizer.json) a prompt is random non-special token
ids, decoded, re-encoded and cut until it encodes to exactly the asked length (as `vllm bench serve`'s
random dataset does), so two servers given the same seed receive the same prompts. Without one, a
prompt is that many random common English words: roughly one token each for most BPE vocabularies.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = (
    "the of and to in is was for on that with as by it at from his an were are which this be or has had "
    "not first one their its new after but who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made"
).split()
_MAX_FIX_ROUNDS = 10


@dataclass(frozen=True)
class Prompt:
    text: str
    num_tokens: int | None  # None: counted in words (no tokenizer given)


class PromptMaker:
    """Makes prompts from its own seeded generator (shared by the users of one process)."""

    def __init__(self, tokenizer_dir: Path | None, seed: int | None = 0) -> None:
        """seed None: a fresh random sequence (so separate processes do not send the same prompts)."""
        self.rng = random.Random(seed)
        self.tokenizer = None
        self.allowed_ids: list[int] = []
        if tokenizer_dir is not None:
            from tokenizers import Tokenizer

            path = Path(tokenizer_dir) / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: --tokenizer needs a folder with tokenizer.json")
            self.tokenizer = Tokenizer.from_file(str(path))
            special = {i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special}
            self.allowed_ids = [i for i in range(self.tokenizer.get_vocab_size()) if i not in special]

    def make(self, num_tokens: int) -> Prompt:
        if num_tokens < 1:
            raise ValueError("a prompt needs at least one token")
        if self.tokenizer is None:
            return Prompt(" ".join(self.rng.choices(_WORDS, k=num_tokens)), None)
        ids = self.rng.choices(self.allowed_ids, k=num_tokens)
        # Decoding then encoding may merge or split tokens; fix the length a few rounds, as vLLM does.
        for _ in range(_MAX_FIX_ROUNDS):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == num_tokens:
                return Prompt(text, num_tokens)
            if len(ids) > num_tokens:
                ids = ids[:num_tokens]
            else:
                ids += self.rng.choices(self.allowed_ids, k=num_tokens - len(ids))
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return Prompt(text, len(self.tokenizer.encode(text, add_special_tokens=False).ids))
