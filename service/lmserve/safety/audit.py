"""The audit log: one JSON line per safety decision, logger `lmserve.audit` (INFO), through the
service's log handler (service/lmserve/logs.py), so it has `ts`, `level`, `logger`, `msg` and `request_id` like
every other line. It never holds the text: only its sha256.

    {"ts": "...", "level": "INFO", "logger": "lmserve.audit", "msg": "safety decision",
     "request_id": "...", "key_id": "...", "direction": "input", "category": "pii", "action": "flag",
     "score": 1.0, "kinds": ["email"], "text_sha256": "..."}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from lmserve.safety.decisions import Decision

AUDIT_LOGGER = "lmserve.audit"

audit_log = logging.getLogger(AUDIT_LOGGER)


def audit_decisions(decisions: Iterable[Decision], request_id: str | None, key_id: str | None) -> None:
    """Write one audit line per decision."""
    for decision in decisions:
        audit_log.info(
            "safety decision",
            extra={
                "request_id": request_id,
                "key_id": key_id,
                "direction": decision.direction,
                "category": decision.category,
                "action": decision.action,
                "score": round(decision.score, 4),
                "kinds": list(decision.kinds),
                "text_sha256": decision.text_sha256,
            },
        )
