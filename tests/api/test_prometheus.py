"""The metrics as a real Prometheus sees them: `promtool check metrics` finds nothing to lint in a live
server's /metrics, and Debian's Prometheus, scraping the live server while it serves traffic, evaluates every
expression of the Grafana dashboard (deploy/grafana/): each parses, and each that the traffic feeds returns a
series. Both binaries come from Debian's `prometheus` package (`.ci/run` installs it); without them these
tests skip, saying so."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import LiveServer
from tests.cli_process import free_port, start_process, stop_process, wait_ready
from tests.test_dashboard import DASHBOARD, chart_panels

PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None,
    reason="promtool/prometheus not installed: Debian's `prometheus` package (apt-get install prometheus; .ci/run installs it)",
)
SCRAPE_S = 1
# Grafana's $__rate_interval is at least four scrape intervals; a few more keep a rate from coming up empty
# when a scrape is late on a loaded machine.
RATE_INTERVAL = "10s"
# Expressions the traffic below does not feed, each with why: they must still parse.
UNFED = {
    "lmserve_rate_limited_total": "no key here has a rate limit (test_metrics.py checks the counter)",
    "lmserve_overloaded_total": "nothing is shed here (test_metrics.py checks the counter)",
    "lmserve_lora_": "no adapter is loaded on this server (tests/api/test_lora.py)",
}


@pytest.fixture(scope="module")
def prometheus(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
        "scrape_configs": [{
            "job_name": "lmserve",
            "authorization": {"credentials": server.api_key},
            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
        }],
    }  # fmt: skip
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    process = start_process(
        [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        folder / "prometheus.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, folder / "prometheus.log", timeout_s=60, path="/-/ready")
        yield base
    finally:
        stop_process(process)


def _traffic(server: LiveServer) -> None:
    """What a dashboard needs to show something: completions (the second one a prefix-cache hit), a streamed
    chat, an embedding, a refused request, and a prompt the default safety policy flags (an email address; example.com, a
    documentation domain, is not one)."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as client:
        for _ in range(2):
            body = {"prompt": "The capital of France is the capital of France is", "max_tokens": 8, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=chat) as resp:
            assert resp.status_code == 200 and "[DONE]" in resp.read().decode()
        assert client.post("/v1/embeddings", json={"input": ["a cat", "a dog sat"]}).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "hi", "temperature": -1}).status_code == 400
        flagged = {"prompt": "Write to jane.doe@gmail.com about", "max_tokens": 2}
        assert client.post("/v1/completions", json=flagged).status_code == 200


def _query(base: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def test_promtool_finds_nothing_to_lint(server: LiveServer) -> None:
    _traffic(server)
    metrics = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=10)
    assert metrics.status_code == 200
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=metrics.text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr


def test_prometheus_evaluates_every_dashboard_expression(server: LiveServer, prometheus: str) -> None:
    def scraped_up() -> bool:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    deadline = time.monotonic() + 60
    while not scraped_up():
        assert time.monotonic() < deadline, httpx.get(f"{prometheus}/api/v1/targets", timeout=2).text
        time.sleep(0.2)
    _traffic(server)
    time.sleep(4 * SCRAPE_S)  # a few scrapes after the traffic: every rate has two samples that differ
    models = httpx.get(
        f"{prometheus}/api/v1/label/model/values", params={"match[]": "lmserve_generation_tokens_total"}, timeout=10
    ).json()["data"]
    assert models, "the dashboard's $model variable would be empty"

    expressions = [t["expr"] for p in chart_panels(json.loads(DASHBOARD.read_text())) for t in p["targets"]]
    empty = []
    for expr in expressions:
        query = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", "|".join(models))
        if not _query(prometheus, query) and not any(name in expr for name in UNFED):
            empty.append(expr)
    assert not empty, f"{len(empty)} of {len(expressions)} expressions returned no series: {empty}"
