"""The kernels library's ABI as abi.h declares it: the one source of each exported function's signature and
of the constants C and Python share (gemm.c's column group width, decoder.c's layer table layout).

Torch-free and ctypes-free: it reads abi.h into plain data, which kernel_loader turns into ctypes
argument types. abi.h is written in a small subset of C (see its opening comment) so that this reader can
stay a few regular expressions; a declaration it cannot read is an error here, not a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HEADER = Path(__file__).with_name("abi.h")

# What may cross the boundary: every pointer is an address; these are the scalar types.
SCALAR_TYPES = ("int", "int64_t", "float")

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_DEFINE = re.compile(r"^#define\s+LMSERVE_(\w+)\s+(\d+)\s*$", re.MULTILINE)
_LAYER_ENUM = re.compile(r"enum\s+lmserve_layer_slot\s*\{([^}]*)\}\s*;")
_PROTOTYPE = re.compile(r"^(int|void)\s+(\w+)\s*\(([^)]*)\)\s*;", re.MULTILINE)


@dataclass(frozen=True)
class Param:
    name: str
    c_type: str  # "pointer" or one of SCALAR_TYPES


@dataclass(frozen=True)
class Function:
    name: str
    returns: str  # "int" or "void"
    params: tuple[Param, ...]


@dataclass(frozen=True)
class Abi:
    functions: dict[str, Function]
    constants: dict[str, int]  # LMSERVE_NAME -> value, keyed without the prefix
    layer_slots: tuple[str, ...]  # decoder_stack_bf16's layer table columns, lower case, in order


def _param(text: str, function: str) -> Param:
    words = text.replace("*", " * ").split()
    name = words[-1]
    type_words = [w for w in words[:-1] if w != "const"]
    if "*" in type_words:
        return Param(name, "pointer")
    if len(type_words) == 1 and type_words[0] in SCALAR_TYPES:
        return Param(name, type_words[0])
    raise ValueError(f"abi.h: {function}: parameter {text.strip()!r} is neither a pointer nor one of {SCALAR_TYPES}")


def parse(source: str) -> Abi:
    text = _COMMENT.sub(" ", source)
    functions = {}
    for returns, name, params in _PROTOTYPE.findall(text):
        plist = [] if params.strip() == "void" else [_param(p, name) for p in params.split(",")]
        functions[name] = Function(name, returns, tuple(plist))
    enum = _LAYER_ENUM.search(text)
    if enum is None:
        raise ValueError("abi.h: no `enum lmserve_layer_slot`")
    slots = [s.strip().removeprefix("LMSERVE_").lower() for s in enum.group(1).split(",") if s.strip()]
    if slots[-1] != "layer_slots":
        raise ValueError("abi.h: enum lmserve_layer_slot must end with LMSERVE_LAYER_SLOTS, its count")
    constants = {name: int(value) for name, value in _DEFINE.findall(text)}
    constants["LAYER_SLOTS"] = len(slots) - 1
    return Abi(functions, constants, tuple(slots[:-1]))


@cache
def read() -> Abi:
    return parse(HEADER.read_text())
