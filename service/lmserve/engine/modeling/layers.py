"""The building blocks of lmserve's decoder models: projections (plain, prepacked for gemm.c or oneDNN,
int8 for qgemm.c (float32 activations) or qgemm_vnni.c (bf16 ones), a GGUF file's blocks for qgemm_gguf.c),
norms, rotary positions.

Each block mirrors its Hugging Face counterpart numerically (same formula, same order of casts), so that
float32 greedy outputs match transformers' `generate` (tests/engine/test_exactness.py, tests/engine/test_families.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from lmserve.engine.modeling import gemm, qgemm, qgemm_gguf, qgemm_vnni
from lmserve.engine.modeling.lora import LoraLinear
from lmserve.engine.modeling.qgemm_vnni import VNNIWeight

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN refuses bf16 inner products on a CPU without native bf16 (AVX2 only, say): there bf16 takes F.linear.
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# int8: quantized here at load (qgemm.c, or qgemm_vnni.c under bf16 activations); q4_1 | q8_0: a GGUF file's own blocks, put in after loading by
# engine/gguf_weights.py (qgemm_gguf.c).
QUANTIZATIONS = ("none", "int8", "q4_1", "q8_0")
AnyWeight = (
    torch.Tensor | gemm.PackedWeight | qgemm.QuantizedWeight | VNNIWeight | qgemm_gguf.GGUFWeight
)


def linear(x: torch.Tensor, weight: AnyWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. `weight` is plain, or `prepack`ed: for gemm.c (gemm.PackedWeight) or
    in oneDNN's blocked layout, or quantized (--quantization int8) for qgemm.c (qgemm.QuantizedWeight,
    float32 x) or qgemm_vnni.c (VNNIWeight, bf16 x), or a GGUF file's blocks for qgemm_gguf.c (qgemm_gguf.GGUFWeight, q4_1 | q8_0). On CPU a plain weight goes through oneDNN's matmul too, which on the small batches of a decode
    step runs 1.3-2x faster than the default BLAS path here; elsewhere F.linear."""
    if isinstance(weight, gemm.PackedWeight):
        return gemm.gemm_bf16(x, weight, bias)
    if isinstance(weight, qgemm.QuantizedWeight):
        return qgemm.qgemm_int8(x, weight, bias)
    if isinstance(weight, VNNIWeight):
        return qgemm_vnni.qgemm_vnni(x, weight, bias)
    if isinstance(weight, qgemm_gguf.GGUFWeight):
        return qgemm_gguf.gguf_gemm(x, weight, bias)
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
    return _onednn_bf16() or gemm.gemm_bf16_available()


def prepack(weight: torch.Tensor) -> torch.Tensor | gemm.PackedWeight:
    """A weight [out, in] reordered for `linear`: for gemm.c where it runs (AVX-512 BF16 without AMX),
    else in oneDNN's blocked layout (opaque; for `_linear_pointwise` only) where oneDNN computes bf16,
    else the plain weight (a shape gemm.c refuses, on a CPU without oneDNN bf16)."""
    if gemm.gemm_bf16_fits(weight):
        return gemm.pack_weight(weight)
    if _onednn_bf16():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return weight.detach()


def quantization_refusal(quantization: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `quantization` cannot run with these activations here (one line), or None when it can. On CPU, the
    kernels loaded; float32 activations (qgemm.c, qgemm_gguf.c), or for int8 bf16 ones where the CPU has
    AVX-512 VNNI and BF16 (qgemm_vnni.c)."""
    if quantization not in QUANTIZATIONS:
        return f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}"
    if quantization == "none":
        return None
    if device.type != "cpu":
        return f"--quantization {quantization} runs on CPU only (its kernel is C), not on {device.type}"
    if not qgemm.qgemm_available():
        return f"--quantization {quantization} needs the C kernels, which could not be built (a C compiler, --cache-dir)"
    if dtype == torch.float32 or (quantization == "int8" and dtype == torch.bfloat16 and qgemm_vnni.available()):
        return None
    name = str(dtype).removeprefix("torch.")
    if quantization == "int8" and dtype == torch.bfloat16:
        return "--quantization int8 with bfloat16 activations needs a CPU with AVX-512 VNNI and BF16: add --dtype float32"
    return f"--quantization {quantization} computes with float32 activations, not {name}: add --dtype float32"


class Linear(nn.Linear):
    # Set by DecoderModel.prepack_weights, which drops .weight.
    packed: AnyWeight | None = None
    # Set by ModelLoras when a resident LoRA adapter targets this projection (lora.py): each row's update is
    # added to the base output.
    lora: LoraLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight if self.packed is None else self.packed, self.bias)
        return y if self.lora is None else self.lora.add_to(y, x)

    def pack(self) -> None:
        self.packed = prepack(self.weight)
        del self.weight
        self.weight = None  # the packed copy replaces it: no second copy of the weights in memory

    def quantize(self) -> None:
        """int8 weights in place of the float ones (--quantization int8): for qgemm_vnni.c where the weights
        (the activations' dtype) are bf16, else for qgemm.c."""
        if self.weight.dtype == torch.bfloat16:
            self.packed = qgemm_vnni.pack_vnni(self.weight)
        else:
            self.packed = qgemm.quantize_weight(self.weight)
        del self.weight
        self.weight = None

    def use_gguf(self, weight: qgemm_gguf.GGUFWeight) -> None:
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
    width allows (gemm.silu_mul_packable), with its halves interleaved so that gemm.c computes
    silu(gate) * up in the same pass (applies_silu); the bias, if any, is then interleaved the same way."""

    # gemm.c / qgemm_vnni.c may apply SiLU-and-multiply in their pass: the MLP's activation is SiLU, and no
    # LoRA update has to be added to gate/up before it (False otherwise).
    fuse_silu = True

    def pack(self) -> None:
        if not self.fuse_silu or not gemm.silu_mul_packable(self.weight):
            super().pack()
            return
        self.packed = gemm.pack_weight(self.weight, silu_mul=True)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(gemm.interleave_gate_up(self.bias))  # in the packed weight's order
        del self.weight
        self.weight = None

    def quantize(self) -> None:
        """As Linear's, with qgemm_vnni.c's weights packed for SiLU-and-multiply where they can be."""
        if not (self.fuse_silu and self.weight.dtype == torch.bfloat16 and qgemm_vnni.silu_mul_packable(self.weight)):
            super().quantize()
            return
        self.packed = qgemm_vnni.pack_vnni(self.weight, silu_mul=True)  # the bias keeps its order
        del self.weight
        self.weight = None

    @property
    def applies_silu(self) -> bool:
        """forward returns silu(gate) * up, [..., intermediate], instead of gate and up."""
        return isinstance(self.packed, (gemm.PackedWeight, VNNIWeight)) and self.packed.silu_mul


def cat_rows(parts: list[qgemm_gguf.GGUFWeight]) -> qgemm_gguf.GGUFWeight:
    """GGUF weights of one type and width stacked by rows (q/k/v, gate/up): their blocks, concatenated."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1 or len({p.in_features for p in parts}) != 1:
        widths = sorted({p.in_features for p in parts})
        raise ValueError(f"cannot fuse GGUF weights of differing types or widths: {sorted(kinds)}, {widths}")
    data = torch.cat([p.data for p in parts], dim=0)
    return qgemm_gguf.GGUFWeight(data, parts[0].kind, sum(p.out_features for p in parts), parts[0].in_features)


class RMSNorm(nn.Module):
    """RMSNorm in one of transformers' three orders of casts and scale:
    "llama": normalise in float32, cast back, then scale (LlamaRMSNorm and most families);
    "gemma": scale by (1 + weight) in float32, then cast (GemmaRMSNorm; the weight is stored minus one);
    "olmo2": scale in float32, then cast (Olmo2RMSNorm).
    All three are the same arithmetic in float32; they differ in bf16."""

    def __init__(self, size: int, eps: float, kind: str = "llama") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is the formula in one kernel (bit-identical in float32 to transformers' modules).
        if self.kind == "gemma":
            return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).to(x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if self.kind == "olmo2":
            return (self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps)).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with a bias (GPT-2, StarCoder2): nn.LayerNorm, as transformers uses it."""


def make_norm(kind: str, size: int, eps: float) -> nn.Module:
    return LayerNorm(size, eps=eps) if kind == "layer" else RMSNorm(size, eps, kind)


def _rotary_class(config: PretrainedConfig) -> type[nn.Module]:
    """The family's own rotary-embedding class in transformers (its rope types and per-layer-type bases)."""
    import sys

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    module = sys.modules[getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]).__module__]
    found = [v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and isinstance(v, type)]
    if len(found) != 1:
        raise ValueError(f"{module.__name__} has {len(found)} rotary-embedding classes, not one")
    return found[0]


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary positions, from tables of every position below max_len computed once (float32),
    so that a token's values never depend on what else is in the step (a vectorised cos over a step's
    tensor rounds its tail elements differently). inv_freq and the attention scaling come from the family's
    own transformers class, so every rope type (linear, llama3, yarn, longrope, dynamic, per-layer-type
    bases) matches. Dynamic NTK changes nothing below max_position_embeddings, which bounds every sequence
    here. Longrope takes its long factors for a sequence longer than the original length: chosen per token
    from its sequence's length at this step, as transformers chooses them for the one sequence it generates."""

    def __init__(self, config: PretrainedConfig, layer_type: str | None = None, max_len: int | None = None) -> None:
        super().__init__()
        hf_rope = _rotary_class(config)(config)
        prefix = f"{layer_type}_" if layer_type and hasattr(hf_rope, f"{layer_type}_inv_freq") else ""
        inv_freq = getattr(hf_rope, f"{prefix}inv_freq").float()
        scaling = float(getattr(hf_rope, f"{prefix}attention_scaling"))
        rope_type = hf_rope.rope_type
        params = config.rope_parameters if hasattr(config, "rope_parameters") else {}
        if prefix:
            rope_type, params = rope_type.get(layer_type, "default"), params[layer_type]
        max_len = max_len or int(config.max_position_embeddings)
        self.cos, self.sin = self._table(inv_freq, scaling, max_len)
        self.long: tuple[torch.Tensor, torch.Tensor] | None = None
        self.original_max = 0
        if rope_type == "longrope":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self.original_max = int(params["original_max_position_embeddings"])
            long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](
                config, None, seq_len=self.original_max + 1, **({"layer_type": layer_type} if prefix else {})
            )
            self.long = self._table(long_inv.float(), scaling, max_len)

    @staticmethod
    def _table(inv_freq: torch.Tensor, scaling: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, rotary_dim], as transformers lays it out
        return emb.cos() * scaling, emb.sin() * scaling

    @property
    def length_dependent(self) -> bool:
        return self.long is not None

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens] -> cos, sin: [num_tokens, 1, rotary_dim]
        cos, sin = self.cos[positions], self.sin[positions]
        if self.long is not None and seq_lengths is not None:
            long = (seq_lengths > self.original_max)[:, None]
            cos = torch.where(long, self.long[0][positions], cos)
            sin = torch.where(long, self.long[1][positions], sin)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


