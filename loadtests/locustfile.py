"""lmserve's Locust scenarios (also usable against any OpenAI-compatible server such as vLLM).

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \\
        [--tokenizer MODEL_DIR] [--prompt-tokens 128] [--output-tokens 128] [--api-key KEY] \\
        [--grpc-target 127.0.0.1:50051] [ChatStreamUser CompletionUser EmbeddingsUser TokenizeUser GrpcUser]

User classes (those named on the command line, else all that can run; lmload/entries.py decides):
- ChatStreamUser: streamed /v1/chat/completions; "chat stream" plus its TTFT and ITL entries.
- CompletionUser: non-streamed /v1/completions.
- EmbeddingsUser: /v1/embeddings.
- TokenizeUser: /tokenize and /detokenize; only when named (or with --tags tokenize).
- GrpcUser: the same over lmserve.v1 (ChatStream, Complete, Embed, Tokenize/Detokenize) at
  --grpc-target / LMSERVE_GRPC_TARGET; not spawned without a target (or without the stubs).

A generation is reported under its name when it ran to max_tokens, else under "NAME [stop]" or
"NAME [content_filter]" (the safety filter ended it: counted apart, not a failure). The Aggregated row
counts the generation requests only; TTFT, ITL, embeddings and tokenize keep rows of their own.
`overload.py` adds a load shape that ramps past capacity. The settings are in lmload/options.py
(Locust's --help does not list a locustfile's own arguments; loadtests/README.md does).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import gevent
from locust import events
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from lmload import options
from lmload.aggregate import keep_out_of_aggregated
from lmload.context import load_context
from lmload.entries import LATENCY_TYPES, UserClass, aggregated_entries, aggregated_note, choose_users
from lmload.grpc_user import GrpcUser
from lmload.http_users import ChatStreamUser, CompletionUser, EmbeddingsUser, TokenizeUser
from lmload.outcome import CONTENT_FILTER

__all__ = ["ChatStreamUser", "CompletionUser", "EmbeddingsUser", "GrpcUser", "TokenizeUser"]

log = logging.getLogger("locustfile")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    options.add_arguments(parser)


def _task_tags(tasks: Iterable[Any]) -> frozenset[str]:
    """The tags of a user's tasks, those of its task sets' included."""
    tags: set[str] = set()
    for t in tasks:
        tags |= getattr(t, "locust_tag_set", set())
        if isinstance(t, type):  # a TaskSet
            tags |= _task_tags(getattr(t, "tasks", ()))
    return frozenset(tags)


@events.init.add_listener
def _choose_users(environment: Any, runner: Any = None, **_: Any) -> None:
    """Only users that can run are spawned, and the Aggregated row counts what lmload.entries says."""
    opts = environment.parsed_options
    if opts is None:  # a run through Locust's Python API sets its own classes
        return
    named = set(opts.user_classes or ())
    choice = choose_users(
        [
            UserClass(
                cls.__name__,
                _task_tags(cls.tasks),
                needs_grpc_target=getattr(cls, "needs_grpc_target", False),
                opt_in=getattr(cls, "opt_in", False),
            )
            for cls in environment.user_classes
        ],
        named=named,
        tags=opts.tags or None,
        exclude_tags=opts.exclude_tags or (),
        grpc_target=bool(load_context(environment).settings.grpc_target),
    )
    for name, why in choice.left_out.items():
        log.log(logging.WARNING if name in named else logging.INFO, f"{name} not spawned: {why}")
    if not choice.spawned:
        log.error("no user class left to spawn: %s", "; ".join(f"{n}: {w}" for n, w in choice.left_out.items()))
        sys.exit(1)
    environment.user_classes[:] = [cls for cls in environment.user_classes if cls.__name__ in choice.spawned]
    keep_out_of_aggregated(environment.stats, aggregated_entries(choice.generates))

    if isinstance(runner, WorkerRunner):  # the master prints the summary
        return

    @environment.events.quit.add_listener
    def _explain_aggregated(**_: Any) -> None:
        stats = environment.stats
        filtered = sum(
            entry.num_requests
            for (name, kind), entry in stats.entries.items()
            if kind not in LATENCY_TYPES and name.endswith(f"[{CONTENT_FILTER}]")
        )
        logging.getLogger("locust.stats_logger").info(
            aggregated_note(choice.generates, stats.total.num_requests, filtered)
        )


@events.test_stop.add_listener
def _let_csv_catch_up(environment: Any, **_: Any) -> None:
    # Locust rewrites its --csv files once a second and closes them right after the run, so requests that
    # finished in the last second (e.g. during --stop-timeout) would be missing from them; one more tick
    # makes the files match the final summary.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)
