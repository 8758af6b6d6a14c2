"""What the users of one Locust process share: the settings and one prompt maker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmload.options import LoadSettings
from lmload.prompts import PromptMaker

_ATTRIBUTE = "lmserve_load_context"


@dataclass(frozen=True)
class LoadContext:
    settings: LoadSettings
    prompts: PromptMaker


def load_context(environment: Any) -> LoadContext:
    """The environment's context, made on first use: the tokenizer loads once per process, not per user."""
    context = getattr(environment, _ATTRIBUTE, None)
    if context is None:
        settings = LoadSettings.from_options(environment.parsed_options)
        context = LoadContext(settings, PromptMaker(settings.tokenizer, seed=None))
        setattr(environment, _ATTRIBUTE, context)
    return context


def attach_context(environment: Any, context: LoadContext) -> None:
    """For runs driven through Locust's Python API (no command line): the context the users will use."""
    setattr(environment, _ATTRIBUTE, context)
