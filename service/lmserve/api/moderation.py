"""/v1/moderations and Moderate: the safety scanners as a classifier."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.api.admission import Caller, check_request
from lmserve.api.errors import APIError

if TYPE_CHECKING:
    from lmserve.state import AppState


MODERATION_MODEL = "lmserve-safety"


@dataclass(frozen=True)
class ModerationOutput:
    id: str
    model: str
    results: list[Any]  # lmserve.safety.ModerationResult, one per input


def moderate(state: AppState, caller: Caller, model: str | None, texts: list[str]) -> ModerationOutput:
    """The safety scanners as a classifier: every category found is flagged, whatever its action."""
    check_request(state, caller)
    if state.safety is None:
        raise APIError("The safety filter is off on this server (--no-safety).", "invalid_request", "input")
    if not texts:
        raise APIError("input must not be empty.", "invalid_value", "input")
    limit = state.config.limits.max_embedding_inputs
    if len(texts) > limit:
        raise APIError(f"At most {limit} inputs per request.", "invalid_value", "input")
    return ModerationOutput(f"modr-{uuid.uuid4().hex}", model or MODERATION_MODEL, state.safety.moderate(texts))


