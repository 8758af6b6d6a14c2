"""service/lmserve/logs.py without a server: request ids, both formats, the root setup, and the CLI/env settings."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lmserve.cli import build_parser, serve_config_from_args
from lmserve.logs import REQUEST_ID, configure_logging, make_handler, resolve_request_id

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def test_resolve_request_id_keeps_valid_ids() -> None:
    assert resolve_request_id("abc-123") == "abc-123"
    assert resolve_request_id("with space/and:punct") == "with space/and:punct"
    assert resolve_request_id("x" * 128) == "x" * 128


@pytest.mark.parametrize("incoming", [None, "", "x" * 129, "caf\u00e9", "tab\there", "nul\x00", "bell\x07"])
def test_resolve_request_id_replaces_missing_or_invalid(incoming: str | None) -> None:
    new = resolve_request_id(incoming)
    assert HEX32.match(new), new
    assert new != resolve_request_id(incoming)  # fresh every time


@contextmanager
def _logger(name: str, log_format: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    logger = logging.getLogger(name)
    handler = make_handler(log_format, stream)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_json_lines_carry_request_id_and_extra_fields() -> None:
    with _logger("lmserve.test.json", "json") as (logger, stream):
        logger.info("outside")
        token = REQUEST_ID.set("rid-1")
        try:
            logger.warning("inside %d", 7, extra={"tokens": 3, "reasons": ["stop"], "text": "a\nb"})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        finally:
            REQUEST_ID.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the newline in a field and the traceback stay inside one line each
    outside, inside, failed = (json.loads(line) for line in lines)
    assert set(outside) == {"ts", "level", "logger", "msg"}
    assert outside["msg"] == "outside" and outside["level"] == "INFO" and outside["logger"] == "lmserve.test.json"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", outside["ts"])
    assert inside == {
        "ts": inside["ts"],
        "level": "WARNING",
        "logger": "lmserve.test.json",
        "msg": "inside 7",
        "request_id": "rid-1",
        "tokens": 3,
        "reasons": ["stop"],
        "text": "a\nb",
    }
    assert failed["request_id"] == "rid-1" and "ValueError: boom" in failed["exc_info"]


def test_text_lines() -> None:
    with _logger("lmserve.test.text", "text") as (logger, stream):
        logger.info("no request")
        token = REQUEST_ID.set("rid-2")
        try:
            logger.info("POST /x 200", extra={"status": 200, "path": "/x"})
        finally:
            REQUEST_ID.reset(token)
    first, second = stream.getvalue().splitlines()
    assert first.endswith(" INFO lmserve.test.text: no request")
    assert second.endswith(' INFO lmserve.test.text [rid-2]: POST /x 200 status=200 path="/x"')


def test_make_handler_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format"):
        make_handler("xml")


def test_configure_logging_owns_the_root_logger_and_uvicorn_goes_through_it() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        handler = configure_logging("json", "WARNING", stream)
        assert root.handlers == [handler] and root.level == logging.WARNING
        logging.getLogger("uvicorn.error").warning("port in use")
        logging.getLogger("lmserve.test").info("below the level")
        with pytest.raises(ValueError, match="log level"):
            configure_logging("json", "loud", stream)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["logger"] == "uvicorn.error" and json.loads(line)["msg"] == "port in use"


def test_serve_flags_and_env() -> None:
    env: dict[str, str] = {}
    config = serve_config_from_args(build_parser(env).parse_args(["serve"]), env)
    assert (config.log_format, config.log_level, config.log_prompts) == ("json", "info", False)
    assert config.otlp_endpoint is None

    args = ["serve", "--log-format", "text", "--log-level", "DEBUG", "--log-prompts"]
    config = serve_config_from_args(build_parser(env).parse_args(args), env)
    assert (config.log_format, config.log_level, config.log_prompts) == ("text", "debug", True)

    env = {
        "LMSERVE_LOG_FORMAT": "text",
        "LMSERVE_LOG_LEVEL": "warning",
        "LMSERVE_LOG_PROMPTS": "true",
        "LMSERVE_OTLP_ENDPOINT": "http://collector:4318",
    }
    config = serve_config_from_args(build_parser(env).parse_args(["serve"]), env)
    assert (config.log_format, config.log_level, config.log_prompts) == ("text", "warning", True)
    assert config.otlp_endpoint == "http://collector:4318"
    config = serve_config_from_args(build_parser(env).parse_args(["serve", "--log-format", "json"]), env)
    assert config.log_format == "json"  # a flag wins over its variable

    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["serve", "--log-format", "xml"])
