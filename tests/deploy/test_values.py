"""values.schema.json makes helm refuse bad values, and the chart README lists every value with its default."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy.conftest import CHART, Helm

SCHEMA_ERROR = "values don't meet the specifications of the schema"
# (values, the field helm's message must name): each one is wrong in a way a user could get wrong.
BAD_VALUES = [
    ({"replicaCount": -1}, "replicaCount"),
    ({"replicaCount": "two"}, "replicaCount"),
    ({"replicas": 2}, "Additional property replicas is not allowed"),
    ({"server": {"maxSeqs": 8}}, "Additional property maxSeqs is not allowed"),
    ({"apiKeys": {"keys": ["sk-live-123"]}}, "Additional property keys is not allowed"),  # no secrets in values
    ({"server": {"dtype": "fp8"}}, "server.dtype"),
    ({"server": {"maxNumSeqs": 0}}, "server.maxNumSeqs"),
    ({"server": {"kvCacheMemoryGiB": 0}}, "server.kvCacheMemoryGiB"),
    ({"server": {"device": "gpu"}}, "server.device"),
    ({"server": {"otlpEndpoint": "otel:4318"}}, "server.otlpEndpoint"),
    ({"server": {"corsOrigins": ["https://a,https://b"]}}, "server.corsOrigins"),
    ({"limits": {"maxQueue": -5}}, "limits.maxQueue"),
    ({"engine": "tgi"}, "engine"),
    ({"ports": {"http": 70000}}, "ports.http"),
    ({"ports": {"grpc": -1}}, "ports.grpc"),
    ({"drain": {"timeoutSeconds": 0}}, "drain.timeoutSeconds"),
    ({"drain": {"timeoutSeconds": 2.5}}, "drain.timeoutSeconds"),
    ({"probes": {"protocol": "tcp"}}, "probes.protocol"),
    ({"probes": {"readiness": {"successThreshold": 2}}}, "probes.readiness.successThreshold"),
    ({"gpu": {"count": 0}}, "gpu.count"),
    ({"cache": {"type": "hostPath"}}, "cache.type"),
    ({"cache": {"mountPath": "relative/dir"}}, "cache.mountPath"),
    ({"resources": {"limits": {"cpu": "two"}}}, "resources.limits.cpu"),
    ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ({"serviceMonitor": {"interval": "15 seconds"}}, "serviceMonitor.interval"),
    ({"autoscaling": {"queueDepth": {"metricName": "queue depth"}}}, "autoscaling.queueDepth.metricName"),
    ({"podDisruptionBudget": {"maxUnavailable": "half"}}, "podDisruptionBudget.maxUnavailable"),
    ({"inferencePool": {"endpointPicker": {"failureMode": "Close"}}}, "inferencePool.endpointPicker.failureMode"),
    ({"ingress": {"hosts": [{"host": "a.example", "paths": [{"path": "/", "pathType": "Glob"}]}]}}, "pathType"),
]
# Mistakes only another value reveals: the chart's own checks (`fail`) refuse them.
CONFLICTS = [
    ({"inferencePool": {"enabled": True}}, "inferencePool.enabled needs metrics.open=true"),
    ({"metrics": {"open": True}, "inferencePool": {"enabled": True, "endpointPicker": {"create": False}}},
     "inferencePool.endpointPicker.serviceName is required"),
    ({"probes": {"protocol": "grpc"}, "ports": {"grpc": 0}}, "probes.protocol grpc needs a gRPC port"),
    ({"cache": {"type": "existingClaim"}}, "cache.existingClaim is required"),
    ({"modelVolume": {"enabled": True}}, "modelVolume.existingClaim is required"),
    ({"serviceMonitor": {"enabled": True, "authorization": {"secretName": "k"}}},
     "serviceMonitor.authorization.secretKey is required"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas exceeds"),
    ({"grpcTls": {"existingSecret": "t"}, "probes": {"protocol": "grpc"}}, "cannot check a TLS gRPC port"),
    ({"grpcTls": {"existingSecret": "t"}, "ports": {"grpc": 0}}, "grpcTls.existingSecret needs a gRPC port"),
    ({"grpcTls": {"requireClientCert": True}}, "grpcTls.requireClientCert needs grpcTls.existingSecret"),
]  # fmt: skip


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, default) of every value: nested where the schema names the keys, else one value
    (free-form maps such as nodeSelector, lists, Kubernetes objects passed through)."""
    for key, value in values.items():
        node = schema["properties"][key]
        if isinstance(value, dict) and "properties" in node:
            yield from value_paths(value, node, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def readme_rows() -> dict[str, str]:
    rows = {}
    for line in (CHART / "README.md").read_text().splitlines():
        match = re.match(r"^\| `([A-Za-z0-9_.]+)` \| `(.*)` \| (.+) \|$", line)
        if match:
            assert match.group(1) not in rows, f"README lists {match.group(1)} twice"
            rows[match.group(1)] = match.group(2).replace("\\|", "|")
    return rows


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_schema_rejects_bad_values(helm: Helm, values: dict[str, Any], field: str) -> None:
    err = helm.template_error(values)
    assert SCHEMA_ERROR in err and field in err, err


@pytest.mark.parametrize(("values", "message"), CONFLICTS, ids=[m for _, m in CONFLICTS])
def test_chart_refuses_conflicting_values(helm: Helm, values: dict[str, Any], message: str) -> None:
    err = helm.template_error(values)
    assert message in err, err


def test_schema_accepts_what_the_readme_shows(helm: Helm) -> None:
    helm.template({"resources": {"limits": {"cpu": "3500m", "memory": "16Gi", "nvidia.com/gpu": 1}}})
    helm.template({"podDisruptionBudget": {"maxUnavailable": "25%"}, "serviceMonitor": {"interval": "1m30s"}})
    helm.template({"modelVolume": {"enabled": True, "existingClaim": "models"}, "model": "/models/Qwen2.5-0.5B-Instruct"})


def test_every_value_is_in_the_schema_and_the_readme(chart_values: dict[str, Any], schema: dict[str, Any]) -> None:
    defaults = dict(value_paths(chart_values, schema))
    rows = readme_rows()
    assert sorted(set(defaults) - set(rows)) == [], "values missing from README.md"
    assert sorted(set(rows) - set(defaults)) == [], "README.md lists keys values.yaml does not have"
    for key, default in defaults.items():
        assert rows[key] == json.dumps(default), f"README.md: {key} defaults to {json.dumps(default)}"


def test_schema_requires_no_key_that_values_lacks(chart_values: dict[str, Any], schema: dict[str, Any]) -> None:
    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        assert node.get("additionalProperties") is False, f"{path or 'root'}: unknown keys must be errors"
        for key in node.get("required", []):
            assert key in values, f"{path}{key} is required by the schema but not in values.yaml"
        for key, value in values.items():
            child = node["properties"][key]
            if isinstance(value, dict) and "properties" in child:
                walk(value, child, f"{path}{key}.")

    walk(chart_values, schema, "")
