"""Turns one sequence's sampled tokens into client-facing deltas: text, stop strings, logprobs."""

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

    def process(self, request: Request, sampled: SampledToken) -> tuple[GenerationDelta, str | None]:
        """Build the delta for the token just appended to `request`.

        Returns the delta and the stop string matched (the caller finishes the request on a match;
        the delta already carries finish_reason STOP for it).
        """
        text = self.detokenizer.step(sampled.token_id)
        matched: str | None = None
        if self.stop_matcher is not None:
            result = self.stop_matcher.feed(text)
            text, matched = result.text_to_emit, result.stop
            if matched is None and request.is_finished:
                text += self.stop_matcher.flush()
        finish_reason, stop_reason = request.finish_reason, request.stop_reason
        if matched is not None:
            finish_reason, stop_reason = FinishReason.STOP, matched
        # Read the clock only for the one delta per sequence that carries its timing.
        timing = request.timing(time.monotonic()) if finish_reason is not None else None
        return (
            GenerationDelta(
                request_id=self.external_id,
                text=text,
                token_ids=[sampled.token_id],
                logprobs=[self._logprob(sampled)] if self.wants_logprobs else None,
                finish_reason=finish_reason,
                stop_reason=stop_reason,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                num_cached_tokens=request.num_cached_tokens,
                timing=timing,
            ),
            matched,
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
