"""argparse pieces for the CLI: value types whose errors argparse prints as one `error:` line, a help
formatter that ends every option's help with its default, and flags whose default is an LMSERVE_*
variable checked with the flag's own type (the CLI passes the environment in; nothing here reads it).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve.config import parse_bool


class EnvError(ValueError):
    """A malformed LMSERVE_* value; the message names the variable."""


# ---- value types: each raises argparse.ArgumentTypeError, which argparse turns into one `error:` line ----


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(minimum: float, maximum: float | None = None, *, exclusive_min: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= minimum if exclusive_min else value < minimum
        if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
            low = f"> {minimum:g}" if exclusive_min else f">= {minimum:g}"
            span = f"{low} and <= {maximum:g}" if maximum is not None else low
            raise argparse.ArgumentTypeError(f"must be a number {span}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def one_of(options: Sequence[str], lower: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.lower() if lower else text
        if value not in options:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(options)}, got {text!r}")
        return value

    parse.__name__ = "choice"
    return parse


def device_name(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def switch(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PORT = int_at_least(0, 65535)


def served_name(text: str) -> str:
    """A model id clients send as `model`: not empty, no surrounding spaces, no comma (the variable's
    separator), at most 256 characters."""
    if not text or text != text.strip() or "," in text or len(text) > 256:
        raise argparse.ArgumentTypeError(
            f"a served model name is 1-256 characters with no surrounding spaces and no comma, got {text!r}"
        )
    return text


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated served names (an LMSERVE_* variable's form of a repeated flag)."""
    return tuple(served_name(part.strip()) for part in text.split(","))


def lora_module(text: str) -> tuple[str, Path]:
    """One --lora-modules entry: NAME=PATH, or vLLM's JSON form {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
            name, path = item["name"], item["path"]
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f'a LoRA module as JSON needs "name" and "path", got {text!r}') from None
    else:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise argparse.ArgumentTypeError(f"a LoRA module is NAME=PATH, got {text!r}")
    return served_name(str(name)), Path(str(path))


def lora_module_list(text: str) -> tuple[tuple[str, Path], ...]:
    """Comma-separated NAME=PATH entries (LMSERVE_LORA_MODULES)."""
    return tuple(lora_module(part.strip()) for part in text.split(",") if part.strip())


# ---- help ----------------------------------------------------------------------------------------------


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace("%", "%%")  # help strings are %-formatted


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (the LMSERVE_* variable's value when one is set)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        return f"{text} (default: {_default_text(action.default)})"


@dataclass(frozen=True)
class Flags:
    """Adds flags whose default is their LMSERVE_* variable (checked with the flag's own type) or a
    built-in value, so `--help` shows the default in effect and a bad variable fails like a bad flag."""

    parser: argparse.ArgumentParser
    env: Mapping[str, str]

    def env_default(self, var: str | None, parse: Callable[[str], Any], default: Any) -> Any:
        raw = self.env.get(var) if var else None
        if raw is None or raw == "":
            return default
        try:
            return parse(raw)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise EnvError(f"{var}={raw!r}: {exc}") from None

    def value(self, flag: str, var: str | None, parse: Callable[[str], Any], default: Any, help: str, **kw: Any) -> None:
        suffix = f" [env {var}]" if var else ""
        self.parser.add_argument(
            flag, type=parse, default=self.env_default(var, parse, default), help=help + suffix, **kw
        )

    def names(self, flag: str, var: str, help: str) -> None:
        """One or more names after the flag; the variable holds them comma-separated."""
        self.parser.add_argument(
            flag, nargs="+", type=served_name, default=self.env_default(var, name_list, ()), metavar="NAME",
            help=f"{help} [env {var}, comma-separated]",
        )

    def switch(self, flag: str, var: str | None, help: str) -> None:
        suffix = f" [env {var}]" if var else ""
        self.parser.add_argument(
            flag, action="store_true", default=self.env_default(var, switch, False), help=help + suffix
        )


__all__ = [
    "PORT", "EnvError", "Flags", "HelpFormatter", "device_name", "float_in", "int_at_least", "name_list", "one_of",
    "served_name", "switch",
]
