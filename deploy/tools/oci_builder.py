"""The OCI builder `make image` and `make image-test` use, and the Python base image where Docker Hub is out
of reach.

Builder choice: docker, then podman, where `<engine> info` succeeds (a working engine); else buildah, run
without a daemon (vfs storage, chroot isolation: no user namespaces needed, the host's network shared).
Base: the Dockerfiles' PYTHON_IMAGE (python:3.11-slim) when a registry serves it; with buildah and no
registry, a Debian bookworm root filesystem made by debootstrap from Debian's apt mirror (python3 3.11,
venv, pip, `python` on the PATH: what the stages use of python:slim), committed once as BASE_IMAGE and
reused after that. The host's own CA certificates (/usr/local/share/ca-certificates: a TLS-inspecting
proxy's, say) go into it too, and pip is told to use the system's bundle, so that pip in the build reaches
PyPI wherever pip on the host does.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILDAH_FLAGS = ("--storage-driver", "vfs")
BASE_IMAGE = "localhost/lmserve-python:3.11-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python:3.11-slim has python3 with venv and pip, `python` on the PATH, and CA certificates for pip.
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
INFO_TIMEOUT_S = 20.0
BASE_TIMEOUT_S = 1200.0
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
# pip's own bundle (certifi) knows only the public CAs; the system's has the local ones update-ca-certificates added.
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"


class BuilderMissing(RuntimeError):
    """No engine answers and buildah is not installed."""


@dataclass(frozen=True)
class Builder:
    name: str  # docker | podman | buildah
    argv: tuple[str, ...]  # the command and the flags every call takes

    @property
    def is_daemonless(self) -> bool:
        return self.name == "buildah"

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]


def engine_works(engine: str) -> bool:
    """`<engine> info` succeeds: the CLI is there and reaches its engine (a docker CLI without a daemon fails)."""
    if shutil.which(engine) is None:
        return False
    try:
        return subprocess.run([engine, "info"], capture_output=True, timeout=INFO_TIMEOUT_S).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def choose_builder(requested: str = "auto") -> Builder:
    """`requested` (docker, podman, buildah) or, for auto, the first working engine, else buildah."""
    names = ["docker", "podman"] if requested == "auto" else [requested]
    for name in names:
        if name == "buildah":
            break
        if engine_works(name):
            return Builder(name, (name,))
        if requested != "auto":
            raise BuilderMissing(f"`{name} info` fails: no working {name} engine here")
    if shutil.which("buildah") is None:
        raise BuilderMissing(
            "no OCI builder: neither `docker info` nor `podman info` succeeds and buildah is not installed "
            "(apt-get install buildah, or start a Docker/Podman engine)"
        )
    return Builder("buildah", ("buildah", *BUILDAH_FLAGS))


def image_exists(builder: Builder, ref: str) -> bool:
    args = ("image", "inspect", ref) if not builder.is_daemonless else ("inspect", "--type", "image", ref)
    return subprocess.run(builder.command(*args), capture_output=True).returncode == 0


def image_id(builder: Builder, ref: str) -> str:
    args = ("image", "inspect", "--format", "{{.Id}}", ref)
    if builder.is_daemonless:
        args = ("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref)
    return subprocess.run(builder.command(*args), capture_output=True, text=True, check=True).stdout.strip()


def make_base(builder: Builder, ref: str = BASE_IMAGE, mirror: str = DEBIAN_MIRROR) -> None:
    """A bookworm root filesystem by debootstrap, committed as `ref` (buildah from scratch, one layer)."""
    if shutil.which("debootstrap") is None:
        raise BuilderMissing("no registry image and no debootstrap to make the base (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="lmserve-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs), mirror],
            check=True, stdout=subprocess.DEVNULL, timeout=BASE_TIMEOUT_S,
        )  # fmt: skip
        add_local_cas(rootfs)
        for cache in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        container = subprocess.run(builder.command("from", "scratch"), capture_output=True, text=True, check=True)
        name = container.stdout.strip()
        try:
            mount = subprocess.run(builder.command("mount", name), capture_output=True, text=True, check=True)
            # tar keeps owners, modes, device nodes and links as debootstrap made them.
            subprocess.run(
                f"tar -C {rootfs} --one-file-system -cf - . | tar -C {mount.stdout.strip()} -xpf -", shell=True, check=True
            )
            subprocess.run(builder.command("umount", name), check=True, stdout=subprocess.DEVNULL)
            subprocess.run(
                builder.command(
                    "config", "--env", "LANG=C.UTF-8", "--env",
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--cmd", "python3", name,
                ),
                check=True,
            )  # fmt: skip
            subprocess.run(builder.command("commit", "--quiet", name, ref), check=True, stdout=subprocess.DEVNULL)
        finally:
            subprocess.run(builder.command("rm", name), capture_output=True)


def add_local_cas(rootfs: Path) -> None:
    """The host's local CA certificates into the root filesystem's bundle; pip pointed at that bundle."""
    certificates = sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []
    for certificate in certificates:
        shutil.copy2(certificate, rootfs / LOCAL_CA_DIR.relative_to("/") / certificate.name)
    if certificates:
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL)
    (rootfs / "etc" / "pip.conf").write_text(PIP_CONF)
