"""Which user classes a run of locustfile.py spawns, and which entries its Aggregated row counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmload.entries import (
    EMBEDDINGS,
    GENERATION,
    NO_GRPC_TARGET,
    TOKENIZE,
    UserClass,
    aggregated_entries,
    aggregated_note,
    base_name,
    choose_users,
)
from tests.loadtests.conftest import LOADTESTS

CHAT = UserClass("ChatStreamUser", frozenset({GENERATION}))
COMPLETION = UserClass("CompletionUser", frozenset({GENERATION}))
EMBED = UserClass("EmbeddingsUser", frozenset({EMBEDDINGS}))
TOKENIZE_USER = UserClass("TokenizeUser", frozenset({TOKENIZE}), opt_in=True)
GRPC = UserClass("GrpcUser", frozenset({GENERATION, EMBEDDINGS, TOKENIZE}), needs_grpc_target=True)
ALL = [CHAT, COMPLETION, EMBED, TOKENIZE_USER, GRPC]


def test_the_default_run_spawns_what_can_run() -> None:
    choice = choose_users(ALL, named=(), tags=None, grpc_target=False)
    assert choice.spawned == ["ChatStreamUser", "CompletionUser", "EmbeddingsUser"]
    assert choice.left_out["GrpcUser"] == NO_GRPC_TARGET
    assert "named" in choice.left_out["TokenizeUser"] and choice.generates
    assert choose_users(ALL, named=(), tags=None, grpc_target=True).spawned == [
        "ChatStreamUser", "CompletionUser", "EmbeddingsUser", "GrpcUser",
    ]


def test_named_or_tagged_opt_in_users_run() -> None:
    assert choose_users([TOKENIZE_USER], named=("TokenizeUser",), tags=None, grpc_target=False).spawned == ["TokenizeUser"]
    choice = choose_users(ALL, named=(), tags=("tokenize",), grpc_target=True)
    assert choice.spawned == ["TokenizeUser", "GrpcUser"] and not choice.generates
    assert "no task" in choice.left_out["ChatStreamUser"]


def test_a_named_grpc_user_without_target_is_left_out() -> None:
    choice = choose_users([GRPC], named=("GrpcUser",), tags=None, grpc_target=False)
    assert choice.spawned == [] and choice.left_out == {"GrpcUser": NO_GRPC_TARGET}


def test_excluded_tags_leave_users_out() -> None:
    choice = choose_users(ALL, named=(), tags=None, exclude_tags=("embeddings",), grpc_target=True)
    assert "EmbeddingsUser" not in choice.spawned and "GrpcUser" in choice.spawned
    assert not choose_users([EMBED], named=(), tags=("generation",), grpc_target=False).spawned


@pytest.mark.parametrize(
    ("request_type", "name", "counted"),
    [
        ("POST", "chat stream", True),
        ("POST", "chat stream [content_filter]", True),
        ("POST", "completion [stop]", True),
        ("POST", "chat stream [503 expected]", True),
        ("gRPC", "ChatStream", True),
        ("gRPC", "Complete [UNAVAILABLE expected]", True),
        ("TTFT", "chat stream", False),
        ("ITL", "grpc ChatStream", False),
        ("POST", "embeddings", False),
        ("POST", "tokenize", False),
        ("POST", "detokenize [503 expected]", False),
        ("gRPC", "Embed", False),
        ("gRPC", "Tokenize", False),
    ],
)
def test_the_aggregated_row_counts_generation(request_type: str, name: str, counted: bool) -> None:
    assert aggregated_entries(generates=True)(request_type, name) is counted
    # A run without generation counts its requests; latencies never.
    assert aggregated_entries(generates=False)(request_type, name) is (request_type not in ("TTFT", "ITL"))


def test_names_and_note() -> None:
    assert base_name("chat stream [content_filter]") == "chat stream" and base_name("Complete") == "Complete"
    assert "12 generation requests" in aggregated_note(True, 12, 3) and "not failures): 3." in aggregated_note(True, 12, 3)
    assert aggregated_note(False, 40, 0).startswith("Aggregated: 40 requests")


def test_entries_apart_keep_their_rows_and_failures() -> None:
    """lmload.aggregate on a real RequestStats, in a child process (Locust monkey-patches whatever imports it)."""
    script = """
from locust.stats import RequestStats
from lmload.aggregate import keep_out_of_aggregated
from lmload.entries import aggregated_entries
stats = RequestStats()
keep_out_of_aggregated(stats, aggregated_entries(generates=True))
stats.log_request("POST", "chat stream", 900, 10)
stats.log_request("POST", "chat stream [content_filter]", 300, 5)
stats.log_request("TTFT", "chat stream", 100, 0)
stats.log_request("POST", "embeddings", 20, 0)
stats.log_error("POST", "embeddings", "HTTP 500")
print(stats.total.num_requests, stats.total.num_failures, stats.get("embeddings", "POST").num_requests,
      stats.get("embeddings", "POST").num_failures, stats.get("chat stream", "TTFT").num_requests, len(stats.errors))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=LOADTESTS, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # Aggregated: the two generations, no failure; embeddings and TTFT keep their rows; the embeddings
    # failure is in the error report (so the run exits 1).
    assert proc.stdout.split() == ["2", "0", "1", "1", "1", "1"]
