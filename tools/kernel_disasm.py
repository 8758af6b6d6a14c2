"""Normalised disassembly of the C kernels, per function, for a CPU target this machine need not have.

A change to the AVX-512 code cannot be run on a CPU without AVX-512 (the development machine of a
contributor, CI), but it can be compiled for one. This compiles each kernel source on its own (-c, the
library's optimisation flags, -march=TARGET) and writes one file per target: every function's
instructions, with addresses and jump offsets removed, so that two checkouts' listings diff line by line.

    python tools/kernel_disasm.py --sources OLD/service/lmserve/engine/modeling --march cooperlake --out old.txt
    python tools/kernel_disasm.py --march cooperlake --out new.txt
    diff old.txt new.txt   # empty: the same instruction stream

Only the code generator's choices are compared: a refactor that leaves the listing unchanged cannot change
behaviour or speed on that target.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmserve.engine.modeling import kernel_cache  # noqa: E402  (torch-free)

# objdump's "  4005d6:\tmov ..." -> "mov ..."; "jmp 4005e0 <f+0x1a>" -> "jmp <f+0x1a>"
_ADDRESS = re.compile(r"^\s*[0-9a-f]+:\s*")
_TARGET = re.compile(r"\b[0-9a-f]+ <")
_RIP = re.compile(r"rip\+0x[0-9a-f]+")


def disassemble(source: Path, march: str, extra_flags: tuple[str, ...]) -> str:
    flags = [f for f in kernel_cache.CODEGEN_FLAGS if f not in ("-shared", "-march=native")]
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / (source.stem + ".o")
        subprocess.run(["cc", *flags, *extra_flags, f"-march={march}", "-c", str(source), "-o", str(obj)], check=True)
        listing = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", "-M", "intel", str(obj)], check=True, capture_output=True, text=True
        ).stdout
    functions: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in listing.splitlines():
        if line.endswith(">:"):  # "0000000000000040 <name>:"
            lines = functions.setdefault(f"{source.name}: {line.split()[-1]}", [])
        elif _ADDRESS.match(line):
            lines.append(_RIP.sub("rip+X", _TARGET.sub("<", _ADDRESS.sub("", line))).rstrip())
    # By name: where the compiler places a function in the object is not what is compared.
    return "\n".join(f"\n{name}\n" + "\n".join(body) for name, body in sorted(functions.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=Path, default=kernel_cache.SOURCE_DIR, help="a folder of kernel .c files")
    parser.add_argument("--march", required=True, help="gcc's -march, e.g. cooperlake (AVX-512 BF16), sapphirerapids")
    parser.add_argument("--flag", action="append", default=[], help="one more compiler flag (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sources = sorted(args.sources.glob("*.c"))
    args.out.write_text("\n".join(disassemble(s, args.march, tuple(args.flag)) for s in sources) + "\n")
    print(f"{args.out}: {len(sources)} sources, -march={args.march}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
