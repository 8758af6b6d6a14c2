"""What an image build read, as one digest, so that `make image` with nothing changed does not run the
builder at all: with buildah's vfs storage even a build whose every step is cached copies each layer's
whole root filesystem (minutes), where this check takes a second.

The inputs: the Dockerfile, its ignore file, the files of the paths the ignore file lets in (`!path`
lines), as git lists them (tracked, or untracked and not git-ignored: __pycache__ is left out as the
ignore file leaves it out), and the build's settings (builder, base image and its id, torch's source).
The digest of the last build of each tag, with the image id it made, is kept in STATE_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

STATE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmserve" / "images"


def context_paths(ignorefile: Path) -> list[str]:
    """The paths the ignore file lets in (its `!` lines, which follow a leading `*`)."""
    lines = [line.strip() for line in ignorefile.read_text().splitlines()]
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def inputs_digest(repo: Path, dockerfile: Path, ignorefile: Path, settings: list[str | None]) -> str:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *context_paths(ignorefile)],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings).encode())
    for path in [dockerfile, ignorefile, *sorted(repo / name for name in set(listed.split("\0")) if name)]:
        if path.is_file():  # a tracked file deleted in the work tree is not in the context
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def state_file(tag: str) -> Path:
    return STATE_DIR / (tag.replace("/", "_").replace(":", "_") + ".json")


def up_to_date(tag: str, inputs: str, current_image_id: str | None) -> bool:
    """The image tagged `tag` is the one the last build with these inputs made."""
    try:
        state = json.loads(state_file(tag).read_text())
    except (OSError, ValueError):
        return False
    return current_image_id is not None and state == {"inputs": inputs, "image_id": current_image_id}


def record_build(tag: str, inputs: str, built_image_id: str) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state_file(tag).write_text(json.dumps({"inputs": inputs, "image_id": built_image_id}))
