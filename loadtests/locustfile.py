"""lmserve's Locust scenarios (also usable against any OpenAI-compatible server such as vLLM).

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \\
        [--tokenizer MODEL_DIR] [--prompt-tokens 128] [--output-tokens 128] [--api-key KEY] \\
        [ChatStreamUser CompletionUser EmbeddingsUser TokenizeUser GrpcUser]

User classes (all of them unless named on the command line):
- ChatStreamUser: streamed /v1/chat/completions; "chat stream" plus its TTFT and ITL entries.
- CompletionUser: non-streamed /v1/completions.
- EmbeddingsUser: /v1/embeddings.
- TokenizeUser: /tokenize and /detokenize.
- GrpcUser: the same over lmserve.v1 (ChatStream, Complete, Embed, Tokenize/Detokenize) at
  --grpc-target / LMSERVE_GRPC_TARGET; skipped, with a message saying why, without a target or stubs.

`overload.py` adds a load shape that ramps past capacity. The settings are in lmload/options.py
(Locust's --help does not list a locustfile's own arguments; loadtests/README.md does).
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
from locust import events
from locust.stats import CSV_STATS_INTERVAL_SEC

from lmload import options
from lmload.context import load_context
from lmload.grpc_user import NO_TARGET_REASON, GrpcUser
from lmload.http_users import ChatStreamUser, CompletionUser, EmbeddingsUser, TokenizeUser

__all__ = ["ChatStreamUser", "CompletionUser", "EmbeddingsUser", "GrpcUser", "TokenizeUser"]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    options.add_arguments(parser)


@events.test_start.add_listener
def _explain_skipped_grpc(environment: Any, **_: Any) -> None:
    if GrpcUser in (environment.user_classes or []) and not load_context(environment).settings.grpc_target:
        logging.getLogger("locustfile").warning(NO_TARGET_REASON)


@events.test_stop.add_listener
def _let_csv_catch_up(environment: Any, **_: Any) -> None:
    # Locust rewrites its --csv files once a second and closes them right after the run, so requests that
    # finished in the last second (e.g. during --stop-timeout) would be missing from them; one more tick
    # makes the files match the final summary.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)
