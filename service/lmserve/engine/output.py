"""Turns one sequence's sampled tokens into client-facing deltas: text, stop strings, logprobs.

Per step, around the scheduler's update (which decides whether the sequence ends):

    scheduler.update(..., take=lambda req, token_id: output.take(token_id))   # detokenize, match stops
    delta = output.delta(request, sampled)      # the tokens taken: text, logprobs, and the finish reason

A step gives a sequence one token, or several where it verified speculative drafts; `take` sees only
those the sequence keeps (none after the one that ends it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lmserve.engine.request import Request
from lmserve.engine.sampler import SampledToken
from lmserve.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from lmserve.types import GenerationDelta, PromptLogprob, TokenLogprob, TopLogprob


class SequenceOutput:
    """Per-request output state, owned by the engine thread."""

    def __init__(self, tokenizer: Tokenizer, request: Request, external_id: str) -> None:
        self.tokenizer = tokenizer
        self.external_id = external_id
        params = request.sampling
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self.stop_matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.wants_logprobs = params.logprobs is not None
        self.owes_prompt_logprobs = params.prompt_logprobs is not None  # until the first delta carries them
        self._text = ""  # the text of the tokens `take` saw since the last delta
        self._num_taken = 0

    def take(self, token_id: int) -> str | None:
        """Detokenize a sampled token, just before the scheduler appends it; returns the stop string its
        text completes, on which the scheduler ends the request (Request.check_stop)."""
        self._num_taken += 1
        text = self.detokenizer.step(token_id)
        if self.stop_matcher is None:
            self._text += text
            return None
        result = self.stop_matcher.feed(text)
        self._text += result.text_to_emit
        return result.stop

    def delta(self, request: Request, sampled: Sequence[SampledToken]) -> GenerationDelta:
        """The delta for the tokens `take` saw since the last one (the first of `sampled`), once the
        scheduler has appended them (and perhaps ended the request: its finish reason is the delta's)."""
        kept = sampled[: self._num_taken]
        text = self._text
        self._text = ""
        self._num_taken = 0
        finish_reason = request.finish_reason
        timing = None
        if finish_reason is not None:
            if self.stop_matcher is not None and self.stop_matcher.stopped is None:
                text += self.stop_matcher.flush()  # ended otherwise: what was held back for a stop string
            # Read the clock only for the one delta per sequence that carries its timing.
            timing = request.timing(time.monotonic())
        return GenerationDelta(
            request_id=self.external_id,
            text=text,
            token_ids=[t.token_id for t in kept],
            logprobs=[self._logprob(t) for t in kept] if self.wants_logprobs else None,
            finish_reason=finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            timing=timing,
            prompt_logprobs=self._prompt_logprobs(request) if self.owes_prompt_logprobs and kept else None,
        )

    def _prompt_logprobs(self, request: Request) -> list[PromptLogprob | None]:
        """The prompt's scores, once, on the first delta with tokens (the prompt is scored by then)."""
        self.owes_prompt_logprobs = False
        rows = request.prompt_logprobs
        assert len(rows) == request.num_prompt_tokens - 1, "prompt logprobs incomplete at the first token"
        strs = self.tokenizer.convert_ids_to_tokens(
            [i for row in rows for i in (row.token_id, *(tid for tid, _ in row.top))]
        )
        out: list[PromptLogprob | None] = [None]
        at = 0
        for row in rows:
            token, top_strs = strs[at], strs[at + 1 : at + 1 + len(row.top)]
            at += 1 + len(row.top)
            top = tuple(TopLogprob(tid, s, lp) for (tid, lp), s in zip(row.top, top_strs, strict=True))
            out.append(PromptLogprob(row.token_id, token, row.logprob, row.rank, top))
        return out

    def _logprob(self, sampled: SampledToken) -> TokenLogprob:
        ids = [sampled.token_id] + [tid for tid, _ in sampled.top_logprobs]
        strs = self.tokenizer.convert_ids_to_tokens(ids)
        top = tuple(
            TopLogprob(token_id=tid, token=s, logprob=lp)
            for (tid, lp), s in zip(sampled.top_logprobs, strs[1:], strict=True)
        )
        return TokenLogprob(token_id=sampled.token_id, token=strs[0], logprob=float(sampled.logprob or 0.0), top=top)
