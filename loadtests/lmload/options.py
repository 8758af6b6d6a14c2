"""The scenarios' settings: Locust command-line arguments (with environment variables) -> LoadSettings.

Registered on Locust's parser by locustfile.py; `--host` (Locust's own) is the HTTP base URL. The
defaults live in the dataclasses below, once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmload.outcome import Ending, judge_ending


@dataclass(frozen=True)
class OverloadSettings:
    peak_users: int = 320  # past lmserve's default max_queue of 256
    step_users: int = 32
    step_s: float = 10.0
    hold_s: float = 30.0


@dataclass(frozen=True)
class LoadSettings:
    model: str | None = None  # None: leave `model` out of requests (lmserve then uses its own)
    embedding_model: str | None = None
    prompt_tokens: int = 128
    output_tokens: int = 128
    ignore_eos: bool = True
    temperature: float | None = None  # None: the server's default
    tokenizer: Path | None = None
    embedding_inputs: int = 4
    embedding_tokens: int = 64
    think_time_s: float = 0.0
    api_key: str | None = None
    grpc_target: str | None = None
    overload: OverloadSettings = field(default_factory=OverloadSettings)

    @classmethod
    def from_options(cls, options: Any) -> LoadSettings:
        for name in ("prompt_tokens", "output_tokens", "embedding_inputs", "embedding_tokens"):
            if getattr(options, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        return cls(
            model=options.model or None,
            embedding_model=options.embedding_model or None,
            prompt_tokens=options.prompt_tokens,
            output_tokens=options.output_tokens,
            ignore_eos=options.ignore_eos,
            temperature=options.temperature,
            tokenizer=Path(options.tokenizer) if options.tokenizer else None,
            embedding_inputs=options.embedding_inputs,
            embedding_tokens=options.embedding_tokens,
            think_time_s=max(0.0, options.think_time),
            api_key=options.api_key or None,
            grpc_target=options.grpc_target or None,
            overload=OverloadSettings(
                peak_users=options.overload_peak_users,
                step_users=max(1, options.overload_step_users),
                step_s=options.overload_step_seconds,
                hold_s=options.overload_hold_seconds,
            ),
        )

    @property
    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def generation_fields(self) -> dict[str, Any]:
        """Fields shared by completion and chat requests (HTTP JSON and gRPC messages alike)."""
        body: dict[str, Any] = {"max_tokens": self.output_tokens}
        if self.model:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def ending(self, finish_reason: str, completion_tokens: int | None) -> Ending:
        """How a served generation of this run ended, judged against its max_tokens and ignore_eos."""
        return judge_ending(finish_reason, completion_tokens, max_tokens=self.output_tokens, ignore_eos=self.ignore_eos)


def add_arguments(parser: Any) -> None:
    """`parser` is Locust's (configargparse: `env_var` and `is_secret` are its keywords). Straight on the
    parser, not in a group: only Locust's own add_argument knows is_secret."""
    d, o = LoadSettings(), OverloadSettings()
    parser.add_argument("--model", default="", env_var="LMSERVE_LOAD_MODEL",
                        help="generation model name sent in requests (empty: leave it out; lmserve then uses its own)")
    parser.add_argument("--embedding-model", default="", env_var="LMSERVE_LOAD_EMBEDDING_MODEL",
                        help="embedding model name sent in requests (empty: leave it out)")
    parser.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens,
                        help="prompt length in tokens (in words without --tokenizer)")
    parser.add_argument("--output-tokens", type=int, default=d.output_tokens, help="max_tokens of each generation request")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=d.ignore_eos,
                        help="generate exactly --output-tokens tokens (a response with fewer fails, unless the "
                             "safety filter ended it: content_filter)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (default: the server's)")
    parser.add_argument("--tokenizer", default="", help="a model folder with tokenizer.json, for exact prompt lengths")
    parser.add_argument("--embedding-inputs", type=int, default=d.embedding_inputs, help="inputs in each embeddings request")
    parser.add_argument("--embedding-tokens", type=int, default=d.embedding_tokens, help="length of each embedding input")
    parser.add_argument("--think-time", type=float, default=d.think_time_s,
                        help="seconds a user waits between its requests (0: closed loop)")
    parser.add_argument("--api-key", default="", env_var="LMSERVE_API_KEY", is_secret=True,
                        help="sent as Authorization: Bearer KEY (HTTP) and authorization metadata (gRPC)")
    parser.add_argument("--grpc-target", default="", env_var="LMSERVE_GRPC_TARGET",
                        help="host:port of lmserve's gRPC API; GrpcUser is not spawned without it")
    parser.add_argument("--overload-peak-users", type=int, default=o.peak_users, help="OverloadShape: users at the top")
    parser.add_argument("--overload-step-users", type=int, default=o.step_users, help="OverloadShape: users added a step")
    parser.add_argument("--overload-step-seconds", type=float, default=o.step_s, help="OverloadShape: seconds a step")
    parser.add_argument("--overload-hold-seconds", type=float, default=o.hold_s, help="OverloadShape: seconds at the top")
