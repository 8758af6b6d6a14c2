"""The decoder families lmserve's own modules serve: a small declarative spec per family.

A spec says what a family's layer is made of (which norms and where, the MLP, the positions, the attention
features) and where each of DecoderModel's tensors comes from in the family's checkpoint. Numbers that a
config sets (windows, multipliers, soft-caps, biases) are read by `settings` from the config, the way the
family's transformers module reads them.

    spec = SPECS[config.model_type]
    model = DecoderModel(config, spec, max_model_len)        # decoder.py
    model.load_hf_weights(weights)                           # by spec.weights

Weight sources, per DecoderModel parameter ("{i}" a layer, "{e}" an expert):
    "name"                one checkpoint tensor
    ("a", "b", ...)       several, concatenated by rows (q, k, v into qkv; gate, up into gate_up)
    Transposed("name")    a Conv1D weight stored [in, out] (GPT-2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Transposed:
    name: str


Source = Union[str, tuple[str, ...], Transposed]


@dataclass(frozen=True)
class FamilySpec:
    norm: str = "llama"  # RMSNorm kind (layers.RMSNorm: llama | gemma | olmo2), or "layer" (LayerNorm with bias)
    # Which norms a layer has: attn_norm before attention, attn_post_norm on its output, mlp_norm before the
    # MLP, mlp_post_norm on its output (Llama: the two pre-norms; Gemma 2/3 all four; OLMo 2 the two post).
    norms: tuple[str, ...] = ("attn_norm", "mlp_norm")
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, Gemma 3); "full": over all heads (OLMo 2)
    mlp: str = "gated"  # "gated": down(act(gate) * up); "plain": down(act(up)) (GPT-2, StarCoder2); "moe"
    learned_positions: bool = False  # GPT-2's position embeddings instead of rotary ones
    weights: dict[str, Source] = field(default_factory=dict)

    @property
    def llama_shaped(self) -> bool:
        """Layers the fused C elementwise ops (fused_ops.c) compute: Llama's pre-norm RMSNorm, a gated MLP or
        experts of one, rotary positions. Everything a config adds beyond that (settings) is checked apart;
        decoder.c takes dense MLPs only."""
        return (self.norm, self.norms, self.learned_positions) == ("llama", ("attn_norm", "mlp_norm"), False) and (
            self.mlp in ("gated", "moe")
        )


@dataclass(frozen=True)
class Settings:
    """What a family's config sets, read once (see `settings`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    activation: str  # a transformers ACT2FN name
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    attention_scales: tuple[float, ...]  # per layer (GPT-2 can scale by the inverse layer index)
    windows: tuple[int | None, ...]  # per layer; None: full attention
    layer_types: tuple[str | None, ...]  # per layer, for per-type rotary bases (Gemma 3)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None  # Gemma: sqrt(hidden), in the model dtype; Granite: embedding_multiplier
    residual_multiplier: float = 1.0  # Granite
    logits_divisor: float = 1.0  # Granite's logits_scaling
    partial_rotary_factor: float = 1.0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    normalize_top_k: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: a mixture of experts (else a dense MLP)

    @property
    def plain_llama(self) -> bool:
        """Nothing beyond Llama's arithmetic: the fused C paths apply (with a llama-shaped spec)."""
        return (
            self.attn_softcap is None and self.final_softcap is None and self.embed_scale is None
            and self.residual_multiplier == 1.0 and self.logits_divisor == 1.0 and self.partial_rotary_factor == 1.0
        )  # fmt: skip


def _llama_weights(attn_norm: str = "input_layernorm", mlp_norm: str = "post_attention_layernorm") -> dict[str, Source]:
    layer = "model.layers.{i}."
    return {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "layers.{i}.attn_norm.weight": layer + attn_norm + ".weight",
        "layers.{i}.mlp_norm.weight": layer + mlp_norm + ".weight",
        "layers.{i}.self_attn.qkv_proj.weight": tuple(layer + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "layers.{i}.self_attn.qkv_proj.bias": tuple(layer + f"self_attn.{p}_proj.bias" for p in "qkv"),
        "layers.{i}.self_attn.o_proj.weight": layer + "self_attn.o_proj.weight",
        "layers.{i}.self_attn.o_proj.bias": layer + "self_attn.o_proj.bias",
        "layers.{i}.self_attn.q_norm.weight": layer + "self_attn.q_norm.weight",
        "layers.{i}.self_attn.k_norm.weight": layer + "self_attn.k_norm.weight",
        "layers.{i}.mlp.gate_up_proj.weight": (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"),
        "layers.{i}.mlp.gate_up_proj.bias": (layer + "mlp.gate_proj.bias", layer + "mlp.up_proj.bias"),
        "layers.{i}.mlp.down_proj.weight": layer + "mlp.down_proj.weight",
        "layers.{i}.mlp.down_proj.bias": layer + "mlp.down_proj.bias",
    }


def _with(base: dict[str, Source], **changes: Source | None) -> dict[str, Source]:
    """`base` with entries replaced (a dotted key passed with "__" for "."), or removed where None."""
    out = dict(base)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_LLAMA = _llama_weights()
_SANDWICH = {
    **_llama_weights(mlp_norm="pre_feedforward_layernorm"),
    "layers.{i}.attn_post_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp_post_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
_OLMO2 = {
    **_with(_LLAMA, **{"layers.{i}.attn_norm.weight": None, "layers.{i}.mlp_norm.weight": None}),
    "layers.{i}.attn_post_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp_post_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
_PHI3 = {
    **_LLAMA,
    "layers.{i}.self_attn.qkv_proj.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
    "layers.{i}.mlp.gate_up_proj.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
}
_STARCODER2 = {
    **_LLAMA,
    "norm.bias": "model.norm.bias",
    "layers.{i}.attn_norm.bias": "model.layers.{i}.input_layernorm.bias",
    "layers.{i}.mlp_norm.bias": "model.layers.{i}.post_attention_layernorm.bias",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.c_fc.weight",
    "layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.c_fc.bias",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.c_proj.weight",
    "layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.c_proj.bias",
}
_GPT2 = {
    "embed_tokens.weight": "transformer.wte.weight",
    "embed_positions.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "layers.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "layers.{i}.mlp_norm.weight": "transformer.h.{i}.ln_2.weight",
    "layers.{i}.mlp_norm.bias": "transformer.h.{i}.ln_2.bias",
    "layers.{i}.self_attn.qkv_proj.weight": Transposed("transformer.h.{i}.attn.c_attn.weight"),
    "layers.{i}.self_attn.qkv_proj.bias": "transformer.h.{i}.attn.c_attn.bias",
    "layers.{i}.self_attn.o_proj.weight": Transposed("transformer.h.{i}.attn.c_proj.weight"),
    "layers.{i}.self_attn.o_proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "layers.{i}.mlp.up_proj.weight": Transposed("transformer.h.{i}.mlp.c_fc.weight"),
    "layers.{i}.mlp.up_proj.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "layers.{i}.mlp.down_proj.weight": Transposed("transformer.h.{i}.mlp.c_proj.weight"),
    "layers.{i}.mlp.down_proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
}
_MIXTRAL = {
    **_LLAMA,
    "layers.{i}.mlp.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.mlp.experts.{e}.gate_up_proj.weight": (
        "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"
    ),
    "layers.{i}.mlp.experts.{e}.down_proj.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
}
_QWEN3_MOE = {
    **_LLAMA,
    "layers.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.mlp.experts.{e}.gate_up_proj.weight": (
        "model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"
    ),
    "layers.{i}.mlp.experts.{e}.down_proj.weight": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
}

_GEMMA2 = FamilySpec(norm="gemma", norms=("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"), weights=_SANDWICH)

SPECS: dict[str, FamilySpec] = {
    "llama": FamilySpec(weights=_LLAMA),
    "mistral": FamilySpec(weights=_LLAMA),
    "qwen2": FamilySpec(weights=_LLAMA),
    "qwen3": FamilySpec(qk_norm="head", weights=_LLAMA),
    "granite": FamilySpec(weights=_LLAMA),
    "phi3": FamilySpec(weights=_PHI3),
    "gemma": FamilySpec(norm="gemma", weights=_LLAMA),
    "gemma2": _GEMMA2,
    "gemma3_text": FamilySpec(norm="gemma", norms=_GEMMA2.norms, qk_norm="head", weights=_SANDWICH),
    "olmo2": FamilySpec(norm="olmo2", norms=("attn_post_norm", "mlp_post_norm"), qk_norm="full", weights=_OLMO2),
    "starcoder2": FamilySpec(norm="layer", mlp="plain", weights=_STARCODER2),
    "gpt2": FamilySpec(norm="layer", mlp="plain", learned_positions=True, weights=_GPT2),
    "mixtral": FamilySpec(mlp="moe", weights=_MIXTRAL),
    "qwen3_moe": FamilySpec(qk_norm="head", mlp="moe", weights=_QWEN3_MOE),
}


def _get(config: PretrainedConfig, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


_WINDOW_EVERY_LAYER = frozenset({"mistral", "mixtral", "starcoder2", "phi3", "qwen3_moe"})


def _windows(config: PretrainedConfig, max_model_len: int | None) -> tuple[int | None, ...]:
    """Each layer's sliding window as the family's transformers module applies it, or None where a layer
    has none or its window is at least max_model_len (it never bites; the fast paths have no window)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if config.model_type in _WINDOW_EVERY_LAYER or not layer_types:
        # These pass config.sliding_window to every layer (the others only name it per layer type).
        per_layer = [window if config.model_type in _WINDOW_EVERY_LAYER else None] * n
    else:
        per_layer = [window if t == "sliding_attention" else None for t in layer_types]
    return tuple(
        int(w) if w and (max_model_len is None or w < max_model_len) else None for w in per_layer
    )


def settings(config: PretrainedConfig, max_model_len: int | None = None) -> Settings:
    """The numbers `config` sets for DecoderModel, read as the family's transformers module reads them."""
    mt = config.model_type
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = _get(config, "head_dim", default=hidden // heads)
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    attention_bias = bool(getattr(config, "attention_bias", False))
    use_bias = bool(getattr(config, "use_bias", mt in ("gpt2",)))
    scale = head_dim**-0.5
    if mt in ("gemma2", "gemma3_text"):
        scale = config.query_pre_attn_scalar**-0.5
    elif mt == "granite":
        scale = config.attention_multiplier
    elif mt == "gpt2":
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
    embed_scale = None
    if mt.startswith("gemma"):
        embed_scale = math.sqrt(hidden)
    elif mt == "granite":
        embed_scale = config.embedding_multiplier
    num_experts = int(_get(config, "num_local_experts", "num_experts", default=0)) if SPECS[mt].mlp == "moe" else 0
    if mt == "qwen3_moe":
        sparse_step = config.decoder_sparse_step
        moe_layers = tuple(
            i not in config.mlp_only_layers and num_experts > 0 and (i + 1) % sparse_step == 0
            for i in range(config.num_hidden_layers)
        )
    else:
        moe_layers = (num_experts > 0,) * config.num_hidden_layers
    layer_types = tuple(getattr(config, "layer_types", None) or (None,) * config.num_hidden_layers)
    return Settings(
        hidden_size=hidden,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_get(config, "intermediate_size", "n_inner", default=4 * hidden),
        norm_eps=_get(config, "rms_norm_eps", "norm_epsilon", "layer_norm_epsilon", default=1e-5),
        activation=config.hidden_act if mt == "gemma" else _get(
            config, "hidden_activation", "hidden_act", "activation_function", default="silu"
        ),
        qkv_bias=mt == "qwen2" or attention_bias or use_bias,
        o_bias=(attention_bias and mt != "qwen2") or use_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)) or use_bias,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_scales=tuple(
            float(scale) / (i + 1 if mt == "gpt2" and config.scale_attn_by_inverse_layer_idx else 1)
            for i in range(config.num_hidden_layers)
        ),
        windows=_windows(config, max_model_len),
        layer_types=layer_types,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if mt == "gemma2" else None,
        final_softcap=getattr(config, "final_logit_softcapping", None),
        embed_scale=embed_scale,
        residual_multiplier=float(getattr(config, "residual_multiplier", 1.0)),
        logits_divisor=float(getattr(config, "logits_scaling", 1.0)),
        partial_rotary_factor=float(_get(config, "partial_rotary_factor", default=1.0)),
        num_experts=num_experts,
        experts_per_token=int(_get(config, "num_experts_per_tok", default=0)),
        moe_intermediate_size=int(_get(config, "moe_intermediate_size", "intermediate_size", default=0)),
        normalize_top_k=bool(getattr(config, "norm_topk_prob", True)),
        moe_layers=moe_layers,
    )
