"""Structured-output requests, from either transport's fields to the engine's one `StructuredOutput`.

Two spellings reach the same constraint:
- OpenAI's `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
  "schema", "strict", "description"}}`;
- vLLM's `structured_outputs`: exactly one of `json` (a schema), `regex`, `choice`, `grammar` (Lark or
  GBNF) or `json_object: true` (vLLM >= 0.12 names; its old `guided_*` fields are gone there too).

Only the shape is checked here; the size (LimitsConfig.max_grammar_bytes) in generation.check_generation,
and whether the grammar compiles in the engine's `check_request` (a 400 naming the field every time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmserve.api.errors import APIError
from lmserve.types import ConstraintKind, StructuredOutput

MAX_CHOICES = 1024


@dataclass(frozen=True)
class ResponseFormatInput:
    """OpenAI's response_format, as parsed by a transport."""

    type: str
    json_schema: dict[str, Any] | None = None  # the schema itself (json_schema.schema)
    has_json_schema: bool = False  # json_schema was given (a schema-less one is allowed: any JSON object)


@dataclass(frozen=True)
class StructuredOutputsInput:
    """vLLM's structured_outputs, as parsed by a transport (None: not given)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def json_object(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """A JSON object (a schema, a tool's parameters) given as one or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(f"{param} is not valid JSON: {exc}.", "invalid_value", param) from None
    if not isinstance(value, dict):
        raise APIError(f"{param} must be a JSON object.", "invalid_value", param)
    return value


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    return json.dumps(json_object(schema, param), separators=(",", ":"))


def from_response_format(fmt: ResponseFormatInput | None) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(ConstraintKind.JSON_OBJECT, param="response_format")
    if fmt.type == "json_schema":
        param = "response_format.json_schema.schema"
        if not fmt.has_json_schema:
            raise APIError("response_format of type json_schema needs a 'json_schema' object.", "missing_field", "response_format.json_schema")
        if fmt.json_schema is None:
            return StructuredOutput(ConstraintKind.JSON_OBJECT, param=param)
        return StructuredOutput(ConstraintKind.JSON_SCHEMA, _schema_text(fmt.json_schema, param), param=param)
    raise APIError(
        f"response_format type '{fmt.type}' is not supported; use 'text', 'json_object' or 'json_schema'.",
        "invalid_value",
        "response_format.type",
    )


def from_structured_outputs(so: StructuredOutputsInput | None) -> StructuredOutput | None:
    if so is None:
        return None
    given = [
        name
        for name, value in (("json", so.json), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar))
        if value is not None
    ] + (["json_object"] if so.json_object else [])
    if len(given) > 1:
        raise APIError(
            f"structured_outputs takes exactly one constraint, got {', '.join(given)}.", "invalid_value", "structured_outputs"
        )
    if not given:
        if so.json_object is False:
            return None
        raise APIError(
            "structured_outputs needs one of json, regex, choice, grammar or json_object.", "invalid_value", "structured_outputs"
        )
    kind = given[0]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        assert so.json is not None
        return StructuredOutput(ConstraintKind.JSON_SCHEMA, _schema_text(so.json, param), param=param)
    if kind == "regex":
        assert so.regex is not None
        if not so.regex:
            raise APIError("structured_outputs.regex must not be empty.", "invalid_value", param)
        return StructuredOutput(ConstraintKind.REGEX, so.regex, param=param)
    if kind == "choice":
        assert so.choice is not None
        if not so.choice or len(so.choice) > MAX_CHOICES or not all(isinstance(c, str) and c for c in so.choice):
            raise APIError(
                f"structured_outputs.choice must be 1 to {MAX_CHOICES} non-empty strings.", "invalid_value", param
            )
        return StructuredOutput(ConstraintKind.CHOICE, json.dumps(so.choice), param=param)
    if kind == "grammar":
        assert so.grammar is not None
        if not so.grammar.strip():
            raise APIError("structured_outputs.grammar must not be empty.", "invalid_value", param)
        return StructuredOutput(ConstraintKind.GRAMMAR, so.grammar, param=param)
    return StructuredOutput(ConstraintKind.JSON_OBJECT, param=param)


def resolve_structured(
    response_format: ResponseFormatInput | None, structured_outputs: StructuredOutputsInput | None
) -> StructuredOutput | None:
    """The request's one constraint; both spellings at once is a 400."""
    a = from_response_format(response_format)
    b = from_structured_outputs(structured_outputs)
    if a is not None and b is not None:
        raise APIError(
            "Give response_format or structured_outputs, not both.", "invalid_value", "structured_outputs"
        )
    return a or b
