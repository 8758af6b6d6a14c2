"""The sweep's Locust user: streamed /v1/completions over a fixed list of prompts, shared by a point's users.

Each point is `concurrency` closed-loop users that take the point's prompts one by one until none is
left (as `vllm bench serve --max-concurrency C --num-prompts N` does), and record every request.
The request mirrors vllm bench's: the prompt, max_tokens, ignore_eos, repetition_penalty 1, stream
with usage, and the server's default sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from locust import task
from locust.exception import StopUser

from lmload.http_users import OpenAIUser
from lmload.prompts import Prompt
from lmload.records import RequestRecord


@dataclass
class SweepPoint:
    prompts: list[Prompt]
    fields: dict[str, Any]  # what every request carries besides its prompt
    records: list[RequestRecord] = field(default_factory=list)
    next_index: int = 0

    def take(self) -> Prompt | None:
        if self.next_index >= len(self.prompts):
            return None
        self.next_index += 1
        return self.prompts[self.next_index - 1]

    @property
    def is_done(self) -> bool:
        return len(self.records) >= len(self.prompts)


class SweepUser(OpenAIUser):
    abstract = True
    point: ClassVar[SweepPoint]

    @task
    def completion_stream(self) -> None:
        prompt = self.point.take()
        if prompt is None:
            raise StopUser()
        body = {**self.point.fields, "prompt": prompt.text}
        attempt = self.post_stream("completion stream", "/v1/completions", body, "completion")
        result = attempt.result
        if result is None:
            record = RequestRecord(attempt.start_s, attempt.done_s, error=attempt.error or "failed")
        else:
            record = RequestRecord(
                start_s=attempt.start_s,
                done_s=attempt.done_s,
                ttft_s=result.ttft_s,
                latency_s=result.latency_s,
                tpot_s=result.tpot_s,
                itl_s=tuple(result.itl_s),
                prompt_tokens=result.prompt_tokens,
                output_tokens=result.completion_tokens or result.num_token_chunks,
            )
        self.point.records.append(record)


def sweep_user_for(point: SweepPoint) -> type[SweepUser]:
    return type("SweepUser", (SweepUser,), {"point": point, "abstract": False})
