"""`make image`: build the CPU image (deploy/docker/cpu.Dockerfile) with the builder at hand, so that only a
changed Dockerfile or source costs a rebuild: no builder runs when the build's inputs are those of the
last build (build_inputs.py), and a build reuses the layers its builder has cached.

    python deploy/tools/image_build.py [--tag lmserve:0.1.0-cpu] [--builder auto|docker|podman|buildah]

Where Docker Hub cannot be reached, the base is the debootstrap image (oci_builder.make_base, made once);
where PyPI's CPU torch index cannot be reached, torch comes from a local wheel folder through a package
index on 127.0.0.1 (wheel_index.py). Prints what it chose and how long the build took.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from build_inputs import inputs_digest, record_build, up_to_date
from oci_builder import BASE_IMAGE, Builder, BuilderMissing, choose_builder, image_exists, image_id, make_base
from wheel_index import serve_index

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "cpu.Dockerfile"
IGNOREFILE = REPO / "deploy" / "docker" / "cpu.Dockerfile.dockerignore"
DEFAULT_TAG = "lmserve:0.1.0-cpu"
REGISTRY_PROBE = "https://registry-1.docker.io/v2/"  # answers 401 to anyone: reachable
TORCH_INDEX_PROBE = "https://download.pytorch.org/whl/cpu/torch/"
PROBE_TIMEOUT_S = 5.0
BUILD_TIMEOUT_S = 3600.0
# Fixed, so that the TORCH_INDEX build argument, part of the layer cache key, is the same on every build.
WHEEL_INDEX_PORT = 39871


@dataclass(frozen=True)
class BuildPlan:
    builder: Builder
    tag: str
    python_image: str | None  # None: the Dockerfile's default (python:3.11-slim from Docker Hub)
    torch_wheels: Path | None  # None: PyTorch's CPU index, the Dockerfile's default


def reachable(url: str) -> bool:
    """An HTTP answer from `url` within PROBE_TIMEOUT_S, name resolution included (urlopen's timeout leaves
    that out, and a resolver with no network can take long to give up)."""
    answered = threading.Event()

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
                answered.set()
        except urllib.error.HTTPError:
            answered.set()  # an answer, if a refusal (the registry asks for a token)
        except (urllib.error.URLError, OSError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return answered.is_set()


def local_torch_wheels() -> Path | None:
    """The first of pip's find-links folders here (PIP_FIND_LINKS) holding a torch wheel."""
    for entry in os.environ.get("PIP_FIND_LINKS", "").split():
        folder = Path(entry.removeprefix("file://"))
        if folder.is_dir() and any(folder.glob("torch-*.whl")):
            return folder
    return None


def plan_build(builder: Builder, tag: str, python_image: str | None) -> BuildPlan:
    if python_image is None and builder.is_daemonless and not reachable(REGISTRY_PROBE):
        python_image = BASE_IMAGE
    torch_wheels = None
    if not reachable(TORCH_INDEX_PROBE):
        torch_wheels = local_torch_wheels()
        if torch_wheels is None:
            raise BuilderMissing(
                f"{TORCH_INDEX_PROBE} does not answer and no PIP_FIND_LINKS folder holds a torch wheel"
            )
    return BuildPlan(builder, tag, python_image, torch_wheels)


def build_command(plan: BuildPlan, torch_index: str | None) -> list[str]:
    args = [f"--file={DOCKERFILE}", f"--tag={plan.tag}"]
    if plan.python_image:
        args.append(f"--build-arg=PYTHON_IMAGE={plan.python_image}")
    if torch_index:
        args += [f"--build-arg=TORCH_INDEX={torch_index}", "--network=host"]
    if plan.builder.name == "buildah":
        # --layers: cache every step; --format=docker: the OCI format has no HEALTHCHECK; BuildKit finds
        # <Dockerfile>.dockerignore by itself, buildah and podman are told.
        args = ["bud", "--isolation=chroot", "--layers", "--format=docker", f"--ignorefile={IGNOREFILE}", *args]
    elif plan.builder.name == "podman":
        args = ["build", "--layers", "--format=docker", f"--ignorefile={IGNOREFILE}", *args]
    else:
        args = ["build", *args]
    return plan.builder.command(*args, str(REPO))


def build(plan: BuildPlan) -> float:
    """Builds the image (making the base first where needed) unless its inputs are those of the last build
    (build_inputs.py); returns the seconds it took."""
    started = time.monotonic()
    if plan.python_image == BASE_IMAGE and not image_exists(plan.builder, BASE_IMAGE):
        print(f"image: making the base {BASE_IMAGE} with debootstrap (once)", flush=True)
        make_base(plan.builder)
        print(f"image: base made in {time.monotonic() - started:.1f} s", flush=True)
    base_id = image_id(plan.builder, plan.python_image) if plan.python_image else None
    inputs = inputs_digest(REPO, DOCKERFILE, IGNOREFILE, [plan.builder.name, plan.python_image, base_id,
                                                          str(plan.torch_wheels)])  # fmt: skip
    current_id = image_id(plan.builder, plan.tag) if image_exists(plan.builder, plan.tag) else None
    if up_to_date(plan.tag, inputs, current_id):
        print(f"image: {plan.tag} is up to date (same Dockerfile, sources and base as its build)", flush=True)
        return time.monotonic() - started
    with ExitStack() as stack:
        torch_index = None
        if plan.torch_wheels is not None:
            torch_index = stack.enter_context(serve_index(plan.torch_wheels, WHEEL_INDEX_PORT))
            print(f"image: torch from {plan.torch_wheels} through {torch_index}", flush=True)
        command = build_command(plan, torch_index)
        print("image: " + " ".join(command), flush=True)
        subprocess.run(command, check=True, timeout=BUILD_TIMEOUT_S, cwd=REPO)
    record_build(plan.tag, inputs, image_id(plan.builder, plan.tag))
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--builder", choices=["auto", "docker", "podman", "buildah"], default="auto")
    parser.add_argument("--python-image", default=None, help="the PYTHON_IMAGE build argument (default: auto)")
    args = parser.parse_args(argv)
    try:
        plan = plan_build(choose_builder(args.builder), args.tag, args.python_image)
    except BuilderMissing as error:
        print(f"image: {error}", file=sys.stderr)
        return 2
    print(f"image: builder {plan.builder.name}, base {plan.python_image or 'the Dockerfile default'}", flush=True)
    seconds = build(plan)
    print(f"image: {plan.tag} done in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
