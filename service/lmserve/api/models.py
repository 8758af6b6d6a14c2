"""The models a server serves, by the names requests use: the generation model and its LoRA adapters
(by name, as vLLM serves them), the embedding model, the rerank model; the list /v1/models and ListModels show; adapters
loaded and unloaded at run time (--allow-runtime-lora)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmserve.api.admission import Caller, check_request
from lmserve.api.errors import APIError
from lmserve.state import ServedModel

if TYPE_CHECKING:
    from lmserve.engine.base import LoraAdapterInfo
    from lmserve.state import AppState


def generation_model(state: AppState, model: str | None) -> ServedModel:
    """The generation model a request names: the base (by any of its served names), or a LoRA adapter
    loaded on it (by the adapter's name, as vLLM serves them)."""
    base = state.generation_model
    if model is not None and not base.matches(model):
        for adapter in state.engine.lora_adapters():
            if adapter.name == model:
                return _adapter_model(base, adapter)
    return require_model(base, model, "generation")


def _adapter_model(base: ServedModel, adapter: LoraAdapterInfo) -> ServedModel:
    return ServedModel(
        name=adapter.name, aliases=frozenset({adapter.name}), created=adapter.created, lora=adapter.name,
        parent=base.name, root=adapter.path,
    )  # fmt: skip


def require_model(served: ServedModel | None, model: str | None, kind: str) -> ServedModel:
    if served is None:
        raise APIError(f"This server serves no {kind} model.", "model_not_found", "model")
    if not served.matches(model):
        raise APIError(
            f"The model '{model}' does not exist or is not a {kind} model here; this server's {kind} model "
            f"is '{served.name}'.",
            "model_not_found",
            "model",
        )
    return served


@dataclass(frozen=True)
class ModelInfo:
    served: ServedModel
    max_model_len: int
    kind: str  # generation | embedding | rerank
    family: str  # e.g. "qwen2 (native)", "cohere (transformers)", "bert (transformers)"


def served_models(state: AppState) -> list[ModelInfo]:
    engine = state.engine
    models = [ModelInfo(state.generation_model, engine.max_model_len, "generation", engine.family)]
    models += [
        ModelInfo(_adapter_model(state.generation_model, a), engine.max_model_len, "generation", engine.family)
        for a in engine.lora_adapters()
    ]
    if state.embedding_model is not None and state.embedder is not None:
        embedder = state.embedder
        models.append(ModelInfo(state.embedding_model, embedder.max_input_tokens, "embedding", embedder.family))
    if state.rerank_model is not None and state.reranker is not None:
        reranker = state.reranker
        models.append(ModelInfo(state.rerank_model, reranker.max_input_tokens, "rerank", reranker.family))
    return models


# -- LoRA adapters at run time ---------------------------------------------------------------------------

_LORA_ERRORS = {"invalid": "invalid_value", "conflict": "invalid_value", "not_found": "not_found", "unsupported": "not_found"}


def _check_runtime_lora(state: AppState, caller: Caller) -> None:
    check_request(state, caller)
    if not state.config.engine.allow_runtime_lora:
        raise APIError(
            "Loading and unloading LoRA adapters at run time is off: start the server with --allow-runtime-lora.",
            "not_found",
        )


async def load_lora_adapter(state: AppState, caller: Caller, name: str, path: str, load_inplace: bool = False) -> str:
    """Register the adapter folder `path` as `name` (read and checked first); a success line, as vLLM's."""
    from lmserve.engine.base import LoraAdapterError

    _check_runtime_lora(state, caller)
    if load_inplace:
        raise APIError("load_inplace is not supported: unload the adapter, then load it again.", "unsupported_value", "load_inplace")
    served = (state.generation_model, state.embedding_model, state.rerank_model)
    if any(m is not None and m.matches(name) for m in served):
        raise APIError(f"'{name}' is the name of a model this server serves.", "invalid_value", "lora_name")
    try:
        await state.engine.load_lora_adapter(name, path)
    except LoraAdapterError as exc:
        raise APIError(f"The LoRA adapter '{name}' cannot be loaded: {exc}", _LORA_ERRORS[exc.kind],
                       "lora_path" if exc.kind == "invalid" else "lora_name") from None  # fmt: skip
    state.metrics.lora_loads_total.inc()
    return f"Success: LoRA adapter '{name}' added successfully."


async def unload_lora_adapter(state: AppState, caller: Caller, name: str) -> str:
    """Forget the adapter `name`: new requests for it get 404; those in flight finish with it."""
    from lmserve.engine.base import LoraAdapterError

    _check_runtime_lora(state, caller)
    try:
        await state.engine.unload_lora_adapter(name)
    except LoraAdapterError as exc:
        raise APIError(f"The LoRA adapter '{name}' cannot be unloaded: {exc}", _LORA_ERRORS[exc.kind], "lora_name") from None
    state.metrics.lora_unloads_total.inc()
    return f"Success: LoRA adapter '{name}' removed successfully."


