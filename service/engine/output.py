"""Turns one sequence's sampled tokens into client-facing deltas: text, stop strings, logprobs.

Per sampled token, around the scheduler's update (which decides whether the sequence ends):

    matched_stop = output.take(sampled)          # detokenize, match stop strings
    scheduler.update(..., {request_id: matched_stop})
    delta = output.delta(request, sampled)       # text, logprobs, and the finish reason the request got
"""

from __future__ import annotations

import time

from service.engine.request import Request
from service.engine.sampler import SampledToken
from service.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from service.types import FinishReason, GenerationDelta, TokenLogprob, TopLogprob


class SequenceOutput:
    """Per-request output state, owned by the engine thread."""

    def __init__(self, tokenizer: Tokenizer, request: Request, external_id: str) -> None:
        self.tokenizer = tokenizer
        self.external_id = external_id
        params = request.sampling
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self.stop_matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.wants_logprobs = params.logprobs is not None
        self._text = ""  # the text of the token `take` last saw, for its delta

    def take(self, sampled: SampledToken) -> str | None:
        """Detokenize a sampled token, before the scheduler appends it; returns the stop string its text
        completes, for Scheduler.update, which ends the request on it (Request.check_stop)."""
        text = self.detokenizer.step(sampled.token_id)
        if self.stop_matcher is None:
            self._text = text
            return None
        result = self.stop_matcher.feed(text)
        self._text = result.text_to_emit
        return result.stop

    def delta(self, request: Request, sampled: SampledToken) -> GenerationDelta:
        """The delta for the token `take` saw, once the scheduler has appended it (and perhaps ended the
        request: its finish reason is the delta's)."""
        text = self._text
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
            token_ids=[sampled.token_id],
            logprobs=[self._logprob(sampled)] if self.wants_logprobs else None,
            finish_reason=finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            timing=timing,
        )

    def final_delta(self, request: Request) -> GenerationDelta:
        """An empty closing delta for a request ended outside a step (abort, engine error)."""
        return GenerationDelta(
            request_id=self.external_id,
            text="",
            token_ids=[],
            finish_reason=request.finish_reason or FinishReason.ABORT,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            timing=request.timing(time.monotonic()),
        )

    def _logprob(self, sampled: SampledToken) -> TokenLogprob:
        ids = [sampled.token_id] + [tid for tid, _ in sampled.top_logprobs]
        strs = self.tokenizer.convert_ids_to_tokens(ids)
        top = tuple(
            TopLogprob(token_id=tid, token=s, logprob=lp)
            for (tid, lp), s in zip(sampled.top_logprobs, strs[1:], strict=True)
        )
        return TokenLogprob(token_id=sampled.token_id, token=strs[0], logprob=float(sampled.logprob or 0.0), top=top)
