"""The tool-call formats, by --tool-call-parser name (vLLM's names), and which one a chat template uses.

    fmt = tool_format(parser_name, chat_template)   # the named one, else the template's, else Hermes

Each is a ToolFormat (api/tool_calls.py): how tools reach the prompt, a streaming parser, and the grammar
for a required or named tool_choice. A template that renders none of them (SmolLM2's ignores `tools`)
gets the format's own description of the tools in a system message: Hermes, unless --tool-call-parser
names another.
"""

from __future__ import annotations

from lmserve.api.json_tool_calls import HERMES, LLAMA3_JSON, MISTRAL
from lmserve.api.pythonic_tool_calls import PythonicFormat
from lmserve.api.tool_calls import ToolFormat

PYTHONIC = PythonicFormat()
# In detection order: the first whose signs a template has is the template's.
TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, MISTRAL, LLAMA3_JSON, PYTHONIC)}
TOOL_CALL_PARSERS = tuple(TOOL_FORMATS)


def detect_tool_format(chat_template: str | None) -> ToolFormat | None:
    """The format the chat template writes tools and calls in; None when it shows none."""
    return next((f for f in TOOL_FORMATS.values() if f.renders_tools(chat_template)), None)


def tool_format(parser_name: str | None, chat_template: str | None) -> ToolFormat:
    if parser_name is not None:
        return TOOL_FORMATS[parser_name]
    return detect_tool_format(chat_template) or HERMES
