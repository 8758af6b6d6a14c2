"""`make image-test`: build the CPU image (as `make image`: cached layers are reused), run it as its user and
check it serves: /readyz, a greedy completion, an embedding, gRPC health, then SIGTERM with a stream in
flight, which must run to its end before the server exits 0. Every wait is bounded; the container is
removed at the end, whatever happened. Prints the build's and each check's time.

    python deploy/tools/image_test.py [--tag lmserve:0.1.0-cpu] [--builder auto|docker|podman|buildah] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
from container import Container, start
from grpc_health.v1 import health_pb2, health_pb2_grpc
from image_build import DEFAULT_TAG, build, plan_build
from oci_builder import BuilderMissing, choose_builder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))  # lmload: the repository's free_port
from lmload.servers import free_port  # noqa: E402

READY_TIMEOUT_S = 600.0  # a cold start on a loaded 2-core machine (the chart's startup probe allows 15 min)
REQUEST_TIMEOUT_S = 120.0
DRAIN_REQUEST = {"prompt": "Count to one hundred:", "max_tokens": 64, "ignore_eos": True, "temperature": 0,
                 "stream": True}  # fmt: skip
DRAIN_EXIT_TIMEOUT_S = 180.0  # the image's drain timeout (LMSERVE_DRAIN_TIMEOUT_S default) and some slack
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
IMAGE_UID = 10001  # the image's USER


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_ready(container: Container, base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        check(container.is_running(), f"the container exited before it was ready:\n{container.log_tail()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise CheckFailed(f"/readyz not 200 after {READY_TIMEOUT_S:.0f} s:\n{container.log_tail()}")


def check_user(container: Container) -> str:
    uid = container.server_uid()
    check(uid == IMAGE_UID, f"the server runs as uid {uid}, not the image's {IMAGE_UID}")
    return f"uid {uid}"


def check_completion(base: str) -> str:
    model = httpx.get(f"{base}/v1/models", timeout=REQUEST_TIMEOUT_S).json()["data"][0]["id"]
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    check(response.status_code == 200, f"completion: {response.status_code} {response.text}")
    text = response.json()["choices"][0]["text"]
    check("Paris" in text, f"completion: {text!r} names no Paris")
    return f"{model}: {body['prompt']!r} -> {text!r}"


def check_embedding(base: str) -> str:
    body = {"input": ["The capital of France is Paris.", "Paris is the capital of France."]}
    response = httpx.post(f"{base}/v1/embeddings", json=body, timeout=REQUEST_TIMEOUT_S)
    check(response.status_code == 200, f"embedding: {response.status_code} {response.text}")
    data = response.json()
    vectors = [item["embedding"] for item in data["data"]]
    check(len(vectors) == 2 and all(len(v) == EMBEDDING_DIM for v in vectors), f"embedding: {len(vectors)} vectors")
    norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    cosine = sum(a * b for a, b in zip(*vectors)) / (norms[0] * norms[1])
    check(cosine > 0.8, f"embedding: two paraphrases have cosine {cosine:.3f}")
    return f"{data['model']}: 2 x {EMBEDDING_DIM} floats, paraphrase cosine {cosine:.3f}"


def check_grpc_health(container: Container) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    check(reply.status == health_pb2.HealthCheckResponse.SERVING, f"gRPC health: {reply}")
    return "SERVING"


def check_drain(container: Container, base: str) -> str:
    """SIGTERM once a stream has sent its first chunk: the stream runs to its length, then the server exits 0."""
    events: list[str] = []
    errors: list[BaseException] = []
    first = threading.Event()

    def read() -> None:
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=DRAIN_REQUEST, timeout=REQUEST_TIMEOUT_S) as resp:
                for line in resp.iter_lines():
                    if line:
                        events.append(line)
                        first.set()
        except httpx.HTTPError as error:
            errors.append(error)
        first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    check(first.wait(REQUEST_TIMEOUT_S) and not errors, f"stream: no first chunk {errors}")
    container.terminate()
    reader.join(DRAIN_EXIT_TIMEOUT_S)
    check(not reader.is_alive() and not errors, f"stream after SIGTERM: {errors or 'still running'}")
    check(events[-1] == "data: [DONE]", f"stream after SIGTERM ended with {events[-1:]}")
    finished = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    reasons = [c["finish_reason"] for chunk in finished for c in chunk.get("choices", []) if c.get("finish_reason")]
    check(reasons == ["length"], f"stream after SIGTERM: finish reasons {reasons} (want it run to its length)")
    status = container.wait(DRAIN_EXIT_TIMEOUT_S)
    check(status == 0, f"exit status {status} after SIGTERM:\n{container.log_tail()}")
    return f"stream of {DRAIN_REQUEST['max_tokens']} tokens ran to its end (finish_reason length); exit status 0"


def timed(label: str, step: Callable[[], str | None]) -> float:
    started = time.monotonic()
    detail = step()
    seconds = time.monotonic() - started
    print(f"image-test: {label}: {seconds:.1f} s" + (f" ({detail})" if detail else ""), flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--builder", choices=["auto", "docker", "podman", "buildah"], default="auto")
    parser.add_argument("--no-build", action="store_true", help="test the image as it is (already built)")
    args = parser.parse_args(argv)
    try:
        builder = choose_builder(args.builder)
        plan = None if args.no_build else plan_build(builder, args.tag, None)
    except BuilderMissing as error:
        print(f"image-test: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()
    if plan is not None:
        timed(f"build with {builder.name}", lambda: f"{build(plan):.1f} s in the builder")
    log = Path(tempfile.mkdtemp(prefix="lmserve-image-test-")) / "container.log"
    created = time.monotonic()
    container = start(builder, args.tag, free_port(), free_port(), log)
    print(f"image-test: container created ({builder.name}): {time.monotonic() - created:.1f} s", flush=True)
    base = f"http://127.0.0.1:{container.http_port}"
    try:
        timed("start to /readyz 200", lambda: wait_ready(container, base))
        timed("server's user", lambda: check_user(container))
        timed("completion", lambda: check_completion(base))
        timed("embedding", lambda: check_embedding(base))
        timed("gRPC health", lambda: check_grpc_health(container))
        timed("SIGTERM with a stream in flight", lambda: check_drain(container, base))
    except CheckFailed as failure:
        print(f"image-test: FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        container.remove()
        print(f"image-test: container log: {log}", flush=True)
    print(f"image-test: ok in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
