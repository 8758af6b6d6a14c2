"""A real lmserve, started the way a pod of the chart starts the CPU image: the image's entry point with
the chart's args, the image's ENV, then the chart's ConfigMap, over what `make image-bake` wrote (the
baked model folder and C kernels) and an empty cache folder standing in for the emptyDir volume.

Only what cannot be the same here differs: the host is 127.0.0.1 (not 0.0.0.0), the ports are free ones
(not 8000/50051), and the image's /opt and /var paths are scratch folders. The render is the
InferencePool variant, so /metrics is open, as the endpoint picker scrapes it.

The pod ends with SIGTERM while a stream is in flight on each transport: the suite's one drain test, on the
process the other tests here already started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.engine.modeling import kernel_cache
from tests.cli_process import free_port, start_process, wait_ready
from tests.deploy.conftest import NAMESPACE, RELEASE, REPO, VARIANTS, Baked, Helm, Rendered, deep_merge, worktree_env
from tests.deploy.dockerfile import Dockerfile

pytestmark = pytest.mark.slow  # a real server process over the baked image

CPU_DOCKERFILE = REPO / "deploy" / "docker" / "cpu.Dockerfile"
STARTUP_TIMEOUT_S = 240.0  # a loaded 2-core machine; the chart's startup probe allows 15 minutes
# The drain timeout is long enough for the streams in flight at SIGTERM to end on a loaded 2-core machine.
LIVE_VALUES = deep_merge(VARIANTS["inference-pool"], {"server": {"kvCacheMemoryGiB": 0.05}, "drain": {"timeoutSeconds": 120}})
# The streams in flight at SIGTERM: greedy, so that what the safety filter may hold back is always the same;
# long enough to still be running while the test checks the refusals (32 tokens had ended, and the process
# exited, before the refused completion was sent, with another test file running beside this one).
DRAIN_MAX_TOKENS = 96
DRAIN_REQUEST = {"prompt": "Count to one hundred:", "max_tokens": DRAIN_MAX_TOKENS, "ignore_eos": True, "temperature": 0}
DRAIN_STREAM_TIMEOUT_S = 240.0


@dataclass
class LivePod:
    process: subprocess.Popen[bytes]
    rendered: Rendered
    port: int  # stands in for the container's http port
    env: dict[str, str]
    cache_dir: Path  # stands in for the cache volume
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def pod_environment(rendered: Rendered, baked: Baked, cache_volume: Path, port: int, grpc_port: int) -> dict[str, str]:
    """The container's environment: the image's ENV, then the ConfigMap (envFrom), image paths mapped here."""
    image_env = Dockerfile.read(CPU_DOCKERFILE).env("runtime")
    here = {
        "/opt/venv/bin": str(Path(sys.executable).parent),
        "/opt/lmserve/cache": str(baked.cache_dir),
        "/opt/lmserve/models": str(baked.models_dir),
        "/var/cache/lmserve": str(cache_volume),
    }

    def localize(value: str) -> str:
        for image_path, local_path in here.items():
            value = value.replace(image_path, local_path)
        return value.replace("$PATH", os.environ["PATH"])

    env = worktree_env()
    for key in [k for k in env if k.startswith("LMSERVE_")]:
        del env[key]  # only what the image and the chart set
    env.update({k: localize(v) for k, v in image_env.items()})
    env.update({k: localize(v) for k, v in rendered.env.items()})
    assert env["LMSERVE_HOST"] == "0.0.0.0" and int(env["LMSERVE_PORT"]) == 8000
    env.update(LMSERVE_HOST="127.0.0.1", LMSERVE_PORT=str(port), LMSERVE_GRPC_PORT=str(grpc_port))
    env["HOME"] = "/nonexistent"  # the image user's home, where nothing can be written
    return env


@pytest.fixture(scope="module")
def pod(helm: Helm, baked: Baked, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePod]:
    rendered = helm.template(LIVE_VALUES)
    workdir = tmp_path_factory.mktemp("pod")
    cache_volume = workdir / "cache-volume"
    cache_volume.mkdir()
    port = free_port()
    env = pod_environment(rendered, baked, cache_volume, port, free_port())
    entrypoint = Dockerfile.read(CPU_DOCKERFILE).exec_form(Dockerfile.read(CPU_DOCKERFILE).all("ENTRYPOINT")[-1])
    assert entrypoint == ["/opt/lmserve/entrypoint.sh"]
    command = [str(REPO / "deploy" / "docker" / "entrypoint.sh"), *rendered.container["args"]]
    log = workdir / "server.log"
    process = start_process(command, log, env=env, cwd=workdir)
    live = LivePod(process, rendered, port, env, cache_volume, log)
    try:
        yield live
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def probe_url(pod: LivePod, probe: dict) -> str:
    get = probe["httpGet"]
    assert get["port"] == "http"
    return f"{pod.base_url}{get['path']}"


def test_startup_liveness_and_readiness_probes_answer_200(pod: LivePod) -> None:
    c = pod.rendered.container
    startup = c["startupProbe"]["httpGet"]
    assert startup["port"] == "http"
    wait_ready(pod.process, pod.base_url, pod.log, STARTUP_TIMEOUT_S, path=startup["path"])
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        response = httpx.get(probe_url(pod, probe), timeout=probe["timeoutSeconds"])
        assert response.status_code == 200, response.text


def test_serves_the_baked_model_with_the_baked_kernels(pod: LivePod) -> None:
    response = httpx.post(
        f"{pod.base_url}/v1/completions",
        json={"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{pod.base_url}/v1/models", timeout=10).json()["data"][0]["id"] == "smollm2-135m-instruct"
    # The entry point linked the baked libraries (one per x86-64 level) into the empty cache volume, and the
    # server loaded the best this CPU runs from there, saying which, without building another.
    libraries = list((pod.cache_dir / "kernels").glob("*.so"))
    assert len(libraries) == len(kernel_cache.image_variants()) and all(lib.is_symlink() for lib in libraries), libraries
    assert {lib.resolve().parent for lib in libraries} == {Path(pod.env["BAKED_CACHE_DIR"]) / "kernels"}
    assert {p.stem for p in (pod.cache_dir / "kernels").glob("*.lock")} <= {lib.stem for lib in libraries}
    best = kernel_cache.choose_variant()
    log = pod.log.read_text(errors="replace")
    assert f"C kernels: {best} ({kernel_cache.VARIANTS[best].description}), chosen from this CPU's flags" in log
    assert "C kernels unavailable" not in log and "building the C kernels" not in log


def test_endpoint_picker_scrapes_lmserves_gauges(pod: LivePod) -> None:
    """The picker reads /metrics on the pool's target port with no credentials; every metric it is
    mapped to is a gauge there."""
    pool = pod.rendered.one("InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": int(pod.rendered.env["LMSERVE_PORT"])}]
    epp = next(d for d in pod.rendered.all("Deployment") if d["metadata"]["name"].endswith("-epp"))
    args = dict(a.removeprefix("--").split("=", 1) for a in epp["spec"]["template"]["spec"]["containers"][0]["args"])
    path = args["model-server-metrics-path"]
    response = httpx.get(f"{pod.base_url}{path}", timeout=10)
    assert response.status_code == 200, response.text
    for flag in ("total-queued-requests-metric", "total-running-requests-metric", "kv-cache-usage-percentage-metric"):
        assert f"# TYPE {args[flag]} gauge" in response.text, flag
    usage = next(line for line in response.text.splitlines() if line.startswith(args["kv-cache-usage-percentage-metric"]))
    assert 0.0 <= float(usage.rsplit(" ", 1)[1]) <= 1.0  # a ratio, as the picker expects


def test_native_grpc_probe_target_is_serving(pod: LivePod, helm: Helm) -> None:
    """With probes.protocol=grpc the kubelet asks grpc.health.v1 on the gRPC port about the service the
    probe names; the server answers SERVING once ready."""
    grpc_variant = helm.template(VARIANTS["grpc-probes"])
    probe = grpc_variant.container["readinessProbe"]["grpc"]
    assert probe["port"] == int(grpc_variant.env["LMSERVE_GRPC_PORT"])  # here: the pod's free gRPC port
    with grpc.insecure_channel(f"127.0.0.1:{pod.env['LMSERVE_GRPC_PORT']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=probe["service"]), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_healthcheck_hits_the_readiness_route(pod: LivePod) -> None:
    healthcheck = Dockerfile.read(CPU_DOCKERFILE).exec_form(Dockerfile.read(CPU_DOCKERFILE).all("HEALTHCHECK")[-1])
    command = [sys.executable, str(REPO / "deploy" / "docker" / Path(healthcheck[1]).name)]
    ok = subprocess.run(command, env=pod.env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    closed_env = {**pod.env, "LMSERVE_PORT": str(free_port())}
    closed = subprocess.run(command, env=closed_env, capture_output=True, text=True, timeout=30)
    assert closed.returncode == 1 and "Connection refused" in closed.stderr


def test_the_helm_test_pod_checks_the_release(pod: LivePod) -> None:
    """`helm test`'s pod, its command and environment as rendered, run here against the pod (the Service's
    name and ports mapped to the pod's): every check passes and says so."""
    (hook,) = [p for p in pod.rendered.all("Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    (container,) = hook["spec"]["containers"]
    assert container["image"] == pod.rendered.container["image"] and hook["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LMSERVE_TEST_HOST"] == f"{RELEASE}-lmserve.{NAMESPACE}.svc"
    service = pod.rendered.one("Service", f"{RELEASE}-lmserve")
    assert sorted(int(p["port"]) for p in service["spec"]["ports"]) == sorted(
        [int(env["LMSERVE_TEST_HTTP_PORT"]), int(env["LMSERVE_TEST_GRPC_PORT"])]
    )
    env.update(LMSERVE_TEST_HOST="127.0.0.1", LMSERVE_TEST_HTTP_PORT=str(pod.port),
               LMSERVE_TEST_GRPC_PORT=pod.env["LMSERVE_GRPC_PORT"])  # fmt: skip
    command = container["command"]
    assert command[0] == "python"
    result = subprocess.run([sys.executable, *command[1:]], env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "GET /readyz: 200" and lines[-2:] == ["gRPC health: SERVING", "ok"], result.stdout
    assert any(line.startswith("POST /v1/completions: 200, 4 tokens") for line in lines), result.stdout


def test_sigterm_drains_in_flight_then_exits_zero(pod: LivePod) -> None:
    """What the kubelet does after the preStop pause, with a stream in flight on each transport: readyz and
    gRPC health turn not-ready at once, new requests are refused (503 / UNAVAILABLE) on both transports,
    /livez still answers, the two streams run to their end, and the process exits 0. Last in this module:
    the pod ends here."""
    channel = grpc.insecure_channel(f"127.0.0.1:{pod.env['LMSERVE_GRPC_PORT']}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    http_stream, grpc_stream = InFlight.http(pod.base_url), InFlight.grpc(channel)
    assert http_stream.first.wait(60) and grpc_stream.first.wait(60), pod.log_tail()
    os.killpg(pod.process.pid, signal.SIGTERM)

    ready = None
    for _ in range(50):
        ready = httpx.get(f"{pod.base_url}/readyz", timeout=2)
        if ready.status_code == 503:
            break
        time.sleep(0.05)
    assert ready is not None and ready.status_code == 503
    assert "draining" in ready.json()["error"]["message"]
    assert httpx.get(f"{pod.base_url}/livez", timeout=2).status_code == 200
    refused = httpx.post(f"{pod.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
    assert refused.headers["retry-after"] == "1"
    for _ in range(50):
        if health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as new_rpc:
        rpc.GenerationStub(channel).Complete(pb.CompletionRequest(prompt="hi", max_tokens=1), timeout=10)
    assert new_rpc.value.code() == grpc.StatusCode.UNAVAILABLE

    grpc_chunks = grpc_stream.finish()
    assert grpc_chunks[-1].usage.completion_tokens == DRAIN_MAX_TOKENS
    assert grpc_chunks[-2].choices[0].finish_reason == "length"  # ran to the end, not aborted
    channel.close()
    events = http_stream.finish()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # ran to the end, not aborted
    grace_s = float(pod.env["LMSERVE_DRAIN_TIMEOUT_S"]) + 10
    assert pod.process.wait(timeout=grace_s) == 0, pod.log_tail()


@dataclass
class InFlight:
    """One completion stream read in a thread of its own; `first` is set once its first chunk has arrived."""

    thread: threading.Thread
    first: threading.Event
    received: list
    errors: list

    @classmethod
    def _start(cls, read) -> InFlight:
        stream = cls(threading.Thread(target=lambda: read(stream)), threading.Event(), [], [])
        stream.thread.start()
        return stream

    @classmethod
    def http(cls, base_url: str) -> InFlight:
        body = {**DRAIN_REQUEST, "stream": True}

        def read(stream: InFlight) -> None:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=DRAIN_STREAM_TIMEOUT_S) as resp:
                for line in resp.iter_lines():
                    if line:
                        stream.received.append(line)
                        stream.first.set()

        return cls._start(read)

    @classmethod
    def grpc(cls, channel: grpc.Channel) -> InFlight:
        request = pb.CompletionRequest(**DRAIN_REQUEST)

        def read(stream: InFlight) -> None:
            try:
                for chunk in rpc.GenerationStub(channel).CompleteStream(request, timeout=DRAIN_STREAM_TIMEOUT_S):
                    stream.received.append(chunk)
                    stream.first.set()
            except grpc.RpcError as error:
                stream.errors.append(error)

        return cls._start(read)

    def finish(self) -> list:
        self.thread.join(DRAIN_STREAM_TIMEOUT_S)
        assert not self.thread.is_alive() and not self.errors, self.errors
        return self.received
