"""Whether a checkpoint's vectors may be cut short (a request's `dimensions`), read from its config.json as
vLLM reads it: `matryoshka_dimensions` (the sizes it was trained at, the only ones accepted) or
`is_matryoshka: true` (any size from 1 to the full one). A vector cut from a model trained without
Matryoshka loss is a poor vector, so `dimensions` is refused for one that declares neither."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmserve.embeddings import EmbeddingInputError


@dataclass(frozen=True)
class Matryoshka:
    is_declared: bool = False
    dimensions: tuple[int, ...] | None = None  # the only sizes accepted; None: any of 1..the full size

    @classmethod
    def from_folder(cls, path: str | Path) -> Matryoshka:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            return cls()
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        sizes = config.get("matryoshka_dimensions")
        if sizes:
            if not isinstance(sizes, list) or not all(type(d) is int and d > 0 for d in sizes):
                raise ValueError(f"{config_file}: matryoshka_dimensions must be a list of positive integers")
            return cls(True, tuple(sorted(set(sizes))))
        return cls(config.get("is_matryoshka") is True)

    def check(self, dimensions: int, model_name: str) -> None:
        """EmbeddingInputError (param "dimensions") unless the model's vectors may be cut to `dimensions` (which
        the caller has checked is a size from 1 to the full one)."""
        if not self.is_declared:
            raise EmbeddingInputError(
                f"model {model_name!r} is not a Matryoshka embedding model (its config.json declares neither "
                "matryoshka_dimensions nor is_matryoshka), so its vectors cannot be shortened; leave dimensions unset",
                param="dimensions",
            )
        if self.dimensions is not None and dimensions not in self.dimensions:
            raise EmbeddingInputError(
                f"model {model_name!r} supports dimensions {', '.join(map(str, self.dimensions))} only, "
                f"got {dimensions}",
                param="dimensions",
            )
