"""The README stays true to the CLI: every flag of `lmserve serve` and `lmserve generate` (from their real
--help) and every LMSERVE_* variable the config layer reads is documented, and the README and the design
note point only to files a clone has. (Its quick-start commands run in test_quickstart.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_process import REPO_ROOT, run_cli

README = REPO_ROOT / "README.md"
DOCS = [README, REPO_ROOT / "docs" / "design.md"]
# The only readers of LMSERVE_* variables (service/lmserve/cli_args.py gets the environment passed in).
CONFIG_LAYER = [REPO_ROOT / "service" / "lmserve" / "cli.py", REPO_ROOT / "service" / "lmserve" / "config.py"]
# Top-level folders of this repository: a backticked path starting with one of them must exist.
REPO_DIRS = ("service", "tests", "loadtests", "deploy", "protos", "docs")


def help_flags(command: str) -> list[str]:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:", 1)[1]
    return sorted(set(re.findall(r"^  (--[a-z][-a-z0-9]*)", options, flags=re.M)) - {"--help"})


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_flag_is_in_the_readme(command: str) -> None:
    text = README.read_text()
    flags = help_flags(command)
    assert len(flags) >= (26 if command == "serve" else 19)
    missing = [flag for flag in flags if not re.search(rf"`{re.escape(flag)}[` ]", text)]
    assert not missing, f"lmserve {command} flags missing from README.md: {missing}"


def test_every_variable_the_config_reads_is_in_the_readme() -> None:
    text = README.read_text()
    variables = sorted({var for path in CONFIG_LAYER for var in re.findall(r"LMSERVE_[A-Z0-9_]+", path.read_text())})
    assert {"LMSERVE_PORT", "LMSERVE_MAX_N", "LMSERVE_DRAIN_TIMEOUT_S", "LMSERVE_ENGINE"} <= set(variables)
    missing = [var for var in variables if f"`{var}`" not in text]
    assert not missing, f"LMSERVE_* variables missing from README.md: {missing}"
    # ...and the README names no variable that nothing reads.
    documented = set(re.findall(r"`(LMSERVE_[A-Z0-9_]+)`", text))
    readers = "\n".join(p.read_text() for p in (REPO_ROOT / "service").rglob("*.py"))
    readers += "\n".join(p.read_text() for p in (REPO_ROOT / "loadtests").rglob("*.py"))
    unread = sorted(var for var in documented if var not in readers)
    assert not unread, f"README.md documents variables no code reads: {unread}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_point_only_to_files_in_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../" not in text, f"{doc.name} points outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
    for path in re.findall(rf"`((?:{'|'.join(REPO_DIRS)})/[\w./-]+)`", text):
        if "*" not in path:
            assert (REPO_ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
