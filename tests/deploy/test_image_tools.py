"""The plumbing of `make image` and `make image-test`, checked without building (a build takes minutes; run
`make image-test` for that): the make targets run the scripts, the builder choice, the clear refusal where
no builder is at hand, the local package index that stands in for PyTorch's CPU wheel index, and the
digest of a build's inputs that lets an unchanged image be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cli_process import free_port
from tests.deploy.conftest import REPO

TOOLS = REPO / "deploy" / "tools"
sys.path.insert(0, str(TOOLS))  # the scripts' modules, as the scripts import them

from build_inputs import inputs_digest  # noqa: E402
from wheel_index import serve_index  # noqa: E402

NO_DAEMON = "unix:///nonexistent/docker.sock"  # where the docker CLI finds no engine, whatever runs here


def test_make_targets_run_the_build_and_test_scripts() -> None:
    # -o: the development venv's stamp counts as up to date (a worktree's pyproject.toml may be newer).
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", "-o", ".venv/.lmserve-installed", "image", "image-test",
         "IMAGE_BUILDER=buildah", "IMAGE_TAG=lmserve:t"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.splitlines() == [
        ".venv/bin/python deploy/tools/image_build.py --tag lmserve:t --builder buildah",
        ".venv/bin/python deploy/tools/image_test.py --tag lmserve:t --builder buildah",
    ]


def run_script(script: str, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": str(path), "DOCKER_HOST": NO_DAEMON}
    command = [sys.executable, str(TOOLS / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_image_test_refuses_clearly_without_a_builder(tmp_path: Path) -> None:
    result = run_script("image_test.py", tmp_path)  # a PATH with no docker, podman or buildah
    assert result.returncode == 2, result.stdout + result.stderr
    refusal = "image-test: no OCI builder: neither `docker info` nor `podman info` succeeds and buildah is not installed"
    assert refusal in result.stderr
    assert result.stdout == ""  # nothing built, nothing started


def test_a_docker_cli_without_its_daemon_means_buildah(tmp_path: Path) -> None:
    """`docker` is there but reaches no engine (as on our machines): buildah builds, with vfs storage."""
    for tool in ("docker", "buildah"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed here")
        (tmp_path / tool).symlink_to(shutil.which(tool))
    probe = "import oci_builder; b = oci_builder.choose_builder(); print(b.name, *b.argv)"
    env = {**os.environ, "PATH": str(tmp_path), "DOCKER_HOST": NO_DAEMON, "PYTHONPATH": str(TOOLS)}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["buildah", "buildah", "--storage-driver", "vfs"], result.stderr
    insisted = run_script("image_build.py", tmp_path, "--builder", "docker")
    assert insisted.returncode == 2 and "`docker info` fails: no working docker engine here" in insisted.stderr


def test_wheel_index_serves_local_wheels_and_sends_the_rest_to_pypi(tmp_path: Path) -> None:
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"PK\x03\x04 not unpacked by the index")
    with serve_index(tmp_path, free_port()) as url, httpx.Client(timeout=10) as client:
        page = client.get(f"{url}/Torch/")  # names are normalized (PEP 503)
        assert page.status_code == 200
        assert '<a href="/files/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl">' in page.text
        files = url.removesuffix("/simple") + "/files"
        assert client.get(f"{files}/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl").content == wheel.read_bytes()
        other = client.get(f"{url}/Jinja2/")
        assert other.status_code == 302 and other.headers["location"] == "https://pypi.org/simple/jinja2/"
        assert client.get(f"{files}/nothing.whl").status_code == 404


def test_build_inputs_change_with_the_context_and_not_with_what_it_leaves_out(tmp_path: Path) -> None:
    (tmp_path / "service" / "pkg").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    (tmp_path / "x.Dockerfile").write_text("FROM base\nCOPY service/ service/\n")
    (tmp_path / "x.Dockerfile.dockerignore").write_text("*\n!service/\n**/__pycache__\n")
    (tmp_path / "service" / "pkg" / "mod.py").write_text("A = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    def digest(settings: str = "buildah") -> str:
        return inputs_digest(tmp_path, tmp_path / "x.Dockerfile", tmp_path / "x.Dockerfile.dockerignore", [settings])

    first = digest()
    (tmp_path / "docs" / "page.md").write_text("not in the context\n")
    (tmp_path / "service" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "service" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert digest() == first
    assert digest("docker") != first  # another builder or base
    (tmp_path / "service" / "pkg" / "mod.py").write_text("A = 2\n")
    assert digest() != first
