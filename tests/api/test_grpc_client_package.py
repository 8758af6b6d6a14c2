"""The gRPC client package (clients/python, `lmserve-grpc`) and the examples, against the real server.

The package is pip-installed from a copy into a temp folder, and clients/python/examples/every_rpc.py runs
in a subprocess whose sys.path has that folder and the venv's site-packages, not the repository: every RPC
of the proto (and grpc.health.v1) answers, and neither the server package (`lmserve` beyond the stubs' `lmserve.v1`) nor `torch` is imported there. The Node
example runs too where node and npm are, with its packages cached outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from tests.api.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
NODE_CLIENT = ROOT / "clients" / "node"
# Every RPC the proto declares, by its full name, and the standard health check beside them.
PROTO_METHODS = {f"{s.full_name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
HEALTH_CHECK = "grpc.health.v1.Health/Check"

# Runs the example's main() and writes what the process imported and searched, for the test to check.
WRAPPER = """
import json, runpy, sys
script, report, *args = sys.argv[1:]
rc = runpy.run_path(script)["main"](args)
pb2 = sys.modules.get("lmserve.v1.lmserve_pb2")
with open(report, "w") as f:
    json.dump({"path": sys.path, "modules": sorted(sys.modules), "pb2": getattr(pb2, "__file__", None)}, f)
sys.exit(rc)
"""


def _lines(stdout: str) -> dict[str, str]:
    """`method: text` lines, by method (a label in parentheses after the method is dropped)."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        method, sep, text = line.partition(": ")
        if sep:
            out.setdefault(method.split(" (")[0], text)
            out[method] = text
    return out


def test_client_stubs_match_the_proto(tmp_path: Path) -> None:
    """The committed client modules are protoc's output, unchanged (generate.py's --check path)."""
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path),
            "--package", "lmserve.v1", "--check", str(CLIENT / "lmserve" / "v1"),
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # protoc's own import: the natural layout, no rewrite.
    assert "from lmserve.v1 import lmserve_pb2" in (CLIENT / "lmserve" / "v1" / "lmserve_pb2_grpc.py").read_text()
    assert not (CLIENT / "lmserve" / "__init__.py").exists()  # `lmserve` stays a namespace package


@pytest.fixture(scope="module")
def installed_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/python pip-installed (no deps, offline, with this venv's setuptools) into a temp folder. It is
    built from a copy, so the build leaves nothing in the working tree."""
    tmp = tmp_path_factory.mktemp("lmserve_grpc")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
            "--no-build-isolation", "--no-index", "--target", str(site), str(src),
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return site


def test_the_package_installs_as_the_stubs_alone(installed_client: Path) -> None:
    files = {p.relative_to(installed_client).as_posix() for p in installed_client.rglob("*") if p.is_file()}
    lmserve = {f for f in files if f.startswith("lmserve/") and "__pycache__" not in f}
    assert lmserve == {
        "lmserve/v1/__init__.py",
        "lmserve/v1/lmserve_pb2.py",
        "lmserve/v1/lmserve_pb2.pyi",
        "lmserve/v1/lmserve_pb2_grpc.py",
        "lmserve/v1/py.typed",
    }
    [metadata] = installed_client.glob("lmserve_grpc-*.dist-info/METADATA")
    requires = [line.split(": ", 1)[1] for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist: ")]
    assert {re.split(r"[<>=; \[]", r)[0] for r in requires} == {"grpcio", "protobuf", "grpcio-health-checking"}
    assert all("extra ==" in r for r in requires if r.startswith("grpcio-health-checking"))


def test_every_rpc_example_without_the_server(server: LiveServer, installed_client: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "LMSERVE_GRPC_TARGET")}
    env.update(PYTHONPATH=str(installed_client), LMSERVE_API_KEY=server.api_key or "")
    script = CLIENT / "examples" / "every_rpc.py"
    result = subprocess.run(
        # -P: no script or current folder on sys.path; -s: no user site-packages.
        [sys.executable, "-P", "-s", "-c", WRAPPER, str(script), str(report), server.grpc_target],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(result.stdout)  # shown with -s
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)

    assert PROTO_METHODS | {HEALTH_CHECK} <= lines.keys(), result.stdout
    assert lines[HEALTH_CHECK] == "SERVING"
    # The ids are what the proto says: a completion's is the request id behind "cmpl-" (and the request
    # id comes back in the trailers); tool calls' and moderations' are random hex.
    complete = lines["lmserve.v1.Generation/Complete"]
    assert "id=cmpl-every-rpc-complete " in complete and "x-request-id=every-rpc-complete " in complete
    assert re.search(r" id=chatcmpl-[0-9a-f]{32}$", lines["lmserve.v1.Generation/Chat"])
    assert re.search(r"^get_weather\(\{.*\}\) id=call_[0-9a-f]{24} ", lines["lmserve.v1.Generation/Chat (tools)"])
    moderate = lines["lmserve.v1.Moderations/Moderate"]
    assert moderate.startswith("flagged=[False, True] ") and re.search(r" id=modr-[0-9a-f]{32}$", moderate)

    seen = json.loads(report.read_text())
    imported = {m.split(".")[0] for m in seen["modules"]}
    server_modules = [m for m in seen["modules"] if m.startswith("lmserve.") and not m.startswith("lmserve.v1")]
    assert "torch" not in imported and server_modules == []
    assert Path(seen["pb2"]).is_relative_to(installed_client)
    assert str(ROOT) not in seen["path"] and "" not in seen["path"]


NODE_CACHE = Path(os.environ.get("LMSERVE_TEST_NODE_CACHE") or Path.home() / ".cache" / "lmserve-tests" / "node")


def _node_modules() -> Path:
    """@grpc/grpc-js and @grpc/proto-loader at clients/node/package.json's pins, npm-installed once into
    NODE_CACHE (outside the repository); the test skips, saying why, when that cannot be done."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node or npm is not installed: the Node.js example is not run")
    manifest = (NODE_CLIENT / "package.json").read_text()
    pins = json.loads(manifest)["dependencies"]
    modules = NODE_CACHE / "node_modules"

    def installed() -> bool:
        for name, version in pins.items():
            meta = modules / name / "package.json"
            if not meta.is_file() or json.loads(meta.read_text()).get("version") != version:
                return False
        return True

    if not installed():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        (NODE_CACHE / "package.json").write_text(manifest)
        cmd = ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--fetch-retries=1", "--fetch-timeout=30000"]
        try:
            result = subprocess.run(cmd, cwd=NODE_CACHE, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install timed out in {NODE_CACHE} (registry unreachable?): the Node.js example is not run")
        if result.returncode != 0 or not installed():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            pytest.skip(f"npm could not install {', '.join(pins)} into {NODE_CACHE}: {tail[0]}")
    return modules


def test_node_example(server: LiveServer, tmp_path: Path) -> None:
    modules = _node_modules()
    env = {k: v for k, v in os.environ.items() if k not in ("LMSERVE_GRPC_TARGET", "LMSERVE_PROTO_DIR")}
    env.update(NODE_PATH=str(modules), LMSERVE_API_KEY=server.api_key or "")
    result = subprocess.run(
        ["node", str(NODE_CLIENT / "every_rpc.js"), server.grpc_target],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(result.stdout)  # shown with -s
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert PROTO_METHODS <= lines.keys(), result.stdout
    assert "id=cmpl-node-complete " in lines["lmserve.v1.Generation/Complete"]
    assert lines["lmserve.v1.Moderations/Moderate"].startswith("flagged=false id=modr-")
