"""Flags that several benchmarks take with the same meaning, spelled and explained once."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmserve.config import DEFAULT_MODEL

from benchkit.repo import REPO_ROOT, RESULTS_DIR

DTYPES = ("auto", "float32", "bfloat16")


def add_model(parser: argparse.ArgumentParser) -> None:
    """The model the engine or server loads, as `lmserve serve --model` takes it."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a bundled model id, a model folder or a GGUF file")


def add_model_folder(parser: argparse.ArgumentParser) -> None:
    """A folder both lmserve and vLLM can serve (the side-by-side benchmarks)."""
    parser.add_argument(
        "--model", type=Path, required=True, help="a model folder (`lmserve export smollm2-135m-instruct DIR`)"
    )


def add_dtype(parser: argparse.ArgumentParser, default: str, allow_auto: bool = True, help: str | None = None) -> None:
    """The weights' and activations' dtype; `auto` lets the engine pick (bf16 where the CPU computes it)."""
    choices = DTYPES if allow_auto else DTYPES[1:]
    parser.add_argument("--dtype", default=default, choices=choices, help=help)


def add_concurrency(parser: argparse.ArgumentParser, default: list[int] | int) -> None:
    """Requests in flight; a list default makes the flag take several values, one point each."""
    if isinstance(default, list):
        parser.add_argument("--concurrency", type=int, nargs="+", default=default, help="one point per value")
    else:
        parser.add_argument("--concurrency", type=int, default=default, help="requests in flight")


def add_lengths(parser: argparse.ArgumentParser, input_len: int = 128, output_len: int = 128) -> None:
    """Random prompts of --input-len tokens, exactly --output-len new tokens each (ignore_eos)."""
    parser.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=output_len, help="output tokens per request (ignore_eos)")


def add_rounds(parser: argparse.ArgumentParser, default: int, help: str | None = None) -> None:
    parser.add_argument(
        "--rounds", type=int, default=default, help=help or "rounds alternate the order, so drift falls on all alike"
    )


def add_json_output(parser: argparse.ArgumentParser) -> None:
    """Where the measured points go as JSON; none by default, so that a casual run writes nothing."""
    parser.add_argument(
        "--json", type=Path, default=None, help=f"write the points as JSON here (committed results: {RESULTS_DIR.relative_to(REPO_ROOT)}/)"
    )


def add_log_dir(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--log-dir", type=Path, default=default, help="each server's log and each run's output")
