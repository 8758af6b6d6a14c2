"""Print lmserve's pinned requirements (pyproject's dependencies, plus the named extras) whose
distributions this interpreter does not have, one per line: what to add to an environment that
already brings its own versions of the rest (make vllm-venv: vLLM's)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]


def missing(extras: list[str]) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    out: list[str] = []
    for requirement in dict.fromkeys(wanted):
        try:
            importlib.metadata.distribution(_name(requirement))
        except importlib.metadata.PackageNotFoundError:
            out.append(requirement)
    return out


if __name__ == "__main__":
    print("\n".join(missing(sys.argv[1:])))
