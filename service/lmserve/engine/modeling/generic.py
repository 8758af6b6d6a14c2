"""Any decoder transformers implements, served through transformers' own model class.

transformers routes every attention call of a model through its attention interface registry
(`AttentionInterface`); registering lmserve's paged attention there under ATTENTION_NAME and loading
the model with `attn_implementation=ATTENTION_NAME` makes the model's layers read and write lmserve's
paged KV cache. The step's tokens go in flat, as one row of [1, num_tokens] with each token's own
position (rotary and learned positions take the positions as given), and no mask is built: the step's
AttentionMetadata says which keys each query sees, sliding windows and soft-capping come as the
attention call's own arguments. So batching, chunked prefill and the prefix cache apply to any family,
exactly, at the speed of transformers' modules rather than lmserve's fused ones (vLLM's Transformers
backend works the same way).

    model = TransformersCausalLM.load(folder, dtype, device)
    hidden = model.forward(input_ids, positions, kv_caches, meta)   # [num_tokens, hidden]
    logits = model.compute_logits(hidden[rows])                     # the family's own head
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import AttentionInterface

from lmserve.engine.modeling.attention import AttentionMetadata, paged_attention
from lmserve.engine.modeling.forward_path import ForwardPath

ATTENTION_NAME = "lmserve_paged"


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer stores per token: its KV heads and head size, as the probe saw them."""

    num_kv_heads: int
    head_dim: int
    window: int | None
    softcap: float | None


class _Step(threading.local):
    """The step being run on this thread: the KV pool and the attention plan, or a probe's record.
    Thread-local: each engine steps on its own thread, and several engines may share a process."""

    kv_caches: torch.Tensor | None = None
    meta: AttentionMetadata | None = None
    max_model_len: int = 0  # a window at least this long never bites, and is not applied
    probe: dict[int, LayerShape] | None = None


_STEP = _Step()


def _paged_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim], positions applied
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over lmserve's paged cache; returns [1, tokens, heads, dim]."""
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: its layer cannot be given a KV cache")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [num_tokens, heads, head_dim]
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    window = int(sliding_window) if sliding_window and sliding_window < _STEP.max_model_len else None
    cap = float(softcap) if softcap else None
    if _STEP.probe is not None:
        _STEP.probe[int(layer)] = LayerShape(k.shape[1], k.shape[2], window, cap)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2), None
    kv_cache = _STEP.kv_caches[layer]
    out = paged_attention(q.contiguous(), k, v, kv_cache, _STEP.meta, scale, window=window, softcap=cap)
    return out.view(1, q.shape[0], q.shape[1], q.shape[2]), None


AttentionInterface.register(ATTENTION_NAME, _paged_attention)


class _HiddenOnly(BaseModelOutputWithPast):
    """The base model's output as a CausalLM head reads it: the hidden states, and None for whatever else a
    family's head may look at (cross_attentions, router_logits)."""

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _GivenHidden(nn.Module):
    """Stands in for the base model inside the CausalLM's forward, so that compute_logits runs the family's
    own head (its LM head, logit soft-capping, scaling) on hidden states computed earlier."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast:
        return _HiddenOnly(last_hidden_state=self.hidden)


class TransformersCausalLM:
    """transformers' model of any causal-LM family, with the runner's model interface."""

    def __init__(self, hf_model: nn.Module, layers: dict[int, LayerShape], max_model_len: int) -> None:
        self.hf_model = hf_model
        self.max_model_len = max_model_len
        prefix = hf_model.base_model_prefix
        self.base = getattr(hf_model, prefix)
        self._given = _GivenHidden()
        setattr(hf_model, prefix, self._given)  # the base model now runs only through self.base
        self.layers = layers
        self.class_name = type(hf_model).__name__

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype, device: torch.device, max_model_len: int) -> TransformersCausalLM:
        """Load `folder` by transformers (its checkpoint name mapping included), then probe it once with a
        two-token input to learn each attention layer's KV shape, window (where shorter than
        max_model_len) and soft-cap."""
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=ATTENTION_NAME, local_files_only=True, trust_remote_code=False
        )
        hf_model = hf_model.to(device).eval()
        _STEP.probe, _STEP.max_model_len = {}, max_model_len
        try:
            with torch.inference_mode():
                hf_model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
            layers = dict(sorted(_STEP.probe.items()))
        finally:
            _STEP.probe = None
        if not layers:
            raise ValueError(f"{type(hf_model).__name__} ran no attention through the attention interface")
        shapes = {(s.num_kv_heads, s.head_dim) for s in layers.values()}
        if len(shapes) != 1:
            raise ValueError(f"attention layers of differing KV shapes {sorted(shapes)}: one KV pool cannot hold them")
        return cls(hf_model, layers, max_model_len)

    @property
    def config(self) -> PretrainedConfig:
        return self.hf_model.config

    @property
    def num_kv_heads(self) -> int:
        return next(iter(self.layers.values())).num_kv_heads

    @property
    def head_dim(self) -> int:
        return next(iter(self.layers.values())).head_dim

    @property
    def num_cache_layers(self) -> int:
        return max(self.layers) + 1

    def layer_windows(self) -> list[int | None]:
        return [s.window for s in self.layers.values()]

    def has_window_or_softcap(self) -> bool:
        """Some layer has a sliding window or attention soft-capping."""
        return any(s.window is not None or s.softcap is not None for s in self.layers.values())

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        _STEP.kv_caches, _STEP.meta, _STEP.max_model_len = kv_caches, meta, self.max_model_len
        try:
            out = self.base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _STEP.kv_caches, _STEP.meta = None, None
        return out.last_hidden_state[0]  # [num_tokens, hidden], the base model's final norm applied

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._given.hidden = hidden[None]
        try:
            dummy = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
            logits = self.hf_model(input_ids=dummy, use_cache=False, logits_to_keep=0).logits
        finally:
            self._given.hidden = None
        return logits[0]

    def forward_for(self, path: ForwardPath) -> Callable[..., torch.Tensor]:
        return self.forward

    # The runner's questions of a model, answered for transformers' modules: plain weights, no fused paths,
    # positions as transformers computes them (no per-sequence lengths in the step's metadata).
    needs_seq_lengths = False

    def quantized(self) -> bool:
        return False

    def can_run_decoder_stack(self) -> bool:
        return False

    def supports_fused_ops(self) -> bool:
        return False

    def kv_cache_dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype
