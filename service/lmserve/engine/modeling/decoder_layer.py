"""One decoder layer of lmserve's model (decoder.py), for every family with a spec (families.py): attention
then an MLP (dense, or a mixture of experts), each with the norms its family's spec names around it. Each
module has the torch path (`forward`) and, where fused C ops apply, `forward_fused`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from lmserve.engine.modeling import fused_ops
from lmserve.engine.modeling.attention import AttentionMetadata, paged_attention
from lmserve.engine.modeling.families import FamilySpec, Settings
from lmserve.engine.modeling.layers import GateUpLinear, Linear, linear, make_norm, rotate_half


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (all of them unless the rotary factor is partial)."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: Settings, spec: FamilySpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = s.attention_scales[layer_idx]
        self.window = s.windows[layer_idx]
        self.softcap = s.attn_softcap
        self.qkv_proj = Linear(s.hidden_size, self.q_size + 2 * self.kv_size, bias=s.qkv_bias)
        self.o_proj = Linear(self.q_size, s.hidden_size, bias=s.o_bias)
        self.qk_norm = spec.qk_norm
        self.has_qk_norm = spec.qk_norm is not None
        if spec.qk_norm is not None:
            per_head = spec.qk_norm == "head"
            self.q_norm = make_norm(spec.norm, self.head_dim if per_head else self.q_size, s.norm_eps)
            self.k_norm = make_norm(spec.norm, self.head_dim if per_head else self.kv_size, s.norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor | None,  # [num_tokens, 1, rotary_dim]; None without rotary positions
        sin: torch.Tensor | None,
        kv_cache: torch.Tensor,  # [2, num_kv_heads, num_blocks, block_size, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj.forward(hidden)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        return self._attend(qkv, v, cos, sin, kv_cache, meta)

    def forward_fused(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The same, with RoPE and the cache write in one C call (not with a q/k norm)."""
        num_tokens = hidden.shape[0]
        # .forward, not __call__: the module-call machinery is a measurable share of a small step.
        qkv = self.qkv_proj.forward(hidden)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            return self._attend(qkv, v, cos, sin, kv_cache, meta)
        q, k = fused_ops.rope_and_cache(qkv, cos, sin, kv_cache, meta.slot_mapping, self.num_heads)
        out = paged_attention(
            q, k, v, kv_cache, meta, self.scale, cache_written=True, window=self.window, softcap=self.softcap
        )
        return self.o_proj.forward(out)

    def _attend(
        self, qkv: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
        kv_cache: torch.Tensor, meta: AttentionMetadata,
    ) -> torch.Tensor:  # fmt: skip
        num_tokens = qkv.shape[0]
        if self.has_qk_norm:
            q, k = qkv[:, : self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            if self.qk_norm == "full":  # over all heads at once, before the split into heads (OLMo 2)
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.reshape(num_tokens, self.num_heads, self.head_dim)
            k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            qk = torch.cat([q, k], dim=1)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if cos is not None:  # RoPE on q and k heads together: one set of elementwise kernels instead of two
            qk = apply_rope(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        q = q.contiguous()  # [num_tokens, num_heads, head_dim]: the attention kernels read it flat
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, window=self.window, softcap=self.softcap)
        return self.o_proj(out)  # out: [num_tokens, num_heads * head_dim]


class MLP(nn.Module):
    """Gated (down(act(gate) * up), gate and up as one matmul) or plain (down(act(up)), GPT-2 and StarCoder2)."""

    def __init__(self, s: Settings, gated: bool, intermediate_size: int | None = None) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size or s.intermediate_size
        self.gated = gated
        self.act = ACT2FN[s.activation]
        if gated:
            self.gate_up_proj = GateUpLinear(s.hidden_size, 2 * self.intermediate_size, bias=s.mlp_bias)
            self.gate_up_proj.fuse_silu = s.activation in ("silu", "swish")
        else:
            self.up_proj = Linear(s.hidden_size, self.intermediate_size, bias=s.mlp_bias)
        self.down_proj = Linear(self.intermediate_size, s.hidden_size, bias=s.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act(self.up_proj(x)))
        if self.gate_up_proj.applies_silu:
            return self.down_proj.forward(self.gate_up_proj.forward(x))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same, SiLU-and-multiply by the C kernel where gate/up's gemm does not apply it (SiLU only)."""
        if self.gate_up_proj.applies_silu:
            return self.down_proj.forward(self.gate_up_proj.forward(x))
        return self.down_proj.forward(fused_ops.silu_mul(self.gate_up_proj.forward(x)))


class MoE(nn.Module):
    """A mixture of experts (Mixtral, Qwen3-MoE): a router picks each token's top-k experts; each expert runs
    one matmul over all the tokens routed to it (grouped by a sort, not one matmul per token), and the
    results are added back weighted by the router, in expert order as transformers adds them."""

    def __init__(self, s: Settings, model_type: str) -> None:
        super().__init__()
        self.top_k = s.experts_per_token
        self.normalize = s.normalize_top_k
        self.weights_in_dtype = model_type != "mixtral"  # Qwen3-MoE casts the routing weights; Mixtral keeps float32
        self.router = Linear(s.hidden_size, s.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(s, gated=True, intermediate_size=s.moe_intermediate_size) for _ in range(s.num_experts))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path's call: each expert's own gated MLP (gemm.c applies SiLU where packed for it)."""
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.router.weight if self.router.packed is None else self.router.packed)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(probs, self.top_k, dim=-1)  # [num_tokens, top_k]
        if self.normalize:
            top_weights /= top_weights.sum(dim=-1, keepdim=True)
        if self.weights_in_dtype:
            top_weights = top_weights.to(logits.dtype)
        flat = top_experts.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = order // self.top_k
        routed = x[tokens]  # one gather: each expert's tokens are a contiguous run
        ys = []
        start = 0
        for expert, count in enumerate(counts):
            if count:
                ys.append(self.experts[expert](routed[start : start + count]))
                start += count
        y = torch.cat(ys) * top_weights.view(-1)[order, None]
        # One scatter-add, in the pairs' order: a token's contributions land in ascending expert order, as
        # transformers adds them one expert at a time.
        return torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, s: Settings, spec: FamilySpec, layer_idx: int, model_type: str) -> None:
        super().__init__()
        for name in spec.norms:
            setattr(self, name, make_norm(spec.norm, s.hidden_size, s.norm_eps))
        self.norm_names = spec.norms
        self.self_attn = Attention(s, spec, layer_idx)
        if s.moe_layers and s.moe_layers[layer_idx]:
            self.mlp: nn.Module = MoE(s, model_type)
        else:
            self.mlp = MLP(s, gated=spec.mlp != "plain")
        self.residual_multiplier = s.residual_multiplier
        self.rotary_key = s.layer_types[layer_idx]

    def forward(self, hidden, cos, sin, kv_cache, meta):
        names = self.norm_names
        x = self.attn_norm(hidden) if "attn_norm" in names else hidden
        out = self.self_attn(x, cos, sin, kv_cache, meta)
        if "attn_post_norm" in names:
            out = self.attn_post_norm(out)
        hidden = hidden + out if self.residual_multiplier == 1.0 else hidden + out * self.residual_multiplier
        x = self.mlp_norm(hidden) if "mlp_norm" in names else hidden
        out = self.mlp(x)
        if "mlp_post_norm" in names:
            out = self.mlp_post_norm(out)
        return hidden + out if self.residual_multiplier == 1.0 else hidden + out * self.residual_multiplier
