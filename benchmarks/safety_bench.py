"""What the safety filter adds to a request: input checks on 100- and 4,000-character prompts, and the
streaming output guard per delta, each against a peer measured in the same run.

    .venv/bin/python benchmarks/safety_bench.py [--requests 300] [--policy FILE]

- Input: `check_input([prompt])` per request, p50 and p99 over `--requests` prompts of each length
  (prose with some numbers and code, and one email in ten). Peer: the SmolLM2 tokenizer's `encode` of
  the same prompt, which every generation request pays anyway.
- Output: a 4,000-character answer streamed in the tokenizer's own tokens (about 4 characters each),
  `guard.feed` per delta, p50 and p99, and per whole answer; with the default policy (`stream: word`:
  the classifiers score the sentence so far at every word), with `stream: hold` (whole sentences), and
  with span patterns only. Peer: `json.dumps` of the OpenAI chunk the HTTP layer
  serialises for every delta.
- Classifier: one sentence through ToxicityModel against alt-profanity-check's own `predict_prob`.
Bounded: fixed counts, one warm-up pass. Figures drift with the machine's load; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmserve.safety import SafetyFilter  # noqa: E402
from lmserve.safety.policy import default_policy_text, parse_policy  # noqa: E402

WORDS = (
    "the model serves requests from many clients while the scheduler batches prefill and decode steps "
    "under a token budget so that latency stays low and throughput high across the paged cache of keys "
    "and values which the runner reads for every sequence in the batch before sampling the next token"
).split()
SNIPPETS = (
    "In 2024 revenue grew 12% to $4.2M.",
    "Call the function with n=16 and retry 3 times.",
    "def add(a, b):\n    return a + b\n",
    "See section 4.2 and table 7 for details.",
    "The meeting is at 10:30 in room 1204.",
)


def make_text(length: int, rng: random.Random, with_email: bool) -> str:
    parts: list[str] = []
    size = 0
    while size < length:
        if rng.random() < 0.15:
            part = rng.choice(SNIPPETS)
        else:
            sentence = " ".join(rng.choices(WORDS, k=rng.randint(6, 18)))
            part = sentence[0].upper() + sentence[1:] + "."
        parts.append(part)
        size += len(part) + 1
    if with_email:
        parts.insert(rng.randrange(len(parts)), "Write to jane.doe@gmail.com for access.")
    return " ".join(parts)[:length]


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_tokenizer():  # -> tokenizers.Tokenizer | None
    try:
        from tokenizers import Tokenizer

        from lmserve.checkpoints import resolve_model
        from lmserve.config import default_cache_dir

        path = resolve_model("smollm2-135m-instruct", default_cache_dir()).path
        return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    except Exception as exc:  # the peer is optional: the bundled model may not be installed
        print(f"(no tokenizer peer: {exc})")
        return None


def bench_input(safety: SafetyFilter, tokenizer, num_requests: int) -> None:
    rng = random.Random(0)
    print("\ninput check per request (check_input of one prompt)")
    print(f"{'chars':>6} {'filter p50':>11} {'p99':>9} {'tokenize p50':>13} {'p99':>9} {'filter/tokenize':>16}")
    for length in (100, 4000):
        prompts = [make_text(length, rng, i % 10 == 0) for i in range(num_requests)]
        for prompt in prompts[:10]:  # warm-up
            safety.check_input([prompt])
        filt = [timed(lambda p=p: safety.check_input([p])) for p in prompts]
        f50, f99 = percentiles(filt)
        line = f"{length:>6} {f50 * 1e3:>9.3f}ms {f99 * 1e3:>7.3f}ms"
        if tokenizer is not None:
            tok = [timed(lambda p=p: tokenizer.encode(p)) for p in prompts]
            t50, t99 = percentiles(tok)
            line += f" {t50 * 1e3:>11.3f}ms {t99 * 1e3:>7.3f}ms {f50 / t50:>15.1f}x"
        print(line)


def bench_output(name: str, safety: SafetyFilter, deltas: list[str], num_outputs: int) -> None:
    chunk = {
        "id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "smollm2-135m-instruct", "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}],
    }
    feeds: list[float] = []
    serialise: list[float] = []
    totals: list[float] = []
    released = ""
    for run in range(num_outputs + 1):  # run 0 warms up
        guard = safety.output_guard()
        run_feeds = []
        out = []
        for delta in deltas:
            start = time.perf_counter()
            step = guard.feed(delta)
            run_feeds.append(time.perf_counter() - start)
            out.append(step.text)
            chunk["choices"][0]["delta"]["content"] = delta
            start = time.perf_counter()
            json.dumps(chunk)
            serialise.append(time.perf_counter() - start)
        start = time.perf_counter()
        out.append(guard.finish().text)
        finish_s = time.perf_counter() - start
        if run > 0:
            feeds += run_feeds
            totals.append(sum(run_feeds) + finish_s)
        released = "".join(out)
    f50, f99 = percentiles(feeds)
    s50, _ = percentiles(serialise)
    print(
        f"{name:<24} {f50 * 1e6:>7.1f}us {f99 * 1e6:>7.1f}us {statistics.median(totals) * 1e3:>8.2f}ms"
        f" {s50 * 1e6:>9.1f}us {f50 / s50:>10.1f}x  ({len(deltas)} deltas, {len(released)} chars out)"
    )


def bench_classifier(safety: SafetyFilter) -> None:
    from profanity_check import predict_prob

    sentence = "The scheduler batches prefill and decode steps under a token budget so latency stays low."
    ours = [timed(lambda: safety.toxicity.score(sentence)) for _ in range(300)]
    wheel = [timed(lambda: predict_prob([sentence])) for _ in range(100)]
    o50, _ = percentiles(ours)
    w50, _ = percentiles(wheel)
    print(f"\nclassifier per sentence: ToxicityModel {o50 * 1e6:.1f}us, alt-profanity-check predict_prob "
          f"{w50 * 1e6:.1f}us ({w50 / o50:.0f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="prompts per length")
    parser.add_argument("--outputs", type=int, default=20, help="streamed answers per policy")
    parser.add_argument("--policy", type=Path, default=None, help="policy file (default: the packaged one)")
    args = parser.parse_args()

    start = time.perf_counter()
    safety = SafetyFilter.from_policy(args.policy)
    print(f"filter built in {time.perf_counter() - start:.2f} s (policy {safety.policy.source})")
    spans_only = SafetyFilter(
        parse_policy("categories:\n  secrets: {output: redact}\n  pii: {output: redact}\n  unicode: {output: strip}\n"),
        safety.toxicity,
    )
    tokenizer = load_tokenizer()
    bench_input(safety, tokenizer, args.requests)

    answer = make_text(4000, random.Random(1), with_email=True)
    if tokenizer is not None:
        encoding = tokenizer.encode(answer, add_special_tokens=False)
        deltas = [answer[a:b] for a, b in encoding.offsets]
        deltas = [d for d in deltas if d]
        if "".join(deltas) != answer:  # offsets skip nothing in plain text; fall back if they did
            deltas = [answer[i : i + 4] for i in range(0, len(answer), 4)]
    else:
        deltas = [answer[i : i + 4] for i in range(0, len(answer), 4)]
    print("\noutput guard per delta (a 4,000-character answer)")
    print(f"{'policy':<24} {'feed p50':>9} {'p99':>9} {'per answer':>10} {'json p50':>11} {'feed/json':>10}")
    hold = SafetyFilter(
        parse_policy(default_policy_text().replace("stream: word", "stream: hold"), "hold"), safety.toxicity
    )
    bench_output("default (word)", safety, deltas, args.outputs)
    bench_output("default, stream: hold", hold, deltas, args.outputs)
    bench_output("span patterns only", spans_only, deltas, args.outputs)
    bench_classifier(safety)


if __name__ == "__main__":
    main()
