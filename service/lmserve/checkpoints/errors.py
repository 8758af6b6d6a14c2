"""The one exception type of the checkpoints package."""

from __future__ import annotations


class CheckpointError(Exception):
    """One clear line for the user; the CLI prints `error: <msg>` and exits 2, never a traceback.

    Every failure to find, convert, validate or load a checkpoint is raised as this, so callers
    need a single except clause and the message must name the offending file or reference.
    """


def one_line(exc: BaseException) -> str:
    """The first line of an underlying error, for embedding in a CheckpointError message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
