"""Tiny random-weight configs of every decoder family lmserve serves, each with the odd shapes its
transformers config can express: GQA ratios, head_dim apart from hidden/heads, biases, tied and untied
heads, rope scaling, sliding windows shorter than the prompts, soft-capping, multipliers, experts.

NATIVE: families with a spec (service/lmserve/engine/modeling/families.py), served by lmserve's own modules.
GENERIC: families without one, served by transformers' own class over the paged cache (generic.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import transformers

from tests.conftest import SMOLLM2_VOCAB_SIZE

WINDOW = 8  # shorter than most test prompts: the window bites

_IDS = dict(vocab_size=SMOLLM2_VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=2)
_DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             max_position_embeddings=512, **_IDS)  # fmt: skip


def _dims(**overrides: Any) -> dict[str, Any]:
    return {**_DIMS, **overrides}


NATIVE: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama-linear-rope": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, head_dim=24, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, **_dims(num_key_value_heads=1),
    ),
    "llama3-rope": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, **_dims(),
    ),
    "llama-yarn": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        **_dims(),
    ),
    "llama-dynamic": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **_dims(),
    ),
    "mistral-window": lambda: transformers.MistralConfig(
        num_hidden_layers=2, sliding_window=WINDOW, head_dim=32, **_dims(num_key_value_heads=1),
    ),
    "qwen2-window": lambda: transformers.Qwen2Config(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        tie_word_embeddings=True, **_dims(),
    ),
    "qwen3": lambda: transformers.Qwen3Config(num_hidden_layers=2, head_dim=32, **_dims()),
    "gemma": lambda: transformers.GemmaConfig(num_hidden_layers=2, head_dim=24, **_dims(num_key_value_heads=1)),
    "gemma2": lambda: transformers.Gemma2Config(
        num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
        attn_logit_softcapping=30.0, final_logit_softcapping=20.0, **_dims(),
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        num_hidden_layers=4, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
        final_logit_softcapping=25.0, **_dims(),
    ),
    "phi3": lambda: transformers.Phi3Config(num_hidden_layers=2, **_dims(num_key_value_heads=4)),
    "phi3-longrope": lambda: transformers.Phi3Config(
        num_hidden_layers=2, partial_rotary_factor=0.75, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                      "long_factor": [2.0 + 0.5 * i for i in range(6)]},
        **_dims(),
    ),
    "olmo2": lambda: transformers.Olmo2Config(num_hidden_layers=2, **_dims()),
    "granite": lambda: transformers.GraniteConfig(
        num_hidden_layers=2, embedding_multiplier=6.0, residual_multiplier=0.4, attention_multiplier=0.05,
        logits_scaling=4.0, **_dims(),
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_inner=80, n_positions=512, scale_attn_by_inverse_layer_idx=True, **_IDS,
    ),
    "starcoder2": lambda: transformers.Starcoder2Config(
        num_hidden_layers=2, sliding_window=WINDOW, use_bias=True, **_dims(),
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **_dims(),
    ),
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
        mlp_only_layers=[1], head_dim=32, **_dims(),
    ),
}

GENERIC: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "cohere": lambda: transformers.CohereConfig(num_hidden_layers=2, logit_scale=0.5, **_dims()),
    "glm": lambda: transformers.GlmConfig(num_hidden_layers=2, head_dim=16, **_dims()),
    "smollm3": lambda: transformers.SmolLM3Config(num_hidden_layers=4, no_rope_layer_interval=2, **_dims()),
    "helium": lambda: transformers.HeliumConfig(num_hidden_layers=2, head_dim=16, **_dims()),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(
        num_hidden_layers=2, rotary_pct=0.5, hidden_size=64, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=512, **_IDS,
    ),
}
