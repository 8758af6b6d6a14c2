"""The Grafana dashboard in deploy/ charts only metrics the service exposes, and every metric it exposes
is charted (or listed below with the reason it is not), so dashboard and code cannot drift apart."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from lmserve.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "lmserve-dashboard.json"
METRIC_NAME = re.compile(r"\blmserve_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
NOT_CHARTED = {
    "lmserve_kv_blocks_used": "charted as lmserve_kv_cache_usage_ratio",
    "lmserve_kv_blocks_capacity": "charted as lmserve_kv_cache_usage_ratio",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exposed_families() -> dict[str, set[str]]:
    """Family name -> the sample names Prometheus stores for it (`_total`, `_bucket`/`_sum`/`_count`)."""
    families = {}
    for family in Metrics().registry.collect():
        full_name = family.name + ("_total" if family.type == "counter" else "")
        families[full_name] = {family.name + suffix for suffix in SUFFIXES[family.type]}
    return families


def chart_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_queries_only_exposed_metrics(dashboard: dict[str, Any]) -> None:
    exposed = set().union(*exposed_families().values())
    for panel in chart_panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, f"{panel['title']}: {target['expr']} queries no lmserve metric"
            assert names <= exposed, f"{panel['title']}: unknown {sorted(names - exposed)}"


def test_every_exposed_metric_is_charted(dashboard: dict[str, Any]) -> None:
    queried = {name for p in chart_panels(dashboard) for t in p["targets"] for name in METRIC_NAME.findall(t["expr"])}
    uncharted = {family for family, samples in exposed_families().items() if not samples & queried}
    assert uncharted == set(NOT_CHARTED)


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    assert "lmserve_" in variables["model"]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in chart_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
