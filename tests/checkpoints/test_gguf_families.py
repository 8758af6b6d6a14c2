"""GGUF files of the Llama, Qwen2, Gemma 2 and Phi-3 families, laid out as llama.cpp's convert_hf_to_gguf.py
writes them (gguf_writer.py), are served exactly: lmserve's conversion (transformers' GGUF loading, plus the
metadata it drops: gguf.dropped_config) gives back the original weights and config, and NativeEngine on the
converted folder produces, token for token, what transformers' `generate` produces on the ORIGINAL folder.

Each family is a tiny random-weight model with the SmolLM2 tokenizer and odd shapes: grouped KV heads
everywhere (4 query heads, 2 KV heads), Qwen2's q/k/v biases, Llama's untied head, Gemma 2 with a head_dim
(256) apart from hidden/heads (16), Phi-3 with its fused qkv and gate_up projections and a partial rotary.
Each states what transformers' GGUF loading alone loses: Llama 3.1's rope scaling (a rope_freqs tensor in the
file), Qwen2.5's yarn (rope.scaling.* keys), Gemma 2's soft-caps (not its defaults) and a window (8) shorter
than most prompts, Phi-3's window (32) and LongRoPE (rope_factors tensors; some prompts start past its original
context, some stay below it). More such files are checked for their config alone (RESTORED), and what no file can
say is pinned by the strict xfail at the end.

The converted folders go to the test cache (conftest.cache_dir), as the bundled model's do: the files are
deterministic, so a later run converts nothing (the key changes with CONVERTER_VERSION and the transformers
version), and `lmserve cache prune` removes them as unused.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict, read_gguf_metadata

from lmserve.checkpoints import CheckpointError, bundled_location, load_weights, resolve_model
from lmserve.checkpoints.gguf import dropped_config
from lmserve.config import EngineConfig
from lmserve.engine.engine import NativeEngine
from tests.checkpoints.gguf_writer import to_interleaved_rotary, write_gguf
from tests.conftest import _TINY_DIMS, _build_tiny
from tests.engine.test_exactness import MAX_NEW_TOKENS, QUESTIONS, build_prompts, engine_greedy, hf_greedy

GEMMA2_SLIDING_WINDOW = 8
PHI3_SLIDING_WINDOW = 32
PHI3_ORIGINAL_CONTEXT = 40
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama 3.1's  # fmt: skip
QWEN2_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                 "short_factor": [1.0, 1.05, 1.15, 1.3], "long_factor": [1.1, 2.35, 6.2, 21.7]}  # fmt: skip
# Half of exactness.py's prompts: three chat ones of 42-52 tokens, three plain ones of 4-9, two of 71 and 89.
PROMPTS = (0, 1, 4, 7, 8, 9, 13, 15)


def _config(family: str):
    from transformers import Gemma2Config, LlamaConfig, Phi3Config, Qwen2Config

    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, rope_parameters=dict(LLAMA3_ROPE),
                           **_TINY_DIMS)  # fmt: skip
    if family == "qwen2":
        return Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, rope_parameters=dict(QWEN2_YARN),
                           **_TINY_DIMS)  # fmt: skip
    if family == "gemma2":
        # Real Gemma 2 2B/9B: query_pre_attn_scalar == head_dim == 256 != hidden/heads. Soft-caps other than
        # transformers' defaults (50, 30), which it would apply whatever the file says.
        return Gemma2Config(
            num_hidden_layers=3,  # sliding, full, sliding
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=GEMMA2_SLIDING_WINDOW,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=15.0,
            **_TINY_DIMS,
        )
    if family == "phi3":
        return Phi3Config(
            num_hidden_layers=2,
            sliding_window=PHI3_SLIDING_WINDOW,
            original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT,
            rope_parameters=json.loads(json.dumps(PHI3_LONGROPE)),
            **_TINY_DIMS,
        )
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "gemma2", "phi3"]


@dataclass(frozen=True)
class Case:
    family: str
    hf_dir: Path  # the original Hugging Face folder
    gguf_file: Path
    converted: Path  # lmserve's float32 folder for the GGUF (resolve_model)
    config: dict[str, Any]  # the original config.json
    weights: dict[str, torch.Tensor]  # the original weights


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These models are tiny: a second thread gains nothing, and where another process keeps a core busy, OpenMP's
    barriers make every small op wait for a descheduled thread (transformers' generate ran 20-40x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, cache_dir: Path
) -> Case:
    family = request.param
    root = tmp_path_factory.mktemp(f"gguf_{family}")
    hf_dir = _build_tiny(root / "hf", _config(family), smollm2_dir)
    gguf_file = write_gguf(hf_dir, root / "gguf" / f"tiny-{family}-F32.gguf", name=f"Tiny {family}")
    resolved = resolve_model(str(gguf_file), cache_dir)
    assert resolved.source == "gguf"
    config = json.loads((hf_dir / "config.json").read_text())
    weights = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    return Case(family, hf_dir, gguf_file, resolved.path, config, weights)


def _comparable(name: str, tensor: torch.Tensor, family: str) -> torch.Tensor:
    """Gemma's norms are stored w + 1 and read back (w + 1) - 1 in float32, which may round w by an ulp; the model
    only ever multiplies by 1 + w, and that is bit for bit the original's."""
    if family == "gemma2" and name.endswith("norm.weight"):
        return 1.0 + tensor
    return tensor


@pytest.mark.slow
def test_the_file_is_laid_out_as_llama_cpp_writes_it(case: Case) -> None:
    """Metadata keys and tensor transforms per family, read back with transformers' raw header reader."""
    metadata, names = read_gguf_metadata(str(case.gguf_file))
    config, arch = case.config, case.family
    assert metadata["general.architecture"] == arch
    assert metadata["general.file_type"] == 0  # ALL_F32
    assert metadata[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert metadata[f"{arch}.embedding_length"] == config["hidden_size"]
    assert metadata[f"{arch}.attention.head_count"] == 4
    assert metadata[f"{arch}.attention.head_count_kv"] == 2
    assert metadata[f"{arch}.context_length"] == config["max_position_embeddings"]
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "smollm"
    assert metadata["tokenizer.ggml.tokens"] == len(metadata["tokenizer.ggml.token_type"]) == 49152
    assert metadata["tokenizer.ggml.merges"] > 40000
    assert metadata["tokenizer.ggml.eos_token_id"] == 2 and "{%" in metadata["tokenizer.chat_template"]
    assert ("output.weight" in names) == (not config["tie_word_embeddings"])
    rope_tensors = {name for name in names if name.startswith("rope_")}
    if case.family == "gemma2":
        assert metadata["gemma2.attention.key_length"] == metadata["gemma2.attention.value_length"] == 256
        assert metadata["gemma2.attention.sliding_window"] == GEMMA2_SLIDING_WINDOW
        assert metadata["gemma2.attn_logit_softcapping"] == 20.0
        assert metadata["gemma2.final_logit_softcapping"] == 15.0
        assert "gemma2.rope.freq_base" not in metadata  # llama.cpp's Gemma 2 writes none
    elif case.family == "phi3":
        assert metadata["phi3.rope.dimension_count"] == 8  # a partial rotary: half of head_dim
        assert metadata["phi3.attention.sliding_window"] == PHI3_SLIDING_WINDOW
        assert metadata["phi3.rope.scaling.original_context_length"] == PHI3_ORIGINAL_CONTEXT
        scale = config["max_position_embeddings"] / PHI3_ORIGINAL_CONTEXT
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(PHI3_ORIGINAL_CONTEXT))
        assert metadata["phi3.rope.scaling.attn_factor"] == pytest.approx(attn_factor, rel=1e-6)
        assert "phi3.rope.scaling.type" not in metadata  # LongRoPE is the factor tensors
        assert rope_tensors == {"rope_factors_long.weight", "rope_factors_short.weight"}
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(names)
        assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & set(names)
    else:
        assert metadata[f"{arch}.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    if case.family == "llama":
        assert metadata["llama.rope.dimension_count"] == 16 and metadata["llama.vocab_size"] == 49152
        assert metadata["tokenizer.ggml.add_bos_token"] is False  # llama.cpp's rule for a 49152-token vocabulary
        assert not any(key.startswith("llama.rope.scaling") for key in metadata)  # Llama 3's is the tensor
        assert rope_tensors == {"rope_freqs.weight"}
    if case.family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(names)
        assert metadata["qwen2.rope.scaling.type"] == "yarn" and metadata["qwen2.rope.scaling.factor"] == 4.0
        assert metadata["qwen2.rope.scaling.original_context_length"] == 128
    if case.family == "gemma2":
        assert not rope_tensors

    stored = load_gguf_state_dict(GgufHeader.from_file(str(case.gguf_file)))
    original = case.weights

    def raw(name: str) -> torch.Tensor:
        return stored[name][...]

    assert torch.equal(raw("token_embd.weight"), original["model.embed_tokens.weight"])
    if case.family == "phi3":  # fused, as in the HF checkpoint
        assert torch.equal(raw("blk.0.attn_qkv.weight"), original["model.layers.0.self_attn.qkv_proj.weight"])
        assert torch.equal(raw("blk.0.ffn_up.weight"), original["model.layers.0.mlp.gate_up_proj.weight"])
        long_factors = torch.tensor(PHI3_LONGROPE["long_factor"], dtype=torch.float32)
        assert torch.equal(raw("rope_factors_long.weight"), long_factors)
    else:
        q, k = original["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.k_proj.weight"]
        if case.family == "llama":  # rotary rows interleaved, per query head and per KV head
            assert torch.equal(raw("blk.0.attn_q.weight"), to_interleaved_rotary(q, 4))
            assert torch.equal(raw("blk.0.attn_k.weight"), to_interleaved_rotary(k, 2))
            assert not torch.equal(raw("blk.0.attn_q.weight"), q)
            # Llama 3.1's divisors for these 8 frequencies: 1 for the 4 highest, 8 for the 3 lowest, one between
            divisors = raw("rope_freqs.weight")
            assert divisors[:4].eq(1).all() and divisors[5:].eq(8).all() and 1 < divisors[4] < 8
        else:
            assert torch.equal(raw("blk.0.attn_q.weight"), q) and torch.equal(raw("blk.0.attn_k.weight"), k)
    if not config["tie_word_embeddings"]:
        assert torch.equal(raw("output.weight"), original["lm_head.weight"])
    if case.family == "gemma2":  # Gemma's RMSNorm scales by 1 + w: llama.cpp stores 1 + w
        norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}  # fmt: skip
        for hf, gg in norms.items():
            assert torch.equal(raw(f"blk.1.{gg}.weight"), original[f"model.layers.1.{hf}.weight"] + 1), gg
        assert torch.equal(raw("output_norm.weight"), original["model.norm.weight"] + 1)
    else:
        assert torch.equal(raw("blk.1.attn_norm.weight"), original["model.layers.1.input_layernorm.weight"])


@pytest.fixture(scope="module")
def smollm2_vocabulary() -> dict[str, Any]:
    metadata, _ = read_gguf_metadata(
        str(bundled_location("smollm2-135m-instruct")), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    )
    return metadata


def test_the_vocabulary_is_what_llama_cpp_wrote_for_smollm2(case: Case, smollm2_vocabulary: dict[str, Any]) -> None:
    """The bundled SmolLM2 GGUF was written by llama.cpp's converter from the same tokenizer: every vocabulary key
    matches it (tokens, token types, merges, special ids, chat template, pre-tokenizer name)."""
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"]  # fmt: skip
    ours, _ = read_gguf_metadata(str(case.gguf_file), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    for key in keys:
        assert ours[key] == smollm2_vocabulary[key], key


# The config fields that set what the model computes; each the original states must come back as it states it.
CONFIG_FIELDS = ["model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                 "rope_parameters", "head_dim", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                 "query_pre_attn_scalar", "layer_types", "hidden_act", "hidden_activation",
                 "original_max_position_embeddings"]  # fmt: skip


def test_the_converted_folder_is_the_original(case: Case) -> None:
    """Every weight after llama.cpp's transforms are undone, and every config field that shapes the model: those
    transformers' GGUF loading reads, and those lmserve takes back from the file (soft-caps, windows, rope)."""
    converted = load_weights(case.converted)
    tied = {"lm_head.weight"} if case.config["tie_word_embeddings"] else set()
    assert converted.keys() == case.weights.keys() - tied
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32, name
        original = case.weights[name]
        assert torch.equal(_comparable(name, tensor, case.family), _comparable(name, original, case.family)), name

    config = json.loads((case.converted / "config.json").read_text())
    assert "quantization_config" not in config
    for field in CONFIG_FIELDS:
        if field in case.config:
            assert config.get(field) == case.config[field], field
    # stored as float32 in the file: the same float32 value the norms add
    eps = torch.tensor([config["rms_norm_eps"], case.config["rms_norm_eps"]], dtype=torch.float32)
    assert eps[0] == eps[1]


# with text where pre-tokenizers and normalizers part ways: decomposed accents, no-break spaces, runs of newlines
TEXTS = [*QUESTIONS, " leading space", "<|im_start|>user\nHi<|im_end|>\n", "naïve café ☕ 12345", "(a) $b 'S",
         unicodedata.normalize("NFD", "café naïve"), "x\u00a0y  z\n\n\nw"]  # fmt: skip


def test_the_tokenizer_survives(case: Case) -> None:
    """The converted folder's tokenizer (rebuilt from the GGUF vocabulary) encodes as the original, and reloads
    as the pipeline transformers built: a Gemma 2 file with this byte-level vocabulary reloads as one, not as
    Gemma's sentencepiece (which made every space unknown)."""
    original = AutoTokenizer.from_pretrained(str(case.hf_dir))
    converted = AutoTokenizer.from_pretrained(str(case.converted))
    for text in TEXTS:
        assert converted.encode(text) == original.encode(text), text
    messages = [{"role": "user", "content": "Hi"}]
    assert converted.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True
    )


def test_engine_matches_transformers_on_the_original(case: Case) -> None:
    """NativeEngine on the GGUF-converted folder, all prompts at once, against `generate` on the original folder."""
    config = EngineConfig(dtype="float32", num_kv_blocks=64, num_threads=1)
    engine = NativeEngine.load(case.converted, case.family, config)
    everything = build_prompts(engine)
    prompts = [everything[i] for i in PROMPTS]
    lengths = sorted(len(p) for p in prompts)
    if case.family == "gemma2":
        assert sum(n > GEMMA2_SLIDING_WINDOW for n in lengths) >= 6, "the window must cut into prompts"
    if case.family == "phi3":
        assert sum(n > PHI3_SLIDING_WINDOW for n in lengths) >= 4, "the window must cut into prompts"
        # LongRoPE's long factors past the original context, its short ones below. None crosses it while generating:
        # there transformers' Phi-3 drops its cache and recomputes the whole sequence with the long factors
        # (prepare_inputs_for_generation), which NativeEngine does not (it keeps the keys it rotated with the short).
        assert sum(n > PHI3_ORIGINAL_CONTEXT for n in lengths) >= 4, lengths
        assert not any(n <= PHI3_ORIGINAL_CONTEXT < n + MAX_NEW_TOKENS for n in lengths), lengths
    expected = hf_greedy(case.hf_dir, prompts, engine.eos_token_ids)
    got = asyncio.run(engine_greedy(engine, prompts, concurrent=True))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{case.family}: prompt {i} ({len(prompts[i])} tokens) diverged"
    assert len({tuple(t) for t in expected}) > len(prompts) // 2, "the prompts lead to different outputs"


def test_f16_files_keep_norms_and_vectors_in_f32(case: Case, tmp_path: Path) -> None:
    """outtype f16, as llama.cpp's --outtype f16: matrices F16, 1-D tensors (biases, norms) F32, same values."""
    f16 = write_gguf(case.hf_dir, tmp_path / "f16.gguf", outtype="f16")
    metadata, _ = read_gguf_metadata(str(f16))
    assert metadata["general.file_type"] == 1  # MOSTLY_F16
    header = GgufHeader.from_file(str(f16))
    as_f32 = load_gguf_state_dict(GgufHeader.from_file(str(case.gguf_file)))
    as_f16 = load_gguf_state_dict(header)
    assert as_f16.keys() == as_f32.keys()
    for info in header.tensors:
        full = as_f32[info.name][...]
        if len(info.shape) == 1 or info.name.endswith("_norm.weight"):
            assert info.ggml_type == 0 and torch.equal(as_f16[info.name][...], full), info.name
        else:
            assert info.ggml_type == 1 and torch.equal(as_f16[info.name][...], full.half()), info.name


# --- what transformers' GGUF loading drops, taken back from the file (gguf.dropped_config) ----------------------

# (family, config.json changes): files beside the family cases above, whose changed fields must come back. Only
# the metadata matters here (the cases above serve their own), so the weights stay the family's.
RESTORED = {
    "llama_linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5}}),
    # every yarn key llama.cpp writes
    "llama_yarn_rope": (
        "llama",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 16.0,
                             "beta_slow": 2.0, "attention_factor": 1.1, "original_max_position_embeddings": 128}},
    ),  # fmt: skip
    "llama32_rope_freqs": ("llama", {"rope_parameters": dict(LLAMA3_ROPE, factor=32.0)}),  # Llama 3.2's
    "phi3_mini_4k_window": ("phi3", {"sliding_window": 2047}),
    "phi3_no_window": ("phi3", {"sliding_window": None}),  # llama.cpp writes 0
    # Gemma 2 27B (46 layers) scales queries by hidden/heads (144 there), not head_dim: llama.cpp knows it by its
    # layer count, and the file has no key for it. (The tensors stay those of 3 layers.)
    "gemma2_27b_query_scale": ("gemma2", {"num_hidden_layers": 46, "layer_types": None, "query_pre_attn_scalar": 16}),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    """Original folders of the families RESTORED uses (the config matters there, not the weights)."""
    root = tmp_path_factory.mktemp("gguf_restored")
    families = {family for family, _ in RESTORED.values()}
    return {family: _build_tiny(root / family, _config(family), smollm2_dir) for family in families}


def _file_with(family_dirs: dict[str, Path], family: str, changes: dict[str, Any], dest: Path) -> Path:
    folder = dest.parent / family
    shutil.copytree(family_dirs[family], folder)
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return write_gguf(folder, dest)


@pytest.mark.parametrize("name", list(RESTORED))
def test_what_transformers_drops_comes_back_from_the_file(
    name: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Each changed field, as the original config states it; of the rope, everything but rope_theta (which
    transformers reads)."""
    family, changes = RESTORED[name]
    restored = dropped_config(_file_with(family_dirs, family, changes, tmp_path / f"{name}.gguf"))
    for field, value in changes.items():
        if field == "rope_parameters":
            expected = {k: v for k, v in value.items() if k != "rope_theta"}
            assert restored.get(field, {"rope_type": "default"}) == expected, field
        elif field not in ("num_hidden_layers", "layer_types"):
            assert restored[field] == value, field


@pytest.mark.slow
def test_rope_freqs_it_cannot_state_exactly_are_refused(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A rope_freqs tensor fixes only ratios of Llama 3's parameters: one that llama.cpp's own values for the rest
    do not give back is refused, naming the file, rather than converted with the wrong rope."""
    rope = dict(LLAMA3_ROPE, low_freq_factor=2.0, high_freq_factor=8.0)
    gguf_file = _file_with(family_dirs, "llama", {"rope_parameters": rope}, tmp_path / "odd-llama3.gguf")
    with pytest.raises(CheckpointError, match=r"cannot convert GGUF file .*odd-llama3\.gguf: its rope_freqs\.weight"):
        resolve_model(str(gguf_file), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".sources"]  # nothing converted, nothing published


@pytest.mark.xfail(
    strict=True,
    reason="the file has no key for query_pre_attn_scalar: llama.cpp takes hidden/heads for 46 layers (Gemma 2 27B), "
    "else head_dim, so a model of other depth with another scale cannot be told apart",
)
def test_gemma2_query_scale_of_another_depth(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    gguf_file = _file_with(family_dirs, "gemma2", {"query_pre_attn_scalar": 16}, tmp_path / "gemma2-16.gguf")
    assert dropped_config(gguf_file)["query_pre_attn_scalar"] == 16
