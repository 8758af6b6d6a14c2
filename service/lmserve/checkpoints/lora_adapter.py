"""A PEFT LoRA adapter read for serving beside its base (--lora-modules, /v1/load_lora_adapter): its config
checked and its low-rank factors read, by the Hugging Face module names they apply to. Nothing is merged:
the engine applies each request's adapter inside the batched forward (engine/modeling/lora.py).

    adapter = read_lora_adapter(Path("/adapters/sql"), max_rank=64)
    adapter.factors["model.layers.0.self_attn.q_proj"]   # LoraFactors(a [r, in], b [out, r])

What is refused, each with a one-line CheckpointError: a pickle checkpoint (adapter_model.bin), another
PEFT type, DoRA, LoRA biases, per-module rank or alpha patterns, `modules_to_save` (whole trained copies of
modules, not low-rank updates), embedding targets, a rank above the cap, factors whose shapes disagree with
the rank, and weights that are not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmserve.checkpoints.errors import CheckpointError, one_line
from lmserve.checkpoints.lora import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS
from lmserve.checkpoints.weights import check_safetensors_header, read_json_object

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]


@dataclass(frozen=True)
class LoraAdapterWeights:
    path: Path
    rank: int
    scaling: float  # lora_alpha / rank (rsLoRA: lora_alpha / sqrt(rank))
    factors: dict[str, LoraFactors]  # by the base's module name, "model.layers.0.self_attn.q_proj"

    @property
    def num_bytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for f in self.factors.values())


def read_lora_config(adapter_dir: Path, max_rank: int) -> dict[str, Any]:
    """The adapter's config, checked for what lmserve applies per request."""
    path = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir} is not a folder: a LoRA adapter is a PEFT folder ({ADAPTER_CONFIG} + {ADAPTER_SAFETENSORS})")
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    config = read_json_object(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: adapter type {config.get('peft_type')!r} is not supported, only LORA")
    refusals = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (trained copies of whole modules) is not supported; only low-rank updates are",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "layers_to_transform": "layers_to_transform is not supported",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {why}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise CheckpointError(f"{path}: LoRA biases are not supported (bias must be 'none')")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{path}: r must be a positive integer, not {rank!r}")
    if rank > max_rank:
        raise CheckpointError(f"{path}: rank {rank} is above --max-lora-rank {max_rank}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: lora_alpha must be a number, not {alpha!r}")
    return config


def check_lora_folder(adapter_dir: Path, max_rank: int) -> tuple[dict[str, Any], Path]:
    """The adapter's checked config and its safetensors file, without reading the weights (preflight
    stops here; read_lora_adapter goes on)."""
    config = read_lora_config(adapter_dir, max_rank)
    weights_path = adapter_dir / ADAPTER_SAFETENSORS
    if not weights_path.is_file():
        if (adapter_dir / ADAPTER_PICKLE).is_file():
            raise CheckpointError(
                f"{adapter_dir / ADAPTER_PICKLE} is a pickle checkpoint (it can run code); save the adapter as "
                f"{ADAPTER_SAFETENSORS} (save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"{adapter_dir} has no adapter weights: expected {ADAPTER_SAFETENSORS}")
    return config, weights_path


def read_lora_adapter(adapter_dir: Path, max_rank: int) -> LoraAdapterWeights:
    """Read and check a PEFT LoRA folder (float32 factors; the engine casts them to the model's dtype)."""
    adapter_dir = Path(adapter_dir)
    config, weights_path = check_lora_folder(adapter_dir, max_rank)
    check_safetensors_header(weights_path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # a corrupt file: safetensors' own message, in one line
        raise CheckpointError(f"{weights_path} cannot be read: {one_line(exc)}") from None
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        for half in ("lora_A", "lora_B"):
            suffix = f".{half}.weight"
            if name.endswith(suffix):
                halves.setdefault(name.removesuffix(suffix), {})[half] = tensor
                break
        else:
            if "lora_embedding" in name:
                raise CheckpointError(f"{weights_path}: embedding targets ({key}) are not supported")
            raise CheckpointError(f"{weights_path}: tensor {key} is not a LoRA factor (lora_A / lora_B)")
    if not halves:
        raise CheckpointError(f"{weights_path} holds no LoRA factors")
    factors: dict[str, LoraFactors] = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights_path}: {module} has {', '.join(pair)} only; LoRA needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(
                f"{weights_path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not of rank {rank}"
            )
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CheckpointError(f"{weights_path}: {module} holds NaN or infinite values")
        factors[module] = LoraFactors(a, b)
    return LoraAdapterWeights(adapter_dir, rank, scaling, factors)
