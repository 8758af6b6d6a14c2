"""Whether a checkpoint folder is a cross-encoder the rerank model can serve, read from its config.json before
anything loads (no torch here, so `lmserve serve` can refuse a wrong --rerank-model before any weight is read).

    spec = cross_encoder_spec(folder)   # raises CheckpointError (one line)
    spec.activation                     # "sigmoid" | "identity": what turns the one logit into the score
    spec.max_input_tokens               # the longest (query, document) pair its positions allow

A cross-encoder here is a `*ForSequenceClassification` with one output (num_labels=1). Its score is the logit
through the activation its config.json names, as sentence-transformers' CrossEncoder and vLLM read it
(`sentence_transformers.activation_fn`, else `sbert_ce_default_activation_function`: Sigmoid or Identity),
else the sigmoid, which both apply to one output by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve.checkpoints.architectures import read_config
from lmserve.checkpoints.errors import CheckpointError

# The activation names sentence-transformers writes into config.json, by their class name.
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}
DEFAULT_MAX_INPUT_TOKENS = 512


@dataclass(frozen=True)
class CrossEncoderSpec:
    activation: str  # "sigmoid" | "identity"
    max_input_tokens: int


def model_max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the checkpoint's position table allows, from its config.json."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            if key == "max_position_embeddings" and "roberta" in str(config.get("model_type", "")):
                # RoBERTa-family position ids start after padding_idx: 514 positions -> 512 tokens.
                pad = config.get("pad_token_id")
                value -= (pad if isinstance(pad, int) else 1) + 1
            return value
    return None


def activation_from_config(config: dict[str, Any]) -> str:
    """sigmoid | identity: what the checkpoint's config.json names, else the sigmoid."""
    st = config.get("sentence_transformers")
    name = st.get("activation_fn") if isinstance(st, dict) else None
    name = name or config.get("sbert_ce_default_activation_function")
    if not name:
        return "sigmoid"
    short = str(name).rsplit(".", 1)[-1]
    if short not in _ACTIVATIONS:
        raise CheckpointError(f"unsupported cross-encoder activation {name!r} (Sigmoid or Identity)")
    return _ACTIVATIONS[short]


def cross_encoder_spec(folder: Path) -> CrossEncoderSpec:
    config = read_config(folder)
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise CheckpointError(
            f"{folder}: a rerank model is a *ForSequenceClassification checkpoint, not {architectures}"
        )
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) else config.get("num_labels", 2)
    if num_labels != 1:
        raise CheckpointError(f"{folder}: a rerank model has one output (num_labels=1), this one has {num_labels}")
    max_input_tokens = model_max_positions(config) or DEFAULT_MAX_INPUT_TOKENS
    return CrossEncoderSpec(activation_from_config(config), max_input_tokens)
