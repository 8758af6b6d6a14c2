"""Resolve model references to local Hugging Face folders; convert GGUF, merge LoRA, load weights safely."""

from lmserve.checkpoints.architectures import NATIVE_TYPES, Architecture, generation_architecture, read_config
from lmserve.checkpoints.bundled import BUNDLED_MODELS, BundledModel, bundled_location
from lmserve.checkpoints.errors import CheckpointError
from lmserve.checkpoints.export import ModelListing, export_model, list_models
from lmserve.checkpoints.resolve import (
    ResolvedModel,
    resolve_model,
    validate_model_folder,
)
from lmserve.checkpoints.weights import load_weights, weight_files

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
