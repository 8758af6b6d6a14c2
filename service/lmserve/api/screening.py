"""What every endpoint does with the safety filter: screen the inputs (block, redact, strip), and count
and audit each decision (never the text)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lmserve.api.admission import Caller
from lmserve.api.errors import APIError

if TYPE_CHECKING:
    from lmserve.safety import Decision
    from lmserve.state import AppState


def report_decisions(state: AppState, caller: Caller, decisions: list[Decision]) -> None:
    """Count each safety decision and write its audit line (never the text)."""
    if not decisions:
        return
    from lmserve.safety import audit_decisions

    for d in decisions:
        state.metrics.observe_safety(d.direction, d.category, d.action)
    audit_decisions(decisions, caller.record.request_id, caller.key_id)


def screen_input(state: AppState, caller: Caller, texts: list[str], param: str) -> list[str]:
    """The input texts as the model should see them (redacted, stripped), or APIError(content_filter) when
    the policy blocks one. Without a safety filter, the texts as they are."""
    if state.safety is None or not texts:
        return texts
    verdict = state.safety.check_input(texts)
    report_decisions(state, caller, verdict.decisions)
    if verdict.blocked is not None:
        raise APIError(
            f"The input was blocked by the safety filter (category: {verdict.blocked.category}).",
            "content_filter",
            param,
        )
    return verdict.texts


def screen_token_inputs(
    state: AppState, caller: Caller, inputs: list[list[int]], decode: Callable[[list[int]], str], param: str
) -> None:
    """Token-array inputs are screened as their decoded text: a block refuses them; redaction cannot apply
    to ids the client chose, so they go to the model as sent. Call once the ids are known to decode."""
    if state.safety is not None and inputs:
        screen_input(state, caller, [decode(ids) for ids in inputs], param)
