"""Which users a run of locustfile.py spawns, and which of their entries Locust's Aggregated row counts.

Spawned: every user class of the run (those named on the command line, else all of them) that can run:
GrpcUser only with a gRPC target; a class only while --tags / --exclude-tags leave it a task; an opt-in
class (TokenizeUser) only when named, or when --tags asks for its tag. So `-u N` of any size spawns only
users that do something.

Aggregated: the generation requests (HTTP "chat stream" and "completion", gRPC "ChatStream" and
"Complete", with their [stop], [content_filter] and [... expected] entries). The other entries keep their
rows but stay out of it: TTFT and ITL are not requests but per-stream and per-token latencies, and the
embeddings and tokenize calls are many times cheaper than a generation, so counting them would turn the
Aggregated figures into theirs. In a run without generation (e.g. EmbeddingsUser alone) the Aggregated
row counts every request, as Locust's does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

# The scenarios' task tags (Locust's --tags / --exclude-tags select them).
GENERATION, EMBEDDINGS, TOKENIZE = "generation", "embeddings", "tokenize"
# Entry types that are latencies within a stream, not requests.
LATENCY_TYPES = frozenset({"TTFT", "ITL"})
# Request names of the calls besides generation, on HTTP and gRPC.
SIDE_NAMES = frozenset({"embeddings", "tokenize", "detokenize", "Embed", "Tokenize", "Detokenize"})
NO_GRPC_TARGET = "no gRPC target; set --grpc-target or LMSERVE_GRPC_TARGET (host:port)"

Aggregated = Callable[[str, str], bool]  # (request type, name) -> whether Locust's Aggregated row counts it


def base_name(name: str) -> str:
    """An entry's request name without its outcome: "chat stream [content_filter]" -> "chat stream"."""
    return name.split(" [", 1)[0]


def generation_only(request_type: str, name: str) -> bool:
    return request_type not in LATENCY_TYPES and base_name(name) not in SIDE_NAMES


def requests_only(request_type: str, name: str) -> bool:
    return request_type not in LATENCY_TYPES


def aggregated_entries(generates: bool) -> Aggregated:
    """What the Aggregated row counts in a run that has (or has no) generation."""
    return generation_only if generates else requests_only


@dataclass(frozen=True)
class UserClass:
    """What the choice needs to know of one user class."""

    name: str
    tags: frozenset[str]  # the tags of its tasks (each of the scenarios' tasks has one)
    needs_grpc_target: bool = False
    opt_in: bool = False  # spawned only when asked for: named, or its tag in --tags


@dataclass(frozen=True)
class UserChoice:
    spawned: list[str]
    left_out: dict[str, str]  # class name -> why it is not spawned
    generates: bool  # a spawned user has a generation task selected


def _selected_tags(user: UserClass, tags: Collection[str] | None, exclude_tags: Collection[str]) -> set[str]:
    return {t for t in user.tags if (tags is None or t in tags) and t not in exclude_tags}


def choose_users(
    users: Sequence[UserClass],
    *,
    named: Collection[str],
    tags: Collection[str] | None,
    exclude_tags: Collection[str] = (),
    grpc_target: bool,
) -> UserChoice:
    """`users`: the run's classes (the named ones, or all); `named`: the class names given on the command
    line; `tags` None: no --tags (with --tags, an opt-in class runs when one of its tags is in them)."""
    spawned: list[str] = []
    left_out: dict[str, str] = {}
    generates = False
    for user in users:
        selected = _selected_tags(user, tags, exclude_tags)
        if user.needs_grpc_target and not grpc_target:
            left_out[user.name] = NO_GRPC_TARGET
        elif not selected:
            left_out[user.name] = "--tags / --exclude-tags leave it no task"
        elif user.opt_in and user.name not in named and tags is None:
            what = ", ".join(sorted(user.tags))
            left_out[user.name] = f"off unless named on the command line (or --tags {what})"
        else:
            spawned.append(user.name)
            generates |= GENERATION in selected
    return UserChoice(spawned, left_out, generates)


def aggregated_note(generates: bool, num_aggregated: int, num_filtered: int) -> str:
    """The line printed under Locust's summary tables."""
    if not generates:
        return f"Aggregated: {num_aggregated} requests (TTFT and ITL rows are latencies, not requests)."
    return (
        f"Aggregated: {num_aggregated} generation requests; the TTFT, ITL, embeddings and tokenize rows are "
        f"apart from it. Generations ended by the safety filter (content_filter, not failures): {num_filtered}."
    )
