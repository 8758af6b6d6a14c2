"""Schemathesis against the real server's own /openapi.json: no 5xx, responses match the schema.

Bounded: a few positive and negative examples per operation, against the `fuzz` server whose caps
(max_tokens <= 4, n <= 2) keep every generation short. The `model` field is pinned to a served
model so generation and embedding requests actually run instead of all ending in 404.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.checks import not_a_server_error

from tests.api.conftest import LiveServer, Servers

MAX_EXAMPLES = 15  # per operation and mode
SERVED = {"/v1/embeddings": "all-minilm-l6-v2", "/tokenize": None}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _pin_model(case) -> None:
    if isinstance(case.body, dict):
        # A client's own deadline may rightly end in a 504 (tests/reliability/test_deadlines.py): not fuzzed.
        case.body.pop("timeout", None)
    if isinstance(case.body, dict) and "model" in case.body:
        model = SERVED.get(case.path, "smollm2-135m-instruct")
        if model is None:
            del case.body["model"]
        else:
            case.body["model"] = model


@pytest.mark.slow
def test_openapi_conformance(servers: Servers) -> None:
    server: LiveServer = servers.fuzz
    spec = httpx.get(f"{server.base_url}/openapi.json", headers=server.headers).json()
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 22  # 18, and /v1/rerank, /rerank, /v1/score, /score
    failures: list[str] = []
    # Negative examples only where there is a body to break (GET routes here take no input to violate).
    runs = [(op, GenerationMode.POSITIVE) for op in operations]
    runs += [(op, GenerationMode.NEGATIVE) for op in operations if len(op.body) > 0]
    for operation, mode in runs:
        # Negative (schema-violating) examples must never cause a 5xx; only positive ones must conform.
        checks = CHECKS if mode == GenerationMode.POSITIVE else [not_a_server_error]

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            _pin_model(case)
            case.call_and_validate(base_url=server.base_url, headers=server.headers, checks=checks, timeout=60)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
