"""The docs stay true to the code: docs/configuration.md names every flag of `lmserve serve` and `lmserve
generate` (from their real --help) and every LMSERVE_* variable the config layer reads; the README stays a
README (under 300 lines); and the README and every page under docs/ point only to files (and headings) a
clone has. (The README's quick-start commands run in test_quickstart.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_process import REPO_ROOT, run_cli

README = REPO_ROOT / "README.md"
CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"
DOCS = [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 300
# The only readers of LMSERVE_* variables (service/lmserve/cli_args.py gets the environment passed in).
CONFIG_LAYER = [REPO_ROOT / "service" / "lmserve" / "cli.py", REPO_ROOT / "service" / "lmserve" / "config.py"]
# Top-level folders of this repository: a backticked path starting with one of them must exist.
REPO_DIRS = ("service", "tests", "loadtests", "benchmarks", "deploy", "protos", "docs")


def help_flags(command: str) -> list[str]:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:", 1)[1]
    return sorted(set(re.findall(r"^  (--[a-z][-a-z0-9]*)", options, flags=re.M)) - {"--help"})


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_flag_is_in_the_configuration_page(command: str) -> None:
    text = CONFIGURATION.read_text()
    flags = help_flags(command)
    assert len(flags) >= (26 if command == "serve" else 19)
    missing = [flag for flag in flags if not re.search(rf"`{re.escape(flag)}[` ]", text)]
    assert not missing, f"lmserve {command} flags missing from docs/configuration.md: {missing}"


def test_every_variable_the_config_reads_is_in_the_configuration_page() -> None:
    text = CONFIGURATION.read_text()
    variables = sorted({var for path in CONFIG_LAYER for var in re.findall(r"LMSERVE_[A-Z0-9_]+", path.read_text())})
    assert {"LMSERVE_PORT", "LMSERVE_MAX_N", "LMSERVE_DRAIN_TIMEOUT_S", "LMSERVE_ENGINE"} <= set(variables)
    missing = [var for var in variables if f"`{var}`" not in text]
    assert not missing, f"LMSERVE_* variables missing from docs/configuration.md: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_docs_name_no_variable_that_nothing_reads(doc: Path) -> None:
    documented = set(re.findall(r"`(LMSERVE_[A-Z0-9_]+)`", doc.read_text()))
    readers = "\n".join(p.read_text() for p in (REPO_ROOT / "service").rglob("*.py"))
    readers += "\n".join(p.read_text() for d in ("loadtests", "benchmarks") for p in (REPO_ROOT / d).rglob("*.py"))
    unread = sorted(var for var in documented if var not in readers)
    assert not unread, f"{doc.name} documents variables no code reads: {unread}"


def test_readme_stays_a_readme() -> None:
    num_lines = len(README.read_text().splitlines())
    assert num_lines < MAX_README_LINES, f"README.md has {num_lines} lines; reference belongs in docs/"
    text = README.read_text()
    for page in ("configuration", "http-api", "grpc-api", "operations", "safety", "architecture",
                 "kernels-and-quantization", "vllm-engine", "deployment", "testing", "model-families",
                 "serve-your-model", "lora-adapters", "benchmarks/README"):
        assert f"](docs/{page}.md" in text, f"README.md does not link docs/{page}.md"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lowercased, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # a `#` line in a code block is no heading
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_docs_point_only_to_files_in_the_repository(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.is_relative_to(REPO_ROOT), f"{doc.name} links to {target}, outside the repository"
        assert resolved.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{doc.name} links to {target}: no such heading in {resolved.name}"
    for path in re.findall(rf"`((?:{'|'.join(REPO_DIRS)})/[\w./-]+)`", doc.read_text()):
        if "*" not in path:
            assert (REPO_ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
