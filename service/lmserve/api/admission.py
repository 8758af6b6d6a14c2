"""Admission, the same on both transports: who is calling, whether the server takes new work, and the
request's claims on shared capacity (its key's request and token budgets, a slot in the bounded queue).

Both transports share one AppState, so one key's rate limits and the queue bound are one budget across
HTTP and gRPC, not one each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.api.errors import APIError
from lmserve.api.limits import Admission, TokenReservation
from lmserve.logs import AccessRecord

if TYPE_CHECKING:
    from lmserve.state import AppState

DRAIN_RETRY_AFTER_S = 1


@dataclass
class Caller:
    """Who is asking, and the request's access record: what every transport-neutral handler takes."""

    record: AccessRecord
    key_id: str
    # Headers (HTTP) or trailing metadata (gRPC) the response should carry: x-ratelimit-*, filled in
    # as the request's budgets are checked.
    response_headers: dict[str, str] = field(default_factory=dict)


def authenticate(state: AppState, authorization: str | None, client_address: str | None) -> str:
    """The caller's key id from an `Authorization` header / `authorization` metadata value; raises
    APIError(invalid_api_key). Without configured keys every caller is let in, and rate limits apply
    per client address."""
    if not state.keys.is_enabled:
        return f"ip-{client_address}" if client_address else "anonymous"
    return state.keys.authenticate(authorization)


def check_request(state: AppState, caller: Caller) -> None:
    """Before any work: refuse while draining, and count one request against the caller's key."""
    if state.lifecycle.draining:
        raise APIError(
            "The server is shutting down and takes no new requests; retry on another replica.",
            "service_unavailable",
            headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
        )
    caller.response_headers.update(state.limiter.check_request(caller.key_id).values)


def check_engine(state: AppState) -> None:
    """Before generation work: a failed (or stopped) engine takes none. 503 before anything is queued, so
    a streaming request gets a status rather than an SSE stream that opens only to fail."""
    if not state.engine.stats().is_alive:
        raise APIError(
            "The generation engine is not running; retry on another replica.",
            "service_unavailable",
            headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)},
        )


class Admitted:
    """A request's claims on shared capacity (token reservation, queue slot), released exactly once."""

    def __init__(self, state: AppState, caller: Caller, max_tokens: int) -> None:
        self.reservation: TokenReservation = state.limiter.reserve_tokens(caller.key_id, max_tokens)
        try:
            self.admission: Admission = state.admission.admit()
        except APIError:
            self.reservation.settle(0)
            raise
        caller.response_headers.update(self.reservation.headers.values)

    def release(self, tokens_used: int) -> None:
        """Idempotent: the first call settles the tokens and frees the slot."""
        self.reservation.settle(tokens_used)
        self.admission.release()


__all__ = ["Admitted", "Caller", "authenticate", "check_engine", "check_request"]
