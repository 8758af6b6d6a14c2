"""The instruction prompts a sentence-transformers checkpoint declares, and which one a text gets.

config_sentence_transformers.json may hold `prompts` (name -> text put before the input, e.g. Qwen3-Embedding's
query instruction) and `default_prompt_name`. As in sentence-transformers' `encode`, a text gets the default
prompt when the folder names one, else none; a request names another with `prompt_name`. "query" and
"document" always exist (the empty prompt unless the folder declares them), as sentence-transformers has them,
so a client may name them for any model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from lmserve.embeddings import EmbeddingInputError

_CONFIG_FILE = "config_sentence_transformers.json"
_ALWAYS = ("query", "document")


@dataclass(frozen=True)
class Prompts:
    texts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(dict.fromkeys(_ALWAYS, "")))
    default_name: str | None = None

    @classmethod
    def from_folder(cls, path: str | Path) -> Prompts:
        """Read config_sentence_transformers.json (a folder without it has only the empty prompts)."""
        config_file = Path(path) / _CONFIG_FILE
        texts = dict.fromkeys(_ALWAYS, "")
        if not config_file.is_file():
            return cls(MappingProxyType(texts))
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        declared = config.get("prompts") or {}
        if not isinstance(declared, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in declared.items()
        ):
            raise ValueError(f"{config_file}: prompts must map names to texts")
        texts.update({name: text or "" for name, text in declared.items()})
        default_name = config.get("default_prompt_name")
        if default_name is not None and default_name not in texts:
            raise ValueError(f"{config_file}: default_prompt_name {default_name!r} is not one of {sorted(texts)}")
        return cls(MappingProxyType(texts), default_name)

    def text(self, name: str | None) -> str:
        """The text put before each input: the prompt `name`, or the default one (if any) when None."""
        if name is None:
            return self.texts[self.default_name] if self.default_name is not None else ""
        if name not in self.texts:
            raise EmbeddingInputError(
                f"prompt_name {name!r} is not one of this model's prompts: {', '.join(sorted(self.texts))}",
                param="prompt_name",
            )
        return self.texts[name]
