"""lmserve's own decoder model, for every family with a spec (families.py), written for the paged KV cache.

One model definition: a layer (decoder_layer.py) is attention then an MLP (dense, or a mixture of experts),
each with the norms its family's spec names around it, and the numbers its config sets (families.Settings). The model
mirrors the family's transformers module numerically (same norms, same RoPE formula, same projection
order), so float32 greedy outputs match transformers' `generate`. Differences from transformers' layout:
q/k/v and gate/up are fused into one matmul each, and every layer reads and writes the shared paged cache
through `AttentionMetadata`.

Forward paths (forward_path.py): torch ops for every family; for Llama-shaped layers (pre-norm RMSNorm,
SiLU-gated MLP, full RoPE, nothing a config adds: the Llama, Mistral, Qwen2/3 and Phi-3 checkpoints
people run) also the fused C elementwise ops and decoder.c's one call per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from lmserve.engine.modeling import fused_ops, gemm, kernel_loader, layer_stack, qgemm, qgemm_gguf
from lmserve.engine.modeling.attention import AttentionMetadata
from lmserve.engine.modeling.decoder_layer import MLP, DecoderLayer, MoE
from lmserve.engine.modeling.families import SPECS, Source, Transposed, settings
from lmserve.engine.modeling.forward_path import ForwardPath
from lmserve.engine.modeling.lora import LoraTarget, ModelLoras
from lmserve.engine.modeling.qgemm_vnni import VNNIWeight, pack_vnni, qgemm_vnni
from lmserve.engine.modeling.layers import (
    AnyWeight,
    Linear,
    RotaryEmbedding,
    can_prepack,
    cat_rows,
    linear,
    make_norm,
    prepack,
    quantization_refusal,
)


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_model_len: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.spec = SPECS[config.model_type]
        self.settings = s = settings(config, max_model_len)
        self.embed_tokens = nn.Embedding(config.vocab_size, s.hidden_size)
        if self.spec.learned_positions:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s, self.spec, i, config.model_type) for i in range(s.num_layers))
        self.norm = make_norm(self.spec.norm, s.hidden_size, s.norm_eps)
        self.tie_word_embeddings = s.tie_word_embeddings
        # Tied embeddings: a packed copy of the embedding matrix for the head (prepack_weights).
        self.packed_head: AnyWeight | None = None
        if not self.tie_word_embeddings:
            self.lm_head = Linear(s.hidden_size, config.vocab_size, bias=False)
        self.rotaries: dict[str | None, RotaryEmbedding] = {}  # by layer type; init_positions builds them
        self.loras: ModelLoras | None = None  # per-request LoRA adapters (enable_lora)
        self.max_len = max_model_len or int(config.max_position_embeddings)

    def init_positions(self, device: torch.device) -> None:
        """Build the rotary tables (float32, outside the model's dtype and its meta-device construction)."""
        if self.spec.learned_positions:
            return
        with torch.device(device):
            self.rotaries = {
                key: RotaryEmbedding(self.config, key, self.max_len) for key in dict.fromkeys(self.settings.layer_types)
            }

    @property
    def needs_seq_lengths(self) -> bool:
        """The rotary tables depend on each sequence's length (longrope): the step's metadata carries them."""
        return any(r.length_dependent for r in self.rotaries.values())

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        s = self.settings
        if s.embed_scale is not None:
            if self.config.model_type.startswith("gemma"):  # Gemma: the scale rounded to the model's dtype first
                hidden = hidden * torch.tensor(s.embed_scale, dtype=hidden.dtype)
            else:
                hidden = hidden * s.embed_scale
        if self.spec.learned_positions:
            hidden = hidden + self.embed_positions(positions)
        return hidden

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype, meta: AttentionMetadata) -> dict:
        return {key: rot(positions, dtype, meta.seq_lengths) for key, rot in self.rotaries.items()}

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: torch.Tensor,  # [num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """ForwardPath.TORCH and ATTENTION_KERNEL (which of the two is `meta`'s: build_metadata's use_kernel)."""
        hidden = self._embed(input_ids, positions)
        rope = self._rope(positions, hidden.dtype, meta)
        for i, layer in enumerate(self.layers):
            cos, sin = rope.get(layer.rotary_key, (None, None))
            hidden = layer(hidden, cos, sin, kv_caches[i], meta)
        return hidden  # [num_tokens, hidden_size], before the final norm

    def forward_fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """ForwardPath.FUSED_OPS: the same layers with each residual add fused into the norm that follows
        it, and the other elementwise ops by C kernels (bf16, or float32 with quantized weights)."""
        residual = self.embed_tokens(input_ids)
        (cos, sin), = self._rope(positions, residual.dtype, meta).values()
        return self._layers_fused(residual, cos, sin, kv_caches, meta)

    def _layers_fused(self, residual, cos, sin, kv_caches, meta) -> torch.Tensor:
        layers = self.layers
        eps = self.settings.norm_eps
        x = fused_ops.add_rms_norm(None, residual, layers[0].attn_norm.weight, eps)
        for i, layer in enumerate(layers):
            attn = layer.self_attn.forward_fused(x, cos, sin, kv_caches[i], meta)
            x = fused_ops.add_rms_norm(attn, residual, layer.mlp_norm.weight, eps)
            mlp = layer.mlp.forward_fused(x)
            if i + 1 < len(layers):
                x = fused_ops.add_rms_norm(mlp, residual, layers[i + 1].attn_norm.weight, eps)
            else:
                residual += mlp
        return residual

    def forward_stack(
        self,
        stack_table: torch.Tensor,
        weight_kind: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """ForwardPath.DECODER_STACK: every layer in one call to decoder.c, whose kernels and their order
        are FUSED_OPS's; a step whose attention plan it cannot take (any not on the C kernel) runs those."""
        hidden = self.embed_tokens(input_ids)
        (cos, sin), = self._rope(positions, hidden.dtype, meta).values()
        if meta.kernel is None or meta.fresh_prefills or meta.groups:
            return self._layers_fused(hidden, cos, sin, kv_caches, meta)
        attn = self.layers[0].self_attn
        lora = None if self.loras is None else self.loras.stack_args(self._lora_projections())
        layer_stack.decoder_stack(
            hidden, stack_table, weight_kind, cos, sin, meta.slot_mapping, kv_caches, meta.kernel, attn.num_heads,
            self.layers[0].mlp.intermediate_size, self.layers[0].mlp.gate_up_proj.applies_silu, self.settings.norm_eps,
            attn.scale, lora,
        )  # fmt: skip
        return hidden

    def _lora_projections(self) -> list[tuple[nn.Module, ...]]:
        """Per layer, the projections decoder.c's LoRA table covers, in its order."""
        return [
            (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for layer in self.layers
        ]

    def forward_for(self, path: ForwardPath) -> Callable[..., torch.Tensor]:
        """The forward that runs `path`: (input_ids, positions, kv_caches, meta) -> hidden states."""
        if path is ForwardPath.DECODER_STACK:
            layers = self._stack_layers()
            table, kind = layer_stack.layer_table(layers), layer_stack.stack_weight_kind(layers)
            return functools.partial(self.forward_stack, table, kind)
        if path is ForwardPath.FUSED_OPS:
            return self.forward_fused
        return self.forward

    def layer_windows(self) -> list[int | None]:
        return list(self.settings.windows)

    def has_window_or_softcap(self) -> bool:
        """A sliding window shorter than the model length, or attention soft-capping, in some layer."""
        return any(w is not None for w in self.settings.windows) or self.settings.attn_softcap is not None

    def supports_fused_ops(self) -> bool:
        """Llama-shaped layers with nothing a config adds, SiLU, one rotary table: the fused C paths compute them."""
        s = self.settings
        return (
            self.spec.llama_shaped and s.plain_llama and s.activation in ("silu", "swish") and len(self.rotaries) == 1
        )

    def quantized(self) -> bool:
        """The decoder's projections are quantized (--quantization int8, q4_1 or q8_0): int8 under bf16
        activations (qgemm_vnni.c), or float32 activations with qgemm.c's or qgemm_gguf.c's weights."""
        packed = self.layers[0].self_attn.qkv_proj.packed
        return isinstance(packed, (qgemm.QuantizedWeight, VNNIWeight, qgemm_gguf.GGUFWeight))

    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: bf16 where the projections are quantized (under float32 activations half
        float32's bytes: paged_attention.c's attention_f32_bf16kv_team), else the model's."""
        return torch.bfloat16 if self.quantized() else self.embed_tokens.weight.dtype

    def stack_runs_loras(self) -> bool:
        """decoder.c adds the adapters' updates itself (bf16 with gemm.c's LoRA kernel)."""
        return self.loras is not None and self.loras.ctx.use_kernel

    def can_run_decoder_stack(self) -> bool:
        """decoder.c takes this model: fused ops apply, no per-head q/k norm (Qwen3), and either every projection
        packed for gemm.c or quantized for qgemm_vnni.c (bf16 activations) with attention heads of 64 or 128
        (its bf16 kernel's sizes), or every decoder projection quantized under float32 activations, all of one
        kind (decoder_stack_f32q; any head size)."""
        attn = self.layers[0].self_attn
        if not self.supports_fused_ops() or attn.has_qk_norm or self.has_window_or_softcap():
            return False  # decoder.c's attention has no window or soft-cap
        if any(self.settings.moe_layers):
            return False  # decoder.c's MLP is dense
        if kernel_loader.library() is None:
            return False
        try:
            kind = layer_stack.stack_weight_kind(self._stack_layers())
        except ValueError:
            return False
        if self.embed_tokens.weight.dtype == torch.float32:
            return kind != layer_stack.WEIGHT_BF16
        return (
            gemm.gemm_bf16_available()
            and attn.head_dim in (64, 128)
            and kind in (layer_stack.WEIGHT_BF16, layer_stack.WEIGHT_INT8)
        )

    def _stack_layers(self) -> list[layer_stack.LayerWeights]:
        """Each layer's tensors for layer_stack.layer_table (the packed or quantized weights)."""
        return [
            layer_stack.LayerWeights.of(
                qkv=(layer.self_attn.qkv_proj.packed, layer.self_attn.qkv_proj.bias),
                o=(layer.self_attn.o_proj.packed, layer.self_attn.o_proj.bias),
                gate_up=(layer.mlp.gate_up_proj.packed, layer.mlp.gate_up_proj.bias),
                down=(layer.mlp.down_proj.packed, layer.mlp.down_proj.bias),
                input_norm=layer.attn_norm.weight, post_norm=layer.mlp_norm.weight,
            )
            for layer in self.layers
        ]  # fmt: skip

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, vocab_size] logits, the family's final scaling and soft-capping applied: float32
        straight from gemm.c's sums where it computes the head, else in the model's dtype."""
        hidden = self.norm(hidden)
        if not self.tie_word_embeddings:
            head = self.lm_head.weight if self.lm_head.packed is None else self.lm_head.packed
        else:
            head = self.embed_tokens.weight if self.packed_head is None else self.packed_head
        if isinstance(head, gemm.PackedWeight):
            logits = gemm.gemm_bf16(hidden, head, out_dtype=torch.float32)
        elif isinstance(head, VNNIWeight):
            logits = qgemm_vnni(hidden, head, out_dtype=torch.float32)
        else:
            logits = linear(hidden, head)
        s = self.settings
        if s.logits_divisor != 1.0:
            logits = logits / s.logits_divisor
        if s.final_softcap is not None:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits

    def enable_lora(self, num_slots: int, max_rank: int) -> ModelLoras:
        """Adapter slots for per-request LoRA (lora.py); call before prepack_weights. Gate/up is then packed
        without SiLU-and-multiply in its pass, since an update must be added to gate and up before it."""
        for layer in self.layers:
            if isinstance(layer.mlp, MLP) and layer.mlp.gated:
                layer.mlp.gate_up_proj.fuse_silu = False
        weight = self.embed_tokens.weight
        self.loras = ModelLoras(self._lora_targets(), num_slots, max_rank, weight.dtype, weight.device)
        return self.loras

    def _lora_targets(self) -> dict[str, LoraTarget]:
        """Each Hugging Face projection an adapter may target (q/k/v/o, gate/up/down, or the family's own
        names), by its module name in the checkpoint: where in our fused projections its update lands.
        Experts and routers are not targets."""
        modules = dict(self.named_modules())
        targets: dict[str, LoraTarget] = {}
        for own, source in self.spec.weights.items():
            if "{i}" not in own or "{e}" in own or not own.endswith(".weight") or isinstance(source, Transposed):
                continue
            for i, layer in enumerate(self.layers):
                module = modules.get(own.format(i=i).removesuffix(".weight"))
                if not isinstance(module, Linear) or (isinstance(layer.mlp, MoE) and ".mlp." in own):
                    continue
                names = source if isinstance(source, tuple) else (source,)
                if len(names) == 1:
                    sizes: tuple[int, ...] = (module.out_features,)
                elif module is layer.self_attn.qkv_proj:
                    attn = layer.self_attn
                    sizes = (attn.q_size, attn.kv_size, attn.kv_size)
                else:
                    sizes = (module.out_features // len(names),) * len(names)  # gate, up
                for part, name in enumerate(names):
                    hf_module = name.format(i=i).removesuffix(".weight")
                    targets[hf_module] = LoraTarget(module, part, sizes, module.in_features)
        return targets

    def prepack_weights(self, quantization: str = "none") -> str | None:
        """Reorder every projection for the fast matmul where that pays (`can_prepack`); after loading.
        Returns what the weights were packed for ("gemm.c" or "oneDNN"), None when left plain.

        quantization "int8": every projection of the decoder and the LM head (a tied one as an int8 copy;
        the embedding lookup stays float) quantized for qgemm_vnni.c (bf16 weights) or qgemm.c instead; "q4_1" | "q8_0": nothing packed
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
            bf16 = weight.dtype == torch.bfloat16
            if self.tie_word_embeddings:
                # The head is the largest single matrix (a fifth of SmolLM2-135M's bytes), read every step.
                self.packed_head = pack_vnni(weight) if bf16 else qgemm.quantize_weight(weight)
            if bf16:
                return "int8 with bf16 activations, qgemm_vnni.c AVX-512 VNNI"
            return f"int8, qgemm.c {qgemm.qgemm_isa()}"
        if not can_prepack(weight.dtype, weight.device):
            return None
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.tie_word_embeddings:
            self.packed_head = prepack(weight)
        return "gemm.c" if gemm.gemm_bf16_fits(weight) else "oneDNN"

    def use_gguf_weights(
        self, weights: dict[str, qgemm_gguf.GGUFWeight], head: qgemm_gguf.GGUFWeight | None
    ) -> str:
        """--quantization q4_1 | q8_0, after load_hf_weights: every projection of the decoder as a GGUF file's
        blocks (`weights`, by Hugging Face name, fused here as load_hf_weights fuses the float ones), and the
        LM head too where `head` is given (a tied head keeps the float embedding for the lookup). Returns
        what the weights are now, for the runner's log line."""
        for i, layer in enumerate(self.layers):
            src = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj.use_gguf(cat_rows([weights[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]))
            attn.o_proj.use_gguf(weights[f"{src}self_attn.o_proj.weight"])
            mlp.gate_up_proj.use_gguf(cat_rows([weights[f"{src}mlp.{p}_proj.weight"] for p in ("gate", "up")]))
            mlp.down_proj.use_gguf(weights[f"{src}mlp.down_proj.weight"])
        if head is not None:
            if self.tie_word_embeddings:
                if (head.out_features, head.in_features) != tuple(self.embed_tokens.weight.shape):
                    raise ValueError(f"GGUF head blocks of [{head.out_features}, {head.in_features}] for a tied head")
                self.packed_head = head
            else:
                self.lm_head.use_gguf(head)
        head_text = f"head {head.kind}" if head is not None else "head float"
        return f"GGUF {weights[next(iter(weights))].kind} blocks ({head_text}), qgemm_gguf.c {qgemm_gguf.gguf_isa()}"

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's state dict in by the family's weight table (families.py): fusing q/k/v and
        gate/up, transposing Conv1D weights. Raises KeyError naming a missing tensor, ValueError a misfit."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        num_experts = self.settings.num_experts

        def take(name: str) -> torch.Tensor:
            if name in weights:
                return weights[name]
            short = name.split(".", 1)[1]  # GPT-2's original files name tensors without the "transformer." prefix
            if name.startswith("transformer.") and short in weights:
                return weights[short]
            raise KeyError(name)

        def fetch(source: Source, **index: int) -> torch.Tensor:
            if isinstance(source, Transposed):
                return take(source.name.format(**index)).t()
            if isinstance(source, tuple):
                return torch.cat([take(part.format(**index)) for part in source], dim=0)
            return take(source.format(**index))

        for target, source in self.spec.weights.items():
            layer_range = range(len(self.layers)) if "{i}" in target else [None]
            for i in layer_range:
                for e in range(num_experts) if "{e}" in target else [None]:
                    index = {k: v for k, v in (("i", i), ("e", e)) if v is not None}
                    name = target.format(**index)
                    if name not in own:
                        continue  # a bias, norm or head this config does not have
                    tensor = fetch(source, **index)
                    param = own[name]
                    if param.shape != tensor.shape:
                        raise ValueError(f"tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                    with torch.no_grad():
                        param.copy_(tensor.to(param.dtype))
                    loaded.add(name)
        missing = sorted(set(own) - loaded)
        if missing:
            raise ValueError(f"parameters the {self.config.model_type} weight table does not fill: {missing[:5]}")
