"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) written for the paged KV cache.

The module mirrors Hugging Face's LlamaForCausalLM numerically (same RMSNorm, same RoPE formula,
same projection order), so float32 greedy outputs match transformers' `generate`. Differences from
HF's module layout: q/k/v and gate/up projections are fused into one matmul each (fewer, larger
kernels), and every layer reads and writes the shared paged cache through `AttentionMetadata`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from service.engine.modeling import native_kernels
from service.engine.modeling.attention import AttentionMetadata, paged_attention
from service.engine.modeling.forward_path import ForwardPath


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN refuses bf16 inner products on a CPU without native bf16 (AVX2 only, say): there bf16 takes F.linear.
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# int8: quantized here at load (qgemm.c); q4_1 | q8_0: a GGUF file's own blocks, put in after loading by
# engine/gguf_weights.py (qgemm_gguf.c).
QUANTIZATIONS = ("none", "int8", "q4_1", "q8_0")
AnyWeight = torch.Tensor | native_kernels.PackedWeight | native_kernels.QuantizedWeight | native_kernels.GGUFWeight


def linear(x: torch.Tensor, weight: AnyWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. `weight` is plain, or `prepack`ed: for gemm.c (native_kernels.PackedWeight) or
    in oneDNN's blocked layout, or quantized for qgemm.c (native_kernels.QuantizedWeight, --quantization
    int8), or a GGUF file's blocks for qgemm_gguf.c (native_kernels.GGUFWeight, q4_1 | q8_0). On CPU a plain weight goes through oneDNN's matmul too, which on the small batches of a decode
    step runs 1.3-2x faster than the default BLAS path here; elsewhere F.linear."""
    if isinstance(weight, native_kernels.PackedWeight):
        return native_kernels.gemm_bf16(x, weight, bias)
    if isinstance(weight, native_kernels.QuantizedWeight):
        return native_kernels.qgemm_int8(x, weight, bias)
    if isinstance(weight, native_kernels.GGUFWeight):
        return native_kernels.gguf_gemm(x, weight, bias)
    if x.device.type == "cpu" and (
        (_ONEDNN and x.dtype == torch.float32) or (_ONEDNN_BF16 and x.dtype == torch.bfloat16)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_bf16() -> bool:
    return _ONEDNN_BF16 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 weights on a CPU that computes bf16 natively: worth reordering once, for gemm.c or for oneDNN
    (a decode step's matmuls then run about 2x faster here than from plain weights). float32 keeps plain
    weights: packing gains little there, and the plain path is the one held token-exact to transformers."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    return _onednn_bf16() or native_kernels.gemm_bf16_available()


def prepack(weight: torch.Tensor) -> torch.Tensor | native_kernels.PackedWeight:
    """A weight [out, in] reordered for `linear`: for gemm.c where it runs (AVX-512 BF16 without AMX),
    else in oneDNN's blocked layout (opaque; for `_linear_pointwise` only) where oneDNN computes bf16,
    else the plain weight (a shape gemm.c refuses, on a CPU without oneDNN bf16)."""
    if native_kernels.gemm_bf16_fits(weight):
        return native_kernels.pack_weight(weight)
    if _onednn_bf16():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return weight.detach()


def quantization_refusal(quantization: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `quantization` cannot run with these activations here (one line), or None when it can. int8:
    qgemm.c, on CPU, with float32 activations, the kernels loaded."""
    if quantization not in QUANTIZATIONS:
        return f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}"
    if quantization == "none":
        return None
    if device.type != "cpu":
        return f"--quantization {quantization} runs on CPU only (its kernel is C), not on {device.type}"
    if dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        return f"--quantization {quantization} computes with float32 activations, not {name}: add --dtype float32"
    if not native_kernels.qgemm_available():
        return f"--quantization {quantization} needs the C kernels, which could not be built (a C compiler, --cache-dir)"
    return None


class Linear(nn.Linear):
    # Set by LlamaForCausalLM.prepack_weights, which drops .weight.
    packed: AnyWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight if self.packed is None else self.packed, self.bias)

    def pack(self) -> None:
        self.packed = prepack(self.weight)
        del self.weight
        self.weight = None  # the packed copy replaces it: no second copy of the weights in memory

    def quantize(self) -> None:
        """int8 weights for qgemm.c in place of the float ones (--quantization int8)."""
        self.packed = native_kernels.quantize_weight(self.weight)
        del self.weight
        self.weight = None

    def use_gguf(self, weight: native_kernels.GGUFWeight) -> None:
        """A GGUF file's blocks of this weight (qgemm_gguf.c; --quantization q4_1 | q8_0) in place of the float one."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"GGUF blocks of [{weight.out_features}, {weight.in_features}] for a [{self.out_features}, "
                f"{self.in_features}] projection"
            )
        self.packed = weight
        del self.weight
        self.weight = None


class GateUpLinear(Linear):
    """An MLP's gate and up projections as one [2 * intermediate, hidden] weight. Packed for gemm.c where its
    width allows (native_kernels.silu_mul_packable), with its halves interleaved so that gemm.c computes
    silu(gate) * up in the same pass (applies_silu); the bias, if any, is then interleaved the same way."""

    def pack(self) -> None:
        if not native_kernels.silu_mul_packable(self.weight):
            super().pack()
            return
        self.packed = native_kernels.pack_weight(self.weight, silu_mul=True)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(native_kernels.interleave_gate_up(self.bias))  # in the packed weight's order
        del self.weight
        self.weight = None

    @property
    def applies_silu(self) -> bool:
        """forward returns silu(gate) * up, [..., intermediate], instead of gate and up."""
        return isinstance(self.packed, native_kernels.PackedWeight) and self.packed.silu_mul


def _cat_rows(parts: list[native_kernels.GGUFWeight]) -> native_kernels.GGUFWeight:
    """GGUF weights of one type and width stacked by rows (q/k/v, gate/up): their blocks, concatenated."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1 or len({p.in_features for p in parts}) != 1:
        widths = sorted({p.in_features for p in parts})
        raise ValueError(f"cannot fuse GGUF weights of differing types or widths: {sorted(kinds)}, {widths}")
    data = torch.cat([p.data for p in parts], dim=0)
    return native_kernels.GGUFWeight(data, parts[0].kind, sum(p.out_features for p in parts), parts[0].in_features)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's LlamaRMSNorm: normalise in float32, cast back, then scale. F.rms_norm is that formula in one
        # kernel (bit-identical in float32; tests/engine/test_exactness.py holds it to transformers).
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary positions; inv_freq comes from transformers so every rope type matches."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hf_rope = LlamaRotaryEmbedding(config)
        self.register_buffer("inv_freq", hf_rope.inv_freq.float().clone(), persistent=False)
        self.attention_scaling = float(hf_rope.attention_scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim]
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        model_type = config.model_type
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        # Qwen3 normalises q and k per head before RoPE.
        self.has_qk_norm = model_type == "qwen3"
        if self.has_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,
        sin: torch.Tensor,
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
        """The same, with RoPE and the cache write in one C call (not with a per-head q/k norm)."""
        num_tokens = hidden.shape[0]
        # .forward, not __call__: the module-call machinery is a measurable share of a small step.
        qkv = self.qkv_proj.forward(hidden)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            return self._attend(qkv, v, cos, sin, kv_cache, meta)
        q, k = native_kernels.rope_and_cache(qkv, cos, sin, kv_cache, meta.slot_mapping, self.num_heads)
        return self.o_proj.forward(paged_attention(q, k, v, kv_cache, meta, self.scale, cache_written=True))

    def _attend(
        self, qkv: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = qkv.shape[0]
        if self.has_qk_norm:
            q, k = qkv[:, : self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))
            qk = torch.cat([q, k], dim=1)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        # RoPE on q and k heads together: one set of elementwise kernels instead of two.
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        q = q.contiguous()  # [num_tokens, num_heads, head_dim]: the attention kernels read it flat
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [num_tokens, num_heads * head_dim]
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = GateUpLinear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj.applies_silu:
            return self.down_proj.forward(self.gate_up_proj.forward(x))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same, SiLU-and-multiply by the C kernel where gate/up's gemm does not apply it."""
        if self.gate_up_proj.applies_silu:
            return self.down_proj.forward(self.gate_up_proj.forward(x))
        return self.down_proj.forward(native_kernels.silu_mul(self.gate_up_proj.forward(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, cos, sin, kv_cache, meta):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # Tied embeddings: a packed copy of the embedding matrix for the head (prepack_weights).
        self.packed_head: AnyWeight | None = None
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: torch.Tensor,  # [num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """ForwardPath.TORCH and ATTENTION_KERNEL (which of the two is `meta`'s: build_metadata's use_kernel)."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, kv_caches[i], meta)
        return hidden  # [num_tokens, hidden_size], before the final norm

    def forward_fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """ForwardPath.FUSED_OPS: the same layers with each residual add fused into the norm that follows
        it, and the other elementwise ops by C kernels (bf16, or float32 with quantized weights)."""
        residual = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, residual.dtype)
        return self._layers_fused(residual, cos, sin, kv_caches, meta)

    def _layers_fused(self, residual, cos, sin, kv_caches, meta) -> torch.Tensor:
        layers = self.layers
        x = native_kernels.add_rms_norm(None, residual, layers[0].input_layernorm.weight, self.norm.eps)
        for i, layer in enumerate(layers):
            attn = layer.self_attn.forward_fused(x, cos, sin, kv_caches[i], meta)
            x = native_kernels.add_rms_norm(attn, residual, layer.post_attention_layernorm.weight, self.norm.eps)
            mlp = layer.mlp.forward_fused(x)
            if i + 1 < len(layers):
                x = native_kernels.add_rms_norm(mlp, residual, layers[i + 1].input_layernorm.weight, self.norm.eps)
            else:
                residual += mlp
        return residual

    def forward_stack(
        self,
        stack_table: torch.Tensor,
        weight_kind: int | None,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """ForwardPath.DECODER_STACK: every layer in one call to decoder.c, whose kernels and their order
        are FUSED_OPS's; a step whose attention plan it cannot take (any not on the C kernel) runs those."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, hidden.dtype)
        if meta.kernel is None or meta.fresh_prefills or meta.groups:
            return self._layers_fused(hidden, cos, sin, kv_caches, meta)
        attn = self.layers[0].self_attn
        native_kernels.decoder_stack(
            hidden, stack_table, weight_kind, cos, sin, meta.slot_mapping, kv_caches, meta.kernel, attn.num_heads,
            self.layers[0].mlp.intermediate_size, self.layers[0].mlp.gate_up_proj.applies_silu, self.norm.eps,
            attn.scale,
        )  # fmt: skip
        return hidden

    def forward_for(self, path: ForwardPath) -> Callable[..., torch.Tensor]:
        """The forward that runs `path`: (input_ids, positions, kv_caches, meta) -> hidden states."""
        if path is ForwardPath.DECODER_STACK:
            layers = self._stack_layers()
            table, kind = native_kernels.layer_table(layers), native_kernels.stack_weight_kind(layers)
            return functools.partial(self.forward_stack, table, kind)
        if path is ForwardPath.FUSED_OPS:
            return self.forward_fused
        return self.forward

    def quantized(self) -> bool:
        """The decoder's projections are quantized (--quantization int8, q4_1 or q8_0): float32 activations
        with qgemm.c's or qgemm_gguf.c's weights."""
        packed = self.layers[0].self_attn.qkv_proj.packed
        return isinstance(packed, (native_kernels.QuantizedWeight, native_kernels.GGUFWeight))

    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: bf16 where the projections are quantized (float32 activations over a bf16
        cache, half float32's bytes: paged_attention.c's attention_f32_bf16kv_team), else the model's."""
        return torch.bfloat16 if self.quantized() else self.embed_tokens.weight.dtype

    def can_run_decoder_stack(self) -> bool:
        """decoder.c takes this model: no per-head q/k norm (Qwen3), and either every projection packed for
        gemm.c with attention heads of 64 or 128 (its bf16 kernel's sizes), or every decoder projection
        quantized, all of one kind (decoder_stack_f32q; any head size)."""
        attn = self.layers[0].self_attn
        if attn.has_qk_norm or native_kernels.library() is None:
            return False
        if self.quantized():
            try:
                native_kernels.stack_weight_kind(self._stack_layers())
            except ValueError:
                return False
            return True
        projections = [m for m in self.modules() if isinstance(m, Linear)]
        return (
            native_kernels.gemm_bf16_available()
            and attn.head_dim in (64, 128)
            and all(isinstance(m.packed, native_kernels.PackedWeight) for m in projections)
        )

    def _stack_layers(self) -> list[native_kernels.LayerWeights]:
        """Each layer's tensors for native_kernels.layer_table (the packed or quantized weights)."""
        return [
            native_kernels.LayerWeights.of(
                qkv=(layer.self_attn.qkv_proj.packed, layer.self_attn.qkv_proj.bias),
                o=(layer.self_attn.o_proj.packed, layer.self_attn.o_proj.bias),
                gate_up=(layer.mlp.gate_up_proj.packed, layer.mlp.gate_up_proj.bias),
                down=(layer.mlp.down_proj.packed, layer.mlp.down_proj.bias),
                input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
            )
            for layer in self.layers
        ]  # fmt: skip

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, vocab_size] logits: float32 straight from gemm.c's sums where it computes the head,
        else in the model's dtype."""
        hidden = self.norm(hidden)
        if not self.tie_word_embeddings:
            head = self.lm_head.weight if self.lm_head.packed is None else self.lm_head.packed
        else:
            head = self.embed_tokens.weight if self.packed_head is None else self.packed_head
        if isinstance(head, native_kernels.PackedWeight):
            return native_kernels.gemm_bf16(hidden, head, out_dtype=torch.float32)
        return linear(hidden, head)

    def prepack_weights(self, quantization: str = "none") -> str | None:
        """Reorder every projection for the fast matmul where that pays (`can_prepack`); after loading.
        Returns what the weights were packed for ("gemm.c" or "oneDNN"), None when left plain.

        quantization "int8": every projection of the decoder and the LM head (a tied one as an int8 copy;
        the embedding lookup stays float) quantized for qgemm.c instead; "q4_1" | "q8_0": nothing packed
        (use_gguf_weights follows). Raises ValueError where the mode cannot run (quantization_refusal; the
        server's preflight says so before the weights are read)."""
        weight = self.embed_tokens.weight
        if quantization != "none":
            refusal = quantization_refusal(quantization, weight.dtype, weight.device)
            if refusal is not None:
                raise ValueError(refusal)
            if quantization != "int8":
                return None  # the GGUF blocks replace the float weights next (use_gguf_weights)
            for module in self.modules():
                if isinstance(module, Linear):
                    module.quantize()
            if self.tie_word_embeddings:
                # The head is the largest single matrix (a fifth of SmolLM2-135M's bytes), read every step.
                self.packed_head = native_kernels.quantize_weight(weight)
            return f"int8, qgemm.c {native_kernels.qgemm_isa()}"
        if not can_prepack(weight.dtype, weight.device):
            return None
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.tie_word_embeddings:
            self.packed_head = prepack(weight)
        return "gemm.c" if native_kernels.gemm_bf16_fits(weight) else "oneDNN"

    def use_gguf_weights(
        self, weights: dict[str, native_kernels.GGUFWeight], head: native_kernels.GGUFWeight | None
    ) -> str:
        """--quantization q4_1 | q8_0, after load_hf_weights: every projection of the decoder as a GGUF file's
        blocks (`weights`, by Hugging Face name, fused here as load_hf_weights fuses the float ones), and the
        LM head too where `head` is given (a tied head keeps the float embedding for the lookup). Returns
        what the weights are now, for the runner's log line."""
        for i, layer in enumerate(self.layers):
            src = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj.use_gguf(_cat_rows([weights[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]))
            attn.o_proj.use_gguf(weights[f"{src}self_attn.o_proj.weight"])
            mlp.gate_up_proj.use_gguf(_cat_rows([weights[f"{src}mlp.{p}_proj.weight"] for p in ("gate", "up")]))
            mlp.down_proj.use_gguf(weights[f"{src}mlp.down_proj.weight"])
        if head is not None:
            if self.tie_word_embeddings:
                if (head.out_features, head.in_features) != tuple(self.embed_tokens.weight.shape):
                    raise ValueError(f"GGUF head blocks of [{head.out_features}, {head.in_features}] for a tied head")
                self.packed_head = head
            else:
                self.lm_head.use_gguf(head)
        head_text = f"head {head.kind}" if head is not None else "head float"
        return f"GGUF {weights[next(iter(weights))].kind} blocks ({head_text}), qgemm_gguf.c {native_kernels.gguf_isa()}"

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy an HF state dict in, fusing q/k/v and gate/up. Raises KeyError naming a missing tensor."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(name)
            return weights[name]

        put("embed_tokens.weight", take("model.embed_tokens.weight"))
        put("norm.weight", take("model.norm.weight"))
        if not self.tie_word_embeddings:
            put("lm_head.weight", take("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            src = f"model.layers.{i}."
            dst = f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                put(f"{dst}{norm}.weight", take(f"{src}{norm}.weight"))
            attn = layer.self_attn
            qkv = [take(f"{src}self_attn.{p}_proj.weight") for p in "qkv"]
            put(f"{dst}self_attn.qkv_proj.weight", torch.cat(qkv, dim=0))
            if attn.qkv_proj.bias is not None:
                put(f"{dst}self_attn.qkv_proj.bias", torch.cat([take(f"{src}self_attn.{p}_proj.bias") for p in "qkv"]))
            put(f"{dst}self_attn.o_proj.weight", take(f"{src}self_attn.o_proj.weight"))
            if attn.o_proj.bias is not None:
                put(f"{dst}self_attn.o_proj.bias", take(f"{src}self_attn.o_proj.bias"))
            if attn.has_qk_norm:
                put(f"{dst}self_attn.q_norm.weight", take(f"{src}self_attn.q_norm.weight"))
                put(f"{dst}self_attn.k_norm.weight", take(f"{src}self_attn.k_norm.weight"))
            gate_up = [take(f"{src}mlp.{p}_proj.weight") for p in ("gate", "up")]
            put(f"{dst}mlp.gate_up_proj.weight", torch.cat(gate_up, dim=0))
            put(f"{dst}mlp.down_proj.weight", take(f"{src}mlp.down_proj.weight"))
            if layer.mlp.down_proj.bias is not None:
                put(f"{dst}mlp.gate_up_proj.bias", torch.cat([take(f"{src}mlp.{p}_proj.bias") for p in ("gate", "up")]))
                put(f"{dst}mlp.down_proj.bias", take(f"{src}mlp.down_proj.bias"))
        missing = set(own) - loaded
        assert not missing, f"parameters left unloaded: {sorted(missing)[:5]}"
