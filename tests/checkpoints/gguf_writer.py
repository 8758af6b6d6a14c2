"""Write a GGUF file from a Hugging Face checkpoint folder the way llama.cpp's convert_hf_to_gguf.py does, for
the Llama, Qwen2, Gemma 2 and Phi-3 families, so tests can serve GGUF files of those families without a
download:

    write_gguf(hf_folder, dest)                 # F32 tensors
    write_gguf(hf_folder, dest, outtype="f16")  # F16 matrices; 1-D tensors and norms stay F32, as llama.cpp

What llama.cpp writes, per family (its conversion/{llama,qwen,gemma,phi}.py and base.py):

  all      general.architecture/name/type/file_type/quantization_version; {arch}.block_count, context_length
           (max_position_embeddings), embedding_length, feed_forward_length, attention.head_count and
           head_count_kv; tensors renamed by gguf-py's TensorNameMap (blk.N.attn_q, ffn_gate, token_embd,
           output_norm...); a tied model has no output.weight. Llama and Qwen2 rope scaling as
           rope.scaling.type/factor, + original_context_length and the yarn_* keys the config states for yarn.
  llama    + rope.freq_base, attention.layer_norm_rms_epsilon, attention.key_length/value_length (where the
           config states head_dim), vocab_size, rope.dimension_count (head_dim, else hidden/heads); the rows
           of q_proj (by num_heads) and k_proj (by num_kv_heads) permuted from HF's half-split rotary layout to
           llama.cpp's interleaved one; Llama 3 rope scaling as a rope_freqs.weight tensor; and
           tokenizer.ggml.add_bos_token false where vocab_size is 49152 (llama.cpp's rule for Granite's small
           models, which the SmolLM2 vocabulary happens to match).
  qwen2    + rope.freq_base, attention.layer_norm_rms_epsilon; tensors as they are (q/k/v biases included).
  gemma2   + attention.layer_norm_rms_epsilon, attention.key_length/value_length (head_dim),
           attn_logit_softcapping, final_logit_softcapping, attention.sliding_window; no rope.freq_base;
           every *norm.weight stored + 1 (Gemma's RMSNorm scales by 1 + w); lm_head dropped (tied).
  phi3     + rope.scaling.original_context_length, attention.layer_norm_rms_epsilon, rope.dimension_count
           (partial_rotary_factor * hidden / heads), rope.freq_base, attention.sliding_window (0 where the
           config has none); the fused qkv_proj and gate_up_proj stay fused (attn_qkv, ffn_up); LongRoPE
           factors as rope_factors_long/short tensors.

The vocabulary is written in llama.cpp's "gpt2" (byte-level BPE) layout, as its _set_vocab_gpt2 does: every id
below vocab_size as a token ([PADn] where the tokenizer has none), token types (added special tokens CONTROL,
other added tokens USER_DEFINED, the rest NORMAL), the merges, the special token ids and add_*_token flags, and
the chat template (gguf-py's SpecialVocab reads those). llama.cpp takes that path for Llama 3-style and Qwen2
folders without a tokenizer.model, and for Phi-3 where tokenizer_config names GPT2Tokenizer (Phi-4); for
Gemma 2 it only reads a sentencepiece tokenizer.model, so a Gemma 2 file with this vocabulary is one llama.cpp's
converter would not itself produce from such a folder (the model tensors and metadata are exactly its own).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

# llama.cpp names the BPE pre-tokenizer by hashing the tokenization of a probe text; the SmolLM/SmolLM2 tokenizer
# the tiny test models use hashes to "smollm".
DEFAULT_TOKENIZER_PRE = "smollm"
OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}

Tensors = Iterator[tuple[str, torch.Tensor]]  # (GGUF name, data) pairs
Config = dict[str, Any]  # config.json, text_config merged in


@dataclass(frozen=True)
class _Family:
    arch: gguf.MODEL_ARCH
    add_hparams: Callable[[gguf.GGUFWriter, Config, Config], None]  # (writer, config, rope)
    tensors: Callable[[str, torch.Tensor, Config, gguf.TensorNameMap], Tensors]
    extra_tensors: Callable[[Config, Config], Tensors] | None = None  # (config, rope)
    # keys a family writes beside its hyperparameters: (writer, config, rope, folder)
    extra_keys: Callable[[gguf.GGUFWriter, Config, Config, Path], None] | None = None


def write_gguf(
    hf_folder: Path,
    dest: Path,
    *,
    outtype: str = "f32",
    tokenizer_pre: str = DEFAULT_TOKENIZER_PRE,
    name: str | None = None,
) -> Path:
    """Write `hf_folder` (model_type llama, qwen2, gemma2 or phi3; safetensors weights) to the GGUF file `dest`.
    `name` is general.name (default: from the folder's name). Not "mistral": transformers reads a llama file of
    that name as Mistral."""
    hf_folder, dest = Path(hf_folder), Path(dest)
    config = json.loads((hf_folder / "config.json").read_text())
    config = {**config, **config.get("text_config", {})}
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"write_gguf writes {sorted(FAMILIES)}, not model_type {model_type!r}")
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {sorted(OUTTYPES)}, not {outtype!r}")
    family = FAMILIES[model_type]
    rope = _rope_parameters(config)
    name_map = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or hf_folder.name.replace("_", " ").replace("-", " ").title())
    family.add_hparams(writer, config, rope)
    writer.add_file_type(OUTTYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_bpe_vocab(writer, hf_folder, config, tokenizer_pre)
    if family.extra_keys is not None:
        family.extra_keys(writer, config, rope, hf_folder)

    def add(name: str, data: torch.Tensor) -> None:
        array = data.to(torch.float32).numpy()
        # llama.cpp keeps 1-D tensors and norms in float32 whatever the output type
        if outtype == "f16" and array.ndim > 1 and not name.endswith("_norm.weight") and name.endswith(".weight"):
            array = array.astype(np.float16)
        writer.add_tensor(name, np.ascontiguousarray(array))

    for hf_name, tensor in _read_safetensors(hf_folder):
        for name, data in family.tensors(hf_name, tensor, config, name_map):
            add(name, data)
    if family.extra_tensors is not None:
        for name, data in family.extra_tensors(config, rope):
            add(name, data)

    dest.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=dest)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


# --- shared pieces --------------------------------------------------------------------------------------------


def _read_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no model*.safetensors")
    for file in files:
        yield from load_file(str(file)).items()


def _rope_parameters(config: Config) -> Config:
    """The rope settings however the config spells them (rope_parameters, the older rope_scaling, rope_theta)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    return rope


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ValueError(f"gguf-py's name map has no GGUF name for {hf_name!r}")
    return gguf_name


def _add_common_hparams(writer: gguf.GGUFWriter, config: Config, rope: Config) -> None:
    """What llama.cpp's TextModel.set_gguf_parameters writes from a config (for the keys these families have)."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    if config.get("num_key_value_heads") is not None:
        writer.add_head_count_kv(config["num_key_value_heads"])
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("extrapolation_factor") is not None:
            writer.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
        if rope.get("attention_factor", rope.get("attn_factor")) is not None:
            writer.add_rope_scaling_yarn_attn_factor(rope.get("attention_factor", rope.get("attn_factor")))
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _renamed(hf_name: str, tensor: torch.Tensor, config: Config, name_map: gguf.TensorNameMap) -> Tensors:
    yield _gguf_name(name_map, hf_name), tensor


def _add_bpe_vocab(writer: gguf.GGUFWriter, folder: Path, config: Config, tokenizer_pre: str) -> None:
    """llama.cpp's "gpt2" vocabulary: tokens and their types from the HF tokenizer, then gguf-py's SpecialVocab
    (merges, special token ids, add_*_token flags, chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    vocab_size = config.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{folder}: the tokenizer has ids beyond vocab_size={vocab_size}")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder

    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            info = added_decoder[index]
            if not info.normalized:  # llama.cpp expects control and user-defined tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if info.special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                kind = gguf.TokenType.USER_DEFINED
                token = token.replace("\u2581", " ")
        tokens.append(token)
        types.append(kind)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp treats as control even where the tokenizer does not mark them special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# --- Llama ----------------------------------------------------------------------------------------------------


def _llama_hparams(writer: gguf.GGUFWriter, config: Config, rope: Config) -> None:
    _add_common_hparams(writer, config, rope)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(_head_dim(config))


def _head_dim(config: Config) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def to_interleaved_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's row order for q_proj/k_proj rows (or biases): within each head, HF's rotary layout pairs
    dimension i with i + d/2; llama.cpp's pairs 2i with 2i + 1, so the two halves are interleaved."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_tensors(hf_name: str, tensor: torch.Tensor, config: Config, name_map: gguf.TensorNameMap) -> Tensors:
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        tensor = to_interleaved_rotary(tensor, config["num_attention_heads"])
    elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        tensor = to_interleaved_rotary(tensor, config.get("num_key_value_heads") or config["num_attention_heads"])
    yield _gguf_name(name_map, hf_name), tensor


def _llama3_rope_freqs(config: Config, rope: Config) -> Tensors:
    """Llama 3 rope scaling is a per-frequency divisor llama.cpp stores as rope_freqs.weight (no metadata key),
    computed as its LlamaModel.generate_extra_tensors does, float32 tensors included. Its original context is the
    config's top-level original_max_position_embeddings, else 8192: llama.cpp never reads the rope's own (every
    Llama 3.x states 8192 there)."""
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return
    dim = _head_dim(config)
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = config.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", torch.tensor(rope_factors, dtype=torch.float32)


def _llama_extra_keys(writer: gguf.GGUFWriter, config: Config, rope: Config, folder: Path) -> None:
    add_prefix_space = _tokenizer_config(folder).get("add_prefix_space")
    if add_prefix_space is not None:
        writer.add_add_space_prefix(add_prefix_space)
    if config.get("vocab_size", 32000) == 49152:  # llama.cpp: "granite small models"
        writer.add_add_bos_token(False)


# --- Gemma 2 --------------------------------------------------------------------------------------------------


def _gemma2_hparams(writer: gguf.GGUFWriter, config: Config, rope: Config) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def _gemma2_tensors(hf_name: str, tensor: torch.Tensor, config: Config, name_map: gguf.TensorNameMap) -> Tensors:
    if hf_name == "lm_head.weight":  # llama.cpp always ties Gemma's head to the embedding
        return
    if hf_name.endswith("norm.weight"):
        tensor = tensor + 1
    yield _gguf_name(name_map, hf_name), tensor


def _gemma2_extra_keys(writer: gguf.GGUFWriter, config: Config, rope: Config, folder: Path) -> None:
    writer.add_add_space_prefix(False)  # what Gemma 2's set_vocab adds after its (sentencepiece) vocabulary


# --- Phi-3 ----------------------------------------------------------------------------------------------------


def _phi3_rope_dims(config: Config, rope: Config) -> int:
    return int(rope.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // config["num_attention_heads"]


def _phi3_original_context(config: Config, rope: Config) -> int:
    return rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))


def _phi3_hparams(writer: gguf.GGUFWriter, config: Config, rope: Config) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(_phi3_original_context(config, rope))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(_phi3_rope_dims(config, rope))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: llama.cpp's mark of "none"


def _phi3_rope_factors(config: Config, rope: Config) -> Tensors:
    """LongRoPE (Phi-3 128k): per-frequency long/short factors as tensors (their attention factor is a key)."""
    long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
    if not long_factors:
        return
    if not short_factors or not len(long_factors) == len(short_factors) == _phi3_rope_dims(config, rope) / 2:
        raise ValueError("LongRoPE needs long_factor and short_factor of rope dimensions / 2 entries each")
    yield _rope_factors_name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), torch.tensor(long_factors, dtype=torch.float32)
    yield _rope_factors_name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT), torch.tensor(short_factors, dtype=torch.float32)


def _rope_factors_name(kind: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[kind] + ".weight"


def _phi3_longrope_attn_factor(writer: gguf.GGUFWriter, config: Config, rope: Config, folder: Path) -> None:
    if not rope.get("long_factor"):
        return
    scale = config["max_position_embeddings"] / _phi3_original_context(config, rope)
    kind = str(rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        factor = math.sqrt(1 + math.log(scale) / math.log(_phi3_original_context(config, rope))) if scale > 1 else 1.0
    elif kind == "yarn":
        factor = 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0
    else:
        raise ValueError(f"the writer writes Phi-3's longrope, su and yarn scalings, not {kind!r}")
    writer.add_rope_scaling_attn_factors(factor)


FAMILIES: dict[str, _Family] = {
    "llama": _Family(gguf.MODEL_ARCH.LLAMA, _llama_hparams, _llama_tensors, _llama3_rope_freqs, _llama_extra_keys),
    "qwen2": _Family(gguf.MODEL_ARCH.QWEN2, _add_common_hparams, _renamed),
    "gemma2": _Family(gguf.MODEL_ARCH.GEMMA2, _gemma2_hparams, _gemma2_tensors, None, _gemma2_extra_keys),
    "phi3": _Family(gguf.MODEL_ARCH.PHI3, _phi3_hparams, _renamed, _phi3_rope_factors, _phi3_longrope_attn_factor),
}
