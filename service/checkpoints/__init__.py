"""Resolve model references to local Hugging Face folders; convert GGUF, merge LoRA, load weights safely."""

from service.checkpoints.architectures import NATIVE_TYPES, Architecture, generation_architecture, read_config
from service.checkpoints.bundled import BUNDLED_MODELS, BundledModel, bundled_location
from service.checkpoints.errors import CheckpointError
from service.checkpoints.export import ModelListing, export_model, list_models
from service.checkpoints.resolve import (
    ResolvedModel,
    resolve_model,
    validate_model_folder,
)
from service.checkpoints.weights import load_weights, weight_files

__all__ = [
    "BUNDLED_MODELS",
    "NATIVE_TYPES",
    "Architecture",
    "BundledModel",
    "CheckpointError",
    "ModelListing",
    "ResolvedModel",
    "bundled_location",
    "generation_architecture",
    "export_model",
    "list_models",
    "load_weights",
    "read_config",
    "resolve_model",
    "validate_model_folder",
    "weight_files",
]
