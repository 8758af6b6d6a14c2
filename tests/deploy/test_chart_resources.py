"""The chart refuses a container whose resource limit is below its request (Kubernetes would refuse it at
install; values.schema.json cannot compare two values): lmserve.checkResources in _helpers.tpl, over every
container the chart renders, with lmserve.quantity reading Kubernetes quantities in all their forms.

Renders cost about 0.1 s each: the quantity forms and the accepted combinations are checked in one render
of a copy of the chart with a probe template; each refusal is one render (a `fail` ends the render).
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, Helm

GI = 2**30
MI = 2**20
# (quantity as values give it, its value in the base unit: cores, bytes, GPUs). Strings are what --set
# and quoted YAML give; ints and floats are what unquoted YAML gives (a float prints as 1e+09 in helm).
QUANTITIES: list[tuple[Any, Fraction]] = [
    ("2", Fraction(2)),
    (2, Fraction(2)),
    ("1.5", Fraction(3, 2)),
    (1.5, Fraction(3, 2)),
    ("1500m", Fraction(3, 2)),
    ("15e-1", Fraction(3, 2)),
    ("0.7", Fraction(7, 10)),
    ("700m", Fraction(7, 10)),
    ("100m", Fraction(1, 10)),
    (".5", Fraction(1, 2)),
    ("1.", Fraction(1)),
    ("+1", Fraction(1)),
    ("0", Fraction(0)),
    ("250u", Fraction(1, 4000)),
    ("5n", Fraction(5, 10**9)),
    ("100k", Fraction(10**5)),
    ("512Mi", Fraction(512 * MI)),
    ("1.25Mi", Fraction(1310720)),
    ("2Gi", Fraction(2 * GI)),
    ("1.5Gi", Fraction(3 * GI, 2)),
    ("3G", Fraction(3 * 10**9)),
    ("3072M", Fraction(3072 * 10**6)),
    ("3000000k", Fraction(3 * 10**9)),
    ("1e9", Fraction(10**9)),
    ("1E9", Fraction(10**9)),
    ("1e+09", Fraction(10**9)),
    (1e9, Fraction(10**9)),
    ("3221225472", Fraction(3 * GI)),
    (3221225472, Fraction(3 * GI)),
    ("1Ki", Fraction(1024)),
    ("0.5Ti", Fraction(2**39)),
    ("2T", Fraction(2 * 10**12)),
    ("1Pi", Fraction(2**50)),
    ("1P", Fraction(10**15)),
    ("1E", Fraction(10**18)),  # E alone is exa; E with digits is an exponent
    ("2Ei", Fraction(2**61)),
]
# Resources (as a container's `resources`) that Kubernetes accepts: each must pass the check.
ACCEPTED: list[dict[str, Any]] = [
    {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},  # the defaults
    {"requests": {"cpu": "1.5", "memory": "3Gi"}, "limits": {"cpu": "1500m", "memory": "3221225472"}},  # equal
    {"requests": {"cpu": 1.5, "memory": "3G"}, "limits": {"cpu": "1500m", "memory": "3000M"}},
    {"requests": {"cpu": "100m", "memory": "1e9"}, "limits": {"cpu": "0.1", "memory": "1G"}},
    {"requests": {"memory": "1e9"}, "limits": {"memory": "954Mi"}},  # 953Mi < 1e9 < 954Mi
    {"requests": {"cpu": "700m", "memory": "3G"}, "limits": {"cpu": "0.7", "memory": "3Gi"}},  # 3G < 3Gi
    {"requests": {"cpu": "999m", "memory": "3072M"}, "limits": {"cpu": 1, "memory": "3Gi"}},
    {"requests": {"cpu": "2"}, "limits": {"cpu": "2", "memory": "1Gi"}},  # a limit with no request
    {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": None, "memory": "8Gi"}},
    {"requests": {"cpu": "2", "memory": "8Gi"}},  # requests only
    {"limits": {"cpu": "4", "memory": "8Gi"}},
    {"requests": {"ephemeral-storage": "1Gi"}, "limits": {"ephemeral-storage": "2Gi"}},
    {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": "2"}},
    {"requests": {"hugepages-2Mi": "1Gi"}, "limits": {"hugepages-2Mi": "1024Mi"}},
    {},
]

PROBE = """\
{{- range .Values.global.accepted }}
{{- include "lmserve.checkResources" (dict "resources" . "path" "resources") }}
{{- end }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: quantities
data:
  {{- range $i, $q := .Values.global.quantities }}
  {{ printf "q%d" $i }}: {{ include "lmserve.quantity" (dict "value" $q "name" "q") | quote }}
  {{- end }}
"""


@pytest.fixture(scope="module")
def probe_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart with a template that prints lmserve.quantity of each form and runs the check
    on each accepted combination (values under `global`, which the schema leaves free)."""
    chart = tmp_path_factory.mktemp("probe") / "lmserve"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-probe.yaml").write_text(PROBE)
    return chart


def test_quantities_in_every_form_and_accepted_resources(helm: Helm, probe_chart: Path) -> None:
    values = {"global": {"quantities": [q for q, _ in QUANTITIES], "accepted": ACCEPTED}}
    result = helm.run(
        "template", RELEASE, str(probe_chart), "--namespace", NAMESPACE,
        "--show-only", "templates/zz-probe.yaml", values=values,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)["data"]
    got = {repr(q): float(data[f"q{i}"]) for i, (q, _) in enumerate(QUANTITIES)}
    # Exact: sprig's mulf computes in decimal, so every spelling of one amount gives the same float.
    assert got == {repr(q): float(expected) for q, expected in QUANTITIES}


def _resources(requests: dict[str, Any] | None = None, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"resources": {"requests": requests or {}, "limits": limits or {}}}


def _epp(resources: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": {"open": True}, "inferencePool": {"enabled": True, "endpointPicker": {"resources": resources}}}


def _below(path: str, resource: str, limit: str, request: str) -> str:
    key = resource.replace(".", "\\.")
    return (
        f"{path}.limits.{key} ({limit}) is below {path}.requests.{key} ({request}): set both together, "
        f"e.g. --set {path}.requests.{key}={limit} --set {path}.limits.{key}={limit}"
    )


# (values over the defaults, the whole message or a part of it). The defaults request cpu 2, memory 3Gi.
REFUSED: list[tuple[dict[str, Any], str]] = [
    (_resources(limits={"memory": "2Gi"}), _below("resources", "memory", "2Gi", "3Gi")),
    (_resources(limits={"memory": "3G"}), _below("resources", "memory", "3G", "3Gi")),  # 3G < 3Gi
    (_resources(limits={"memory": "3072M"}), _below("resources", "memory", "3072M", "3Gi")),
    (_resources(limits={"memory": 3221225471}), _below("resources", "memory", "3.221225471e+09", "3Gi")),
    # An unquoted 1e9 in a values file is a float to helm, printed 1e+09.
    (
        _resources(requests={"memory": "1e9"}, limits={"memory": "953Mi"}),  # 953Mi < 1e9 < 954Mi
        _below("resources", "memory", "953Mi", "1e+09"),
    ),
    (_resources(limits={"cpu": "1.5"}), _below("resources", "cpu", "1.5", "2")),
    (_resources(limits={"cpu": 1.5}), _below("resources", "cpu", "1.5", "2")),
    (_resources(limits={"cpu": "1999m"}), _below("resources", "cpu", "1999m", "2")),
    (_resources(requests={"cpu": "500m"}, limits={"cpu": "0.4"}), _below("resources", "cpu", "0.4", "500m")),
    (
        _resources(requests={"ephemeral-storage": "2Gi"}, limits={"ephemeral-storage": "1Gi"}),
        _below("resources", "ephemeral-storage", "1Gi", "2Gi"),
    ),
    # GPUs named under resources (gpu.enabled off), and the GPU variant's other resources.
    (
        _resources(requests={"nvidia.com/gpu": 2}, limits={"nvidia.com/gpu": 1}),
        _below("resources", "nvidia.com/gpu", "1", "2"),
    ),
    (
        _resources(requests={"nvidia.com/gpu": 1}, limits={"nvidia.com/gpu": 2}),
        "resources.limits.nvidia\\.com/gpu (2) differs from resources.requests.nvidia\\.com/gpu (1): Kubernetes "
        "needs nvidia.com/gpu requested and limited alike",
    ),
    (
        {"gpu": {"enabled": True, "count": 2}, "resources": {"limits": {"memory": "2Gi"}}},
        _below("resources", "memory", "2Gi", "3Gi"),
    ),
    # The endpoint picker's container (requests 256Mi).
    (
        _epp({"limits": {"memory": "100Mi"}}),
        _below("inferencePool.endpointPicker.resources", "memory", "100Mi", "256Mi"),
    ),
    (_epp({"limits": {"cpu": "0.1"}}), _below("inferencePool.endpointPicker.resources", "cpu", "0.1", "200m")),
    # Forms the schema's pattern lets through and Kubernetes does not.
    (_resources(limits={"memory": "1e3Gi"}), "resources.limits.memory (1e3Gi) is not a Kubernetes quantity"),
    (_resources(requests={"cpu": "1.2.3"}), "resources.requests.cpu (1.2.3) is not a Kubernetes quantity"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "message"), REFUSED, ids=[json.dumps(v, separators=(",", ":")) for v, _ in REFUSED])
def test_limits_below_requests_are_refused(helm: Helm, values: dict[str, Any], message: str) -> None:
    err = helm.template_error(values)
    assert message in err, err


def test_rendered_resources_that_pass_are_as_given(helm: Helm) -> None:
    """Through the real chart: equal values in other spellings, a limit with no request, the GPU variant
    (its count overrides GPUs named under resources), the picker with equal values."""
    r = helm.template(
        {
            "resources": {
                "requests": {"cpu": "1.5", "memory": None, "ephemeral-storage": "1Gi"},
                "limits": {"cpu": "1500m", "memory": "2Gi", "ephemeral-storage": "1073741824", "nvidia.com/gpu": 1},
            },
            "gpu": {"enabled": True, "count": 4},
            "metrics": {"open": True},
            "inferencePool": {"enabled": True, "endpointPicker": {"resources": {"limits": {"cpu": "0.2"}}}},
        }
    )
    assert r.container["resources"] == {
        "requests": {"cpu": "1.5", "ephemeral-storage": "1Gi", "nvidia.com/gpu": "4"},
        "limits": {"cpu": "1500m", "memory": "2Gi", "ephemeral-storage": "1073741824", "nvidia.com/gpu": "4"},
    }
    epp = r.one("Deployment", f"{RELEASE}-lmserve-epp")["spec"]["template"]["spec"]["containers"][0]
    assert epp["resources"]["limits"] == {"cpu": "0.2", "memory": "512Mi"}


def test_lint_shows_the_refusal(helm: Helm) -> None:
    """helm lint runs templates in lint mode, where `fail` is logged ("[INFO] Fail: ...") and the chart
    still passes; the message is there for whoever reads it (helm template and install refuse)."""
    result = helm.run("lint", "--strict", str(CHART), values=_resources(limits={"memory": "2Gi"}))
    assert _below("resources", "memory", "2Gi", "3Gi") in result.stdout + result.stderr
