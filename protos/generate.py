"""Generate the Python stubs for protos/lmserve/v1/lmserve.proto into a package folder.

    python protos/generate.py service/lmserve/api/proto      # the server's stubs (`make protos` runs both lines)
    python protos/generate.py clients/python/lmserve/v1 --package lmserve.v1   # the client package's
    python protos/generate.py /tmp/x --check service/lmserve/api/proto   # exit 1 if the committed stubs differ
    python protos/generate.py /tmp/y --package lmserve.v1 --check clients/python/lmserve/v1

grpcio-tools writes `from lmserve.v1 import lmserve_pb2` into the service module, which only imports
when `lmserve/v1` is a top-level package. That is the client package's layout (clients/python, installed
as `lmserve-grpc`), so its stubs are protoc's output unchanged. For the server the import is rewritten to
the package the stubs live in (`--package`, default lmserve.api.proto), so they can sit inside `service/`.
Plain protoc with no plugins compiles the same file:

    python -m grpc_tools.protoc -I protos --python_out=OUT --grpc_python_out=OUT --pyi_out=OUT \\
        protos/lmserve/v1/lmserve.proto
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO = "lmserve/v1/lmserve.proto"
PACKAGE = "lmserve.api.proto"
NATURAL_PACKAGE = "lmserve.v1"  # where protoc's own imports point
OUTPUTS = ("lmserve_pb2.py", "lmserve_pb2.pyi", "lmserve_pb2_grpc.py")


def generate(out_dir: Path, package: str = PACKAGE) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", PROTO]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        for name in OUTPUTS:
            text = (Path(tmp) / "lmserve" / "v1" / name).read_text()
            text = text.replace(f"from {NATURAL_PACKAGE} import lmserve_pb2", f"from {package} import lmserve_pb2")
            (out_dir / name).write_text(text)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from protos/lmserve/v1/lmserve.proto by `make protos`; do not edit."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--package", default=PACKAGE,
        help=f"the package the stubs are imported as (default {PACKAGE}; {NATURAL_PACKAGE}: protoc's output as is)",
    )  # fmt: skip
    parser.add_argument("--check", type=Path, default=None, help="compare the output with this folder")
    args = parser.parse_args()
    generate(args.out_dir, args.package)
    if args.check is not None:
        stale = [
            n for n in OUTPUTS
            if not (args.check / n).is_file() or not filecmp.cmp(args.out_dir / n, args.check / n, shallow=False)
        ]  # fmt: skip
        if stale:
            print(f"stale gRPC stubs in {args.check}: {', '.join(stale)}; run `make protos`", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
