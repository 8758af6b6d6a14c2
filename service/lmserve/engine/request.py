"""One request's state inside the engine: token ids, progress, KV blocks."""

from __future__ import annotations

import time
from enum import Enum
from typing import TYPE_CHECKING

from lmserve.types import FinishReason, RequestTiming, SamplingParams

if TYPE_CHECKING:
    from lmserve.engine.grammar import GrammarMatcher
    from lmserve.engine.lora_registry import LoraAdapter
    from lmserve.engine.prompt_logprobs import PromptLogprobRow
    from lmserve.engine.prompt_lookup import PromptLookup


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV blocks freed; recomputed on re-admission
    FINISHED = "finished"


class Request:
    """A single sequence being generated.

    `token_ids` is prompt + output. The KV cache holds the first `num_computed_tokens` of them.
    A request is ready to sample when every token it has is computed (num_computed == num_tokens
    right after a step's forward), which then appends one sampled token.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        lora: LoraAdapter | None = None,
    ) -> None:
        assert prompt_token_ids, "a request needs at least one prompt token"
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.sampling = sampling
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens the prefix cache supplied at first admission
        self.block_ids: list[int] = []
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # The structured-output constraint's state: advanced once per appended output token, never by
        # recompute after preemption (recompute rebuilds KV only; the tokens, and so the state, stay).
        self.grammar: GrammarMatcher | None = None
        # Speculative decoding: up to this many draft tokens per step, proposed by `lookup` (None: off).
        self.lookup: PromptLookup | None = None
        self.num_speculative_tokens = 0
        # The LoRA adapter it runs with (None: the base), and its slot while admitted (-1: none held).
        self.lora = lora
        self.lora_slot = -1
        # With sampling.prompt_logprobs: the scores of prompt tokens 1, 2, ... (row p from position p's
        # logits), filled chunk by chunk as the prefill computes their positions; kept across a preemption.
        self.prompt_logprobs: list[PromptLogprobRow] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def max_num_tokens(self) -> int:
        """The most tokens this request can ever hold: prompt plus max_tokens."""
        return self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asks for prompt logprobs and some prompt position is still unscored (the prefix cache must
        not supply those positions: they would have no hidden states)."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def prompt_positions_to_score(self, start: int, end: int) -> range:
        """Of the positions [start, end) a step computes, those whose logits score a prompt token not yet
        scored: p scores token p + 1, so the prompt's last position (which predicts the first output) never."""
        if self.sampling.prompt_logprobs is None:
            return range(0)
        first = len(self.prompt_logprobs)
        assert start <= first or first >= self.num_prompt_tokens - 1, "prompt positions skipped"
        return range(max(start, first), min(end, self.num_prompt_tokens - 1))

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def max_drafts(self) -> int:
        """How many draft tokens this step may verify: its speculative setting, within max_tokens (the
        drafts and the token after them all become output) and nothing while the sampler would treat the
        drafted positions differently from the first (min_tokens still banning EOS, penalties that count
        the output so far, a grammar; logprobs of sampled tokens)."""
        if self.lookup is None or self.grammar is not None:
            return 0
        p = self.sampling
        if p.needs_penalties or self.num_output_tokens < p.min_tokens:
            return 0
        if not p.is_greedy and p.logprobs is not None:
            return 0  # rejection sampling reports no logprobs
        return min(self.num_speculative_tokens, p.max_tokens - self.num_output_tokens - 1)

    def check_stop(self, matched_stop: str | None = None) -> None:
        """The one place a sequence's end is decided, after each appended output token: a stop string the
        output text just completed (`matched_stop`, found by the engine's detokenizer), EOS, a stop token
        id, max_tokens, or a structured-output grammar that is complete. An abort ends it from outside,
        through Scheduler.finish_request.

        The first that holds wins, in that order. EOS and stop token ids count only from min_tokens on
        (the sampler keeps them out before then); a stop string always counts.
        """
        if matched_stop is not None:
            self.finish(FinishReason.STOP, matched_stop)
            return
        last = self.token_ids[-1]
        if self.num_output_tokens >= self.sampling.min_tokens:
            if not self.sampling.ignore_eos and last in self.eos_token_ids:
                self.finish(FinishReason.STOP, None)
                return
            if last in self.sampling.stop_token_ids:
                self.finish(FinishReason.STOP, last)
                return
        if self.num_output_tokens >= self.sampling.max_tokens:
            self.finish(FinishReason.LENGTH, None)
        elif self.grammar is not None and self.grammar.is_finished:
            self.finish(FinishReason.STOP, None)  # nothing but EOS could follow: the output is complete

    def timing(self, finished_time: float) -> RequestTiming:
        """Where this request's time went, for its finishing delta."""
        return RequestTiming(
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            finished_time=finished_time,
            num_preemptions=self.num_preemptions,
        )

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.stop_reason = stop_reason
        self.status = RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids})"
        )
