"""Locust users of the OpenAI-compatible HTTP API: streamed chat, completions, embeddings, tokenization.

Every user waits --think-time seconds between its requests (0, the default: closed loop). A served
generation is reported under its name when it ran to max_tokens (finish_reason length), and under
"NAME [stop]" or "NAME [content_filter]" when it ended otherwise (outcome.judge_ending): a stream the
safety filter ended is counted apart, as a success, not as a truncation. A stream that ran to its end
(length or stop) also gives entries of their own for its time to first token ("TTFT") and each
inter-token latency ("ITL"); locustfile.py keeps those, and the embeddings and tokenize entries, out of
Locust's Aggregated row. 429/503 with Retry-After are recorded under "NAME [429|503 expected]" as
successes, and the user waits out Retry-After (at most outcome.MAX_BACKOFF_S); any other non-200, a
truncated or malformed stream, or a body that fails its check is a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser, tag, task

from lmload.checks import check_completion, check_detokenize, check_embeddings, check_tokenize, completion_ending
from lmload.context import LoadContext, load_context
from lmload.outcome import Ending, Outcome, Verdict, classify_status
from lmload.sse import OpenAIStreamReader, StreamError, StreamKind, StreamResult

_MAX_DRAIN_LINES = 100_000  # a failed stream is read to its end (bounded) so its connection is reusable


@dataclass(frozen=True)
class StreamAttempt:
    start_s: float  # perf_counter
    done_s: float
    result: StreamResult | None  # None: rejected or failed
    error: str | None  # why not served ("HTTP 503" for an expected rejection); None when served


class OpenAIUser(FastHttpUser):
    abstract = True
    opt_in: ClassVar[bool] = False  # True: locustfile.py spawns it only when asked for (lmload.entries)
    network_timeout = 300.0  # a long generation under heavy load is slow, not failed
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.ctx: LoadContext = load_context(self.environment)

    def wait_time(self) -> float:
        return self.ctx.settings.think_time_s

    def _fire(self, request_type: str, name: str, response_time_ms: float) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=response_time_ms,
            response_length=0,
            exception=None,
            context=self.context(),
        )

    def _triage(self, resp: Any, name: str) -> Verdict:
        """A 200 is SERVED and left to the caller to read and mark; anything else is marked here."""
        status = resp.status_code
        if status == 200:
            return Verdict(Outcome.SERVED)
        body = "" if status == 0 else str(resp.text or "")
        verdict = classify_status(status, resp.headers or {}, body or repr(getattr(resp, "error", None)))
        if verdict.outcome is Outcome.REJECTED:
            resp.request_meta["name"] = f"{name} [{status} expected]"
            resp.success()
        else:
            resp.failure(verdict.reason)
        return verdict

    def post_json(
        self,
        name: str,
        path: str,
        body: dict[str, Any],
        check: Callable[[Any], str | None],
        ending: Callable[[Any], Ending] | None = None,
    ) -> Any | None:
        """POST a JSON body; the parsed response when served and `check` finds nothing wrong. `ending`
        (generations): how the body ended, which names its entry or makes it a failure."""
        result = None
        with self.client.post(
            path, json=body, name=name, headers=self.ctx.settings.http_headers, catch_response=True
        ) as resp:
            verdict = self._triage(resp, name)
            if verdict.outcome is Outcome.SERVED:
                try:
                    data = resp.json()
                except ValueError:
                    resp.failure(f"response is not JSON: {str(resp.text)[:80]!r}")
                else:
                    problem = check(data)
                    end = ending(data) if ending is not None and not problem else None
                    if end is not None and end.problem:
                        problem = end.problem
                    if problem:
                        resp.failure(problem)
                    else:
                        if end is not None:
                            resp.request_meta["name"] = end.entry(name)
                        resp.success()
                        result = data
        gevent.sleep(verdict.backoff_s)
        return result

    def post_stream(self, name: str, path: str, body: dict[str, Any], kind: StreamKind) -> StreamAttempt:
        """POST a streamed generation and read it to its end. Served, it is reported under the entry of its
        ending; when it ran to its end (not filtered), TTFT and each ITL are fired as entries of their own."""
        headers = {**self.ctx.settings.http_headers, "Accept": "text/event-stream", "Accept-Encoding": "identity"}
        result: StreamResult | None = None
        ending: Ending | None = None
        error: str | None = None
        start = time.perf_counter()
        with self.client.post(path, json=body, name=name, headers=headers, stream=True, catch_response=True) as resp:
            verdict = self._triage(resp, name)
            if verdict.outcome is Outcome.SERVED:
                reader = OpenAIStreamReader(kind, start)
                try:
                    stream = resp.stream
                    while line := stream.readline(b"\n"):
                        reader.feed_line(line)
                    result = reader.finish()
                except StreamError as exc:
                    error = f"stream: {exc}"
                    _drain(resp)
                except Exception as exc:  # the connection broke mid-stream
                    error = f"stream: broke after {reader.num_token_chunks} token chunks: {exc!r}"
                else:
                    ending = self.ctx.settings.ending(result.finish_reason, result.completion_tokens)
                    if ending.problem:
                        error = f"stream: {ending.problem}"
                if error is None:
                    assert ending is not None
                    resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
                    resp.request_meta["name"] = ending.entry(name)
                    resp.success()
                else:
                    result = ending = None
                    resp.failure(error)
            else:
                error = verdict.reason
        done = time.perf_counter()
        if result is not None and ending is not None and not ending.filtered:
            self._fire("TTFT", name, result.ttft_s * 1000)
            for gap in result.itl_s:
                self._fire("ITL", name, gap * 1000)
        gevent.sleep(verdict.backoff_s)
        return StreamAttempt(start, done, result, error)


def _drain(resp: Any) -> None:
    try:
        for _ in range(_MAX_DRAIN_LINES):
            if not resp.stream.readline(b"\n"):
                return
    except Exception:
        return


class ChatStreamUser(OpenAIUser):
    """Streamed chat completions: "chat stream" (whole request), its TTFT and ITL entries."""

    @tag("generation")
    @task
    def chat_stream(self) -> None:
        s = self.ctx.settings
        prompt = self.ctx.prompts.make(s.prompt_tokens)
        body = {
            **s.generation_fields(),
            "messages": [{"role": "user", "content": prompt.text}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.post_stream("chat stream", "/v1/chat/completions", body, "chat")


class CompletionUser(OpenAIUser):
    """Non-streamed completions."""

    @tag("generation")
    @task
    def completion(self) -> None:
        s = self.ctx.settings
        body = {**s.generation_fields(), "prompt": self.ctx.prompts.make(s.prompt_tokens).text}
        self.post_json("completion", "/v1/completions", body, check_completion, lambda d: completion_ending(d, s))


class EmbeddingsUser(OpenAIUser):
    """Embeddings of --embedding-inputs inputs a request."""

    @tag("embeddings")
    @task
    def embeddings(self) -> None:
        s = self.ctx.settings
        inputs = [self.ctx.prompts.make(s.embedding_tokens).text for _ in range(s.embedding_inputs)]
        body: dict[str, Any] = {"input": inputs}
        if s.embedding_model:
            body["model"] = s.embedding_model
        self.post_json("embeddings", "/v1/embeddings", body, lambda d: check_embeddings(d, len(inputs)))


class TokenizeUser(OpenAIUser):
    """/tokenize then /detokenize of the tokens it got back (the text must survive the round trip).

    Opt-in: in a closed loop it makes thousands of cheap calls that take the CPU from generation."""

    opt_in = True

    @tag("tokenize")
    @task
    def tokenize(self) -> None:
        s = self.ctx.settings
        text = self.ctx.prompts.make(s.prompt_tokens).text
        model = {"model": s.model} if s.model else {}
        data = self.post_json("tokenize", "/tokenize", {**model, "prompt": text}, check_tokenize)
        if data is not None:
            body = {**model, "tokens": data["tokens"]}
            self.post_json("detokenize", "/detokenize", body, lambda d: check_detokenize(d, text))
