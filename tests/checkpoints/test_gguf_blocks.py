"""`--quantization q4_1 | q8_0`: the bundled GGUF's blocks as gguf_blocks reads them (the same weights, rows
in the same order, as the converted float32 folder holds), and the start-up refusals (preflight), each one
line, before any weight is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from lmserve.checkpoints.bundled import require_bundled
from lmserve.checkpoints.gguf_blocks import gguf_file_of, quantization_refusal, read_gguf_linears, read_tensor_table
from lmserve.config import EngineConfig, ServeConfig
from lmserve.preflight import PreflightError, check_quantization

BUNDLED = "smollm2-135m-instruct"


def test_blocks_dequantize_to_the_converted_weights(smollm2_dir: Path) -> None:
    """q and k un-permuted as transformers does (whole rows of blocks), the others as stored; the tied head
    is token_embd's Q8_0 blocks."""
    linears = read_gguf_linears(require_bundled(BUNDLED), "q4_1", num_heads=9, num_kv_heads=3, tied=True)
    assert len(linears.weights) == 30 * 7
    assert {b.kind for b in linears.weights.values()} == {"q4_1"}
    assert linears.head is not None and linears.head.kind == "q8_0" and linears.head.blocks.shape == (49152, 612)
    (weights_file,) = smollm2_dir.glob("*.safetensors")
    with safe_open(str(weights_file), "pt") as f:
        for layer in (0, 29):
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
                name = f"model.layers.{layer}.{proj}.weight"
                blocks = linears.weights[name]
                assert (blocks.dequantize() == f.get_tensor(name).numpy()).all(), name
        embed = f.get_tensor("model.embed_tokens.weight").numpy()
    assert (linears.head.dequantize()[:1000] == embed[:1000]).all()


def test_tensor_table() -> None:
    """The header reader's table (tensor offsets are checked by the blocks' values above)."""
    table = read_tensor_table(require_bundled(BUNDLED))
    assert table.architecture == "llama" and len(table.tensors) == 30 * 9 + 2
    embed = table.tensors["token_embd.weight"]
    assert (embed.kind, embed.shape) == ("q8_0", (576, 49152))
    down = table.tensors["blk.29.ffn_down.weight"]
    assert (down.kind, down.shape) == ("q4_1", (1536, 576))
    assert table.tensors["output_norm.weight"].kind == "f32"


def test_without_the_unpermutation_q_would_not_match(smollm2_dir: Path) -> None:
    """The check above can fail: llama.cpp's stored row order is not the converted one."""
    raw = read_gguf_linears(require_bundled(BUNDLED), "q4_1", num_heads=1, num_kv_heads=1, tied=True)
    (weights_file,) = smollm2_dir.glob("*.safetensors")
    with safe_open(str(weights_file), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
    assert not (raw.weights["model.layers.0.self_attn.q_proj.weight"].dequantize() == q).all()


def test_a_q8_0_twin_from_the_requantize_tool_reads_back(tmp_path: Path, smollm2_dir: Path) -> None:
    """tools/requantize_gguf.py's Q8_0 copy of the bundled file (the one `--quantization q8_0` was measured on:
    docs/benchmarks/quantization.md): accepted for q8_0 and refused for q4_1, and its blocks within Q8_0's
    rounding of the source's weights: one scale d per 32 values (the block's |max| / 127, stored as fp16, whose
    rounding moves the largest value's step by up to 127 * 2**-11 d), so each value within 0.5 d + 0.062 d."""
    from gguf import GGMLQuantizationType

    from tools.requantize_gguf import requantize

    dest = tmp_path / "twin.q8_0.gguf"
    assert requantize(require_bundled(BUNDLED), dest, GGMLQuantizationType.Q8_0) == {"requantized": 210, "kept": 62}
    assert quantization_refusal(str(dest), "q8_0") is None
    assert "are q8_0, not all q4_1" in str(quantization_refusal(str(dest), "q4_1"))
    linears = read_gguf_linears(dest, "q8_0", num_heads=9, num_kv_heads=3, tied=True)
    assert {b.kind for b in linears.weights.values()} == {"q8_0"} and len(linears.weights) == 30 * 7
    (weights_file,) = smollm2_dir.glob("*.safetensors")
    with safe_open(str(weights_file), "pt") as f:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            source = f.get_tensor(name).numpy().reshape(-1, 32)
            error = np.abs(linears.weights[name].dequantize().reshape(-1, 32) - source)
            d = np.abs(source).max(axis=1, keepdims=True) / 127
            assert (error <= 0.563 * d + 1e-7).all() and error.max() > 0, name


def _config(tmp_path: Path, model: str = BUNDLED, **engine: object) -> ServeConfig:
    settings = {"dtype": "float32", "device": "cpu", "quantization": "q4_1", **engine}
    return ServeConfig(model=model, embedding_model=None, engine=EngineConfig(**settings))  # type: ignore[arg-type]


def test_the_bundled_q4_1_model_passes(tmp_path: Path) -> None:
    assert gguf_file_of(BUNDLED) == require_bundled(BUNDLED)
    assert quantization_refusal(BUNDLED, "q4_1") is None
    check_quantization(_config(tmp_path).engine, BUNDLED)


def test_refusals_are_one_line_each(tmp_path: Path, tiny_llama_dir: Path) -> None:
    def refusal(config: ServeConfig) -> str:
        with pytest.raises(PreflightError) as info:
            check_quantization(config.engine, config.model)
        line = str(info.value)
        assert "\n" not in line
        return line

    assert refusal(_config(tmp_path, model=str(tiny_llama_dir))) == (
        f"--quantization q4_1 serves a GGUF file's own blocks, and the model {str(tiny_llama_dir)!r} is not a GGUF "
        "file (use --quantization none)"
    )
    assert refusal(_config(tmp_path, quantization="q8_0")) == (
        "--quantization q8_0: the linear layers of SmolLM2-135M-Instruct.Q4_1.gguf are q4_1, not all q8_0 "
        "(use --quantization none)"
    )
    assert refusal(_config(tmp_path, dtype="bfloat16")) == (
        "--quantization q4_1 computes with float32 activations, not bfloat16: add --dtype float32"
    )
    no_compiler = _config(tmp_path, c_compiler="no-such-cc", cache_dir=tmp_path / "empty-cache")
    assert refusal(no_compiler) == "--quantization q4_1 needs the C kernels, and there is no C compiler (no-such-cc) to build them"
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\0" * 12)
    assert "is not a valid GGUF file" in refusal(_config(tmp_path, model=str(not_gguf)))
    with pytest.raises(ValueError, match="--quantization is not used with --engine vllm"):
        ServeConfig(model=BUNDLED, engine_kind="vllm", engine=EngineConfig(quantization="q4_1"))


def test_none_is_never_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    check_quantization(EngineConfig(quantization="none", dtype="bfloat16"), str(tiny_llama_dir))


def test_biases_are_not_linears() -> None:
    """Qwen2's q/k/v biases (f32) sit beside Q4_1 weights: only the weights decide the type."""
    from lmserve.checkpoints.gguf_blocks import TensorInfo, TensorTable, _linear_types

    tensors = {
        "blk.0.attn_q.weight": TensorInfo("blk.0.attn_q.weight", "q4_1", (64, 64), 0),
        "blk.0.attn_q.bias": TensorInfo("blk.0.attn_q.bias", "f32", (64,), 0),
        "blk.0.attn_norm.weight": TensorInfo("blk.0.attn_norm.weight", "f32", (64,), 0),
    }
    assert _linear_types(TensorTable("qwen2", tensors)) == {"blk.0.attn_q.weight": "q4_1"}
