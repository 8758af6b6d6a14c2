"""A package index on 127.0.0.1 for an image build that cannot reach PyTorch's CPU wheel index: a project
with a wheel in a local folder (pip's find-links here: torch's CPU build) is served from that folder; any
other project is redirected to PyPI's simple index. The CPU Dockerfile's TORCH_INDEX build argument then
names it (the build's RUN steps share the host's network: buildah's chroot isolation, `--network host`).
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

PYPI_SIMPLE = "https://pypi.org/simple"


def normalize(name: str) -> str:
    """PEP 503's project name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def local_wheels(folder: Path) -> dict[str, list[Path]]:
    """The folder's wheels by normalized project name (a wheel's name starts `<project>-<version>-`)."""
    wheels: dict[str, list[Path]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        wheels.setdefault(normalize(wheel.name.split("-", 1)[0]), []).append(wheel)
    return wheels


class IndexHandler(BaseHTTPRequestHandler):
    def __init__(self, *args: object, wheels: dict[str, list[Path]], **kwargs: object) -> None:
        self.wheels = wheels
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        parts = [unquote(p) for p in self.path.split("?", 1)[0].split("/") if p]
        if len(parts) == 2 and parts[0] == "simple":
            self.project_page(normalize(parts[1]))
        elif len(parts) == 2 and parts[0] == "files":
            self.wheel_file(parts[1])
        else:
            self.send_error(404)

    def project_page(self, project: str) -> None:
        if project not in self.wheels:
            self.send_response(302)
            self.send_header("Location", f"{PYPI_SIMPLE}/{project}/")
            self.end_headers()
            return
        links = "".join(
            f'<a href="/files/{quote(w.name)}">{html.escape(w.name)}</a>\n' for w in self.wheels[project]
        )
        body = f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def wheel_file(self, name: str) -> None:
        wheel = next((w for ws in self.wheels.values() for w in ws if w.name == name), None)
        if wheel is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(wheel.stat().st_size))
        self.end_headers()
        with wheel.open("rb") as f:
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@contextmanager
def serve_index(folder: Path, port: int) -> Iterator[str]:
    """The index on 127.0.0.1:`port` while the block runs; yields its simple-index URL."""
    handler = partial(IndexHandler, wheels=local_wheels(folder))
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/simple"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
