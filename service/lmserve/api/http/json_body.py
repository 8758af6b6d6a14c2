"""Checks on a raw JSON request body that the JSON parser and pydantic do not make, or make with an
unhelpful message: bytes that are not UTF-8, nesting deeper than any real request needs, and escaped
lone surrogates (valid JSON, but text no UTF-8 encoder, tokenizer or log line can handle).

    error = check_json_body(body)   # an APIError(400, invalid_json) to answer with, or None

Cheap on ordinary bodies: a strict UTF-8 decode and two byte counts; the exact scans run only when
the counts say they might find something.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmserve.api.errors import APIError

# Deeper than any schema, tool definition or chat message list needs; Python's own JSON parser fails
# with a RecursionError near 1,000, and code that walks a schema recursively would fail far earlier.
MAX_JSON_DEPTH = 64

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_OPENERS = frozenset(b"[{")
_CLOSERS = frozenset(b"]}")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in `body`, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif byte in _CLOSERS:
            depth -= 1
    return deepest


def _lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed body a string holds a lone surrogate ('' for the top level), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "(the body)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate_path(key, path) or _lone_surrogate_path(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate_path(item, f"{path}[{i}]")
            if found:
                return found
    return None


def check_json_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> APIError | None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return APIError(
            f"The request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at position {exc.start} "
            "cannot start or continue a character. JSON bodies must be UTF-8.",
            "invalid_json",
        )
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        return APIError(
            f"The request body nests arrays or objects more than {max_depth} levels deep; "
            f"this server accepts at most {max_depth}.",
            "invalid_json",
        )
    if _SURROGATE_ESCAPE.search(body):
        try:
            parsed = json.loads(body)
        except ValueError:
            return None  # not JSON at all: the parser's own error says where
        where = _lone_surrogate_path(parsed)
        if where is not None:
            return APIError(
                f"'{where}' holds an escaped lone surrogate (a \\ud800-\\udfff escape not part of a pair), "
                "which is not a Unicode character.",
                "invalid_json",
                None if where == "(the body)" else where,
            )
    return None


__all__ = ["MAX_JSON_DEPTH", "check_json_body", "json_depth"]
