"""Which engine path serves a checkpoint folder, read from its config.json before anything loads.

    arch = generation_architecture(folder)   # raises CheckpointError (one line) where nothing can serve it
    arch.path       # "native": lmserve's own modules (engine/modeling/decoder.py), fused C paths where a layer fits
                    # "transformers": transformers' model class over the paged cache (engine/modeling/generic.py)
    arch.family     # what `lmserve models` and /v1/models show, e.g. "qwen2 (native)", "gemma2 (transformers)"

A model_type with no native module is served by transformers' own class where that class routes its
attention through transformers' attention interface and every layer is an attention layer. Refused, with
the reason: custom code (auto_map), encoder-decoders, encoders, state-space and recurrent layers, and
classes that do not take a pluggable attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.weights import read_json_object

# config.model_type values lmserve's own modules implement (engine/modeling/families.py has their specs;
# tests/engine/test_families.py checks the two lists agree, so that this module imports no torch).
NATIVE_TYPES: frozenset[str] = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2",
    "starcoder2", "gpt2", "mixtral", "qwen3_moe",
})
# Layer kinds the paged KV cache holds everything of; any other (mamba, conv, linear attention) keeps a state.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass(frozen=True)
class Architecture:
    model_type: str
    path: str  # "native" | "transformers"
    class_name: str  # the transformers class (for the log and the error), e.g. "Gemma2ForCausalLM"

    @property
    def family(self) -> str:
        return f"{self.model_type} ({self.path})"

    def quantization_refusal(self, quantization: str, folder: Path) -> str | None:
        """Why --quantization cannot serve this architecture (its C kernels run on lmserve's own modules only)."""
        if quantization == "none" or self.path == "native":
            return None
        return (
            f"--quantization {quantization} runs on lmserve's own modules, and {folder} ({self.model_type}) is served "
            f"by transformers' {self.class_name} (docs/model-families.md)"
        )


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a model folder: config.json is missing")
    return read_json_object(path)


def generation_architecture(folder: Path, model_impl: str = "auto") -> Architecture:
    """How the folder's model is served for generation (--model-impl auto | native | transformers);
    CheckpointError naming the folder, its model_type and why where it cannot be."""
    config = read_config(folder)
    model_type = config.get("model_type")
    names = ", ".join(config.get("architectures") or []) or "no architectures listed"
    if model_type in NATIVE_TYPES and model_impl != "transformers":
        return Architecture(model_type, "native", names)
    if model_impl == "native":
        raise CheckpointError(
            f"{Path(folder) / 'config.json'}: model_type={model_type!r} ({names}) has no native implementation "
            f"(--model-impl native); they are {', '.join(sorted(NATIVE_TYPES))}; --model-impl auto serves it "
            "through transformers' class"
        )
    reason, class_name = _transformers_refusal(config)
    if reason is not None:
        raise CheckpointError(
            f"{Path(folder) / 'config.json'}: model_type={model_type!r} ({names}) cannot be served: {reason}; "
            "`--engine vllm` serves more architectures where vLLM runs"
        )
    return Architecture(str(model_type), "transformers", class_name)


def _transformers_refusal(config: dict[str, Any]) -> tuple[str | None, str]:
    """(why transformers' class cannot be served over the paged cache, or None; that class's name)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return "config.json names no model_type", ""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        if config.get("auto_map"):
            return "it needs the checkpoint's own Python code (auto_map), which lmserve does not run", ""
        return f"transformers {transformers.__version__} does not know this model_type", ""
    if config.get("is_encoder_decoder"):
        return "it is an encoder-decoder model; lmserve serves decoders", ""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if class_name is None:
        return "transformers has no causal language model for it", ""
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder"):
        return "it is an encoder (is_decoder is false); lmserve serves decoders", class_name
    others = sorted({str(t) for t in config.get("layer_types") or []} - ATTENTION_LAYER_TYPES)
    if others:
        return f"its {', '.join(others)} layers keep a state that a KV cache does not hold", class_name
    if config.get("attention_chunk_size"):
        return "its chunked attention is expressed only by a mask, which the paged cache does not build", class_name
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not getattr(model_class, "_supports_attention_backend", False):
        return (
            f"{class_name} does not route its attention through transformers' attention interface "
            "(a state-space or recurrent model, or older modeling code)"
        ), class_name
    return None, class_name
