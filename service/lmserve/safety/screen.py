"""A choice's output as its output guard lets it out, with the token ids and logprobs that go with it.

The generation stream (api/stream.py) runs every delta of a screened choice through `ScreenedChoice.screen`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from lmserve.safety.decisions import Decision
from lmserve.safety.guard import OutputGuard
from lmserve.types import FinishReason, GenerationDelta, TokenLogprob


@dataclass
class ScreenedChoice:
    """A choice's output as its guard lets it out. Token ids and logprobs are held with the text they
    belong to and released once the guard holds nothing back, if what it released is exactly the text
    they make; where it redacted or stripped anything among them they are dropped, so no token-level
    field carries what the text withholds."""

    guard: OutputGuard
    report: Callable[[list[Decision]], None]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    fed: list[str] = field(default_factory=list)  # raw text of the held tokens
    released: list[str] = field(default_factory=list)  # what the guard let out since they were held

    def screen(self, delta: GenerationDelta) -> GenerationDelta:
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.fed.append(delta.text)
        steps = [self.guard.feed(delta.text)]
        if steps[0].blocked is None and delta.finish_reason is not None:
            steps.append(self.guard.finish())
        text = ""
        blocked = None
        for step in steps:
            self.report(step.decisions)
            text += step.text
            blocked = blocked or step.blocked
        self.released.append(text)
        out = replace(delta, text=text, token_ids=[], logprobs=[] if delta.logprobs is not None else None)
        if blocked is not None:
            return replace(out, finish_reason=FinishReason.CONTENT_FILTER, stop_reason=None)
        if not self.guard.is_holding or delta.finish_reason is not None:
            if "".join(self.released) == "".join(self.fed):  # released unchanged: its tokens go with it
                out.token_ids = self.token_ids
                out.logprobs = self.logprobs if delta.logprobs is not None else None
            self.token_ids, self.logprobs, self.fed, self.released = [], None, [], []
        return out


