"""`--quantization q4_1 | q8_0` at load: a model converted from a GGUF file gets that file's own blocks for
its projections (and its LM head where the file has them in Q4_1 or Q8_0), computed by qgemm_gguf.c."""

from __future__ import annotations

from pathlib import Path

import torch

from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.fingerprint import file_sha256
from lmserve.checkpoints.gguf_blocks import GGUF_QUANTIZATIONS, WeightBlocks, matches, read_gguf_linears
from lmserve.checkpoints.weights import read_marker
from lmserve.config import EngineConfig
from lmserve.engine.modeling import qgemm_gguf
from lmserve.engine.modeling.decoder import DecoderModel


def runtime_refusal(quantization: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why qgemm_gguf.c cannot run with these activations here (one line), or None."""
    flag = f"--quantization {quantization}"
    if device.type != "cpu":
        return f"{flag} runs on CPU only (its kernel is C), not on {device.type}"
    if dtype != torch.float32:
        return f"{flag} computes with float32 activations, not {str(dtype).removeprefix('torch.')}: add --dtype float32"
    if not qgemm_gguf.gguf_gemm_available():
        return f"{flag} needs the C kernels, which could not be built (a C compiler, --cache-dir)"
    return None


def source_gguf(model_path: Path, cache_dir: Path) -> Path:
    """The GGUF file a converted folder was made from (its cache marker says), checked to be the same content."""
    marker = read_marker(model_path) or {}
    origin = marker.get("origin")
    if marker.get("source") != "gguf" or not isinstance(origin, str):
        raise CheckpointError(f"{model_path} was not converted from a GGUF file: --quantization q4_1 | q8_0 needs one")
    path = Path(origin)
    if not path.is_file() or file_sha256(path, cache_dir) != marker.get("content_sha256"):
        raise CheckpointError(f"{path}, the GGUF file {model_path.name} was converted from, is gone or has changed")
    return path


def _torch_weight(blocks: WeightBlocks) -> qgemm_gguf.GGUFWeight:
    return qgemm_gguf.GGUFWeight(torch.from_numpy(blocks.blocks), blocks.kind, blocks.blocks.shape[0], blocks.in_features)


def use_gguf_blocks(model: DecoderModel, model_path: Path, config: EngineConfig) -> str:
    """Swap the float projections that `model` has just loaded from `model_path` for the source GGUF's blocks.
    Layer 0's q, k and v blocks are first checked to dequantize to exactly the loaded float weights, which
    holds the name mapping and the q/k row order to the converter's. Returns the runner's log text."""
    assert config.quantization in GGUF_QUANTIZATIONS
    embed = model.embed_tokens.weight
    refusal = runtime_refusal(config.quantization, embed.dtype, embed.device)
    if refusal is not None:
        raise RuntimeError(refusal)
    attn = model.layers[0].self_attn
    linears = read_gguf_linears(
        source_gguf(model_path, config.cache_dir), config.quantization, attn.num_heads, attn.num_kv_heads,
        model.tie_word_embeddings,
    )  # fmt: skip
    qkv = attn.qkv_proj.weight.detach().numpy()
    start = 0
    for p in "qkv":
        blocks = linears.weights[f"model.layers.0.self_attn.{p}_proj.weight"]
        rows = blocks.blocks.shape[0]
        if not matches(blocks, qkv[start : start + rows]):
            raise CheckpointError(f"{model_path}: the GGUF blocks of layer 0's {p}_proj do not match its converted weights")
        start += rows
    if linears.head is not None:
        float_head = model.embed_tokens.weight if model.tie_word_embeddings else model.lm_head.weight
        first = WeightBlocks(linears.head.blocks[:64], linears.head.kind, linears.head.in_features)
        if not matches(first, float_head[:64].detach().numpy()):
            raise CheckpointError(f"{model_path}: the GGUF blocks of the LM head do not match its converted weights")
    head = None if linears.head is None else _torch_weight(linears.head)
    return model.use_gguf_weights({name: _torch_weight(b) for name, b in linears.weights.items()}, head)
