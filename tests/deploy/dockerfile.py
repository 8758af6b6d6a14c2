"""A small Dockerfile reader for the tests: instructions with their stage, line continuations joined.

Enough for what deploy/docker/*.Dockerfile use (FROM ... AS, ARG, ENV k=v ..., RUN, COPY [--from=],
USER, WORKDIR, EXPOSE, HEALTHCHECK, ENTRYPOINT, CMD); not a general parser.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    text: str  # the rest of the instruction, continuation lines joined with single spaces
    stage: str  # the name of the FROM stage it belongs to


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    instructions: tuple[Instruction, ...]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        logical: list[str] = []
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):  # a comment inside a continued instruction
                continue
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            logical.append((pending + line).strip())
            pending = ""
        assert not pending, f"{path}: the last instruction ends in a line continuation"
        instructions = []
        stage = ""
        for line in logical:
            keyword, _, text = line.partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                words = text.split()
                stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0]
            instructions.append(Instruction(keyword, text.strip(), stage))
        return cls(path, tuple(instructions))

    def all(self, keyword: str, stage: str | None = None) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword and (stage is None or i.stage == stage)]

    @property
    def stages(self) -> list[str]:
        return [i.stage for i in self.all("FROM")]

    @property
    def final_stage(self) -> str:
        return self.stages[-1]

    def args(self) -> dict[str, str]:
        """Build arguments and their defaults (ARG NAME=default); later ones win."""
        out = {}
        for i in self.all("ARG"):
            name, _, default = i.text.partition("=")
            out[name] = default
        return out

    def env(self, stage: str) -> dict[str, str]:
        """ENV of a stage, in `ENV k=v k2=v2` form, $PATH-style references left as written."""
        out: dict[str, str] = {}
        for i in self.all("ENV", stage):
            for item in shlex.split(i.text):
                key, sep, value = item.partition("=")
                assert sep, f"{self.path}: use ENV key=value, not {i.text!r}"
                out[key] = value
        return out

    def copies(self, stage: str | None = None) -> list[tuple[str | None, list[str], str]]:
        """(from-stage or None, sources, destination) of every COPY."""
        out = []
        for i in self.all("COPY", stage):
            words = shlex.split(i.text)
            source_stage = None
            while words[0].startswith("--"):
                flag = words.pop(0)
                if flag.startswith("--from="):
                    source_stage = flag.removeprefix("--from=")
            *sources, dest = words
            out.append((source_stage, sources, dest))
        return out

    def exec_form(self, instruction: Instruction) -> list[str]:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK's CMD)."""
        text = instruction.text
        if instruction.keyword == "HEALTHCHECK":
            text = text[text.index("CMD ") + len("CMD ") :]
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value
