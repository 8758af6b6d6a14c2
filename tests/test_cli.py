"""The command line through its entry point: bad values, pre-flight checks before any weight is read,
`models`, `generate`'s defaults and `cache` listing and pruning.

The error cases, `models` and `cache` call lmserve.cli.main in this process (tests.cli_process.call_cli:
the same parser and checks, no interpreter start per case); `python -m lmserve` itself runs in subprocesses
for one error case and for `generate`."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmserve.checkpoints.fingerprint import file_sha256, record_path
from lmserve.checkpoints.gguf import gguf_key_of_digest
from lmserve.checkpoints.weights import CACHE_MARKER
from lmserve.engine.modeling import kernel_cache
from tests.cli_process import call_cli, free_port, run_cli


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


# ---- bad values ------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--seed", "-3"], "--seed"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--grpc-port", "-1"], "--grpc-port"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["serve", "--num-kv-blocks", "0"], "--num-kv-blocks"),
    (["serve", "--block-size", "0"], "--block-size"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "--max-num-batched-tokens", "-5"], "--max-num-batched-tokens"),
    (["serve", "--max-model-len", "0"], "--max-model-len"),
    (["serve", "--num-threads", "0"], "--num-threads"),
    (["serve", "--device", "gpu"], "--device"),
    (["serve", "--dtype", "fp8"], "--dtype"),
    (["serve", "--kernel-variant", "x86-64-v4"], "--kernel-variant"),
    (["serve", "--log-level", "loud"], "--log-level"),
    (["serve", "--served-model-name", "a,b"], "--served-model-name"),
    (["serve", "--served-embedding-model-name", " padded"], "--served-embedding-model-name"),
    (["serve", "--tool-call-parser", "json"], "--tool-call-parser"),
    (["serve", "--reasoning-parser", "r1"], "--reasoning-parser"),
    (["cache", "shrink"], "action"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_value_is_one_argparse_error(args: list[str], flag: str) -> None:
    result = call_cli(*args)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert f"argument {flag}" in line and "Traceback" not in result.stderr


BAD_VARIABLES = [
    ({"LMSERVE_PORT": "abc"}, "LMSERVE_PORT"),
    ({"LMSERVE_KV_CACHE_GIB": "-1"}, "LMSERVE_KV_CACHE_GIB"),
    ({"LMSERVE_DTYPE": "fp8"}, "LMSERVE_DTYPE"),
    ({"LMSERVE_KERNEL_VARIANT": "avx512bf16"}, "LMSERVE_KERNEL_VARIANT"),
    ({"LMSERVE_NO_PREFIX_CACHING": "maybe"}, "LMSERVE_NO_PREFIX_CACHING"),
    ({"LMSERVE_MAX_N": "0"}, "LMSERVE_MAX_N"),
    ({"LMSERVE_MAX_TOKENS_CAP": "lots"}, "LMSERVE_MAX_TOKENS_CAP"),
    ({"LMSERVE_DRAIN_TIMEOUT_S": "-1"}, "LMSERVE_DRAIN_TIMEOUT_S"),
    ({"LMSERVE_METRICS_OPEN": "perhaps"}, "LMSERVE_METRICS_OPEN"),
    ({"LMSERVE_SERVED_MODEL_NAME": "a,,b"}, "LMSERVE_SERVED_MODEL_NAME"),
    ({"LMSERVE_TOOL_CALL_PARSER": "xml"}, "LMSERVE_TOOL_CALL_PARSER"),
]


@pytest.mark.parametrize(("env", "var"), BAD_VARIABLES, ids=[v for _, v in BAD_VARIABLES])
def test_bad_variable_is_one_error_naming_it(env: dict[str, str], var: str) -> None:
    result = call_cli("serve", env=env)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: {var}") and "Traceback" not in result.stderr


def test_parser_flags_and_variables_reach_the_config() -> None:
    from lmserve.cli import build_parser, serve_config_from_args

    def config(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
        return serve_config_from_args(build_parser(env).parse_args(["serve", *args]), env)

    assert (config([], {}).tool_call_parser, config([], {}).reasoning_parser) == (None, None)  # the template's
    flags = config(["--tool-call-parser", "pythonic", "--reasoning-parser", "deepseek_r1"], {})
    assert (flags.tool_call_parser, flags.reasoning_parser) == ("pythonic", "deepseek_r1")
    env = {"LMSERVE_TOOL_CALL_PARSER": "mistral", "LMSERVE_REASONING_PARSER": "qwen3"}
    assert (config([], env).tool_call_parser, config([], env).reasoning_parser) == ("mistral", "qwen3")


def test_the_command_itself_exits_2_with_one_error_line() -> None:
    """The error cases above in a real `python -m lmserve` process, once: main's 2 is the exit status, the
    error is one stderr line, and there is no traceback."""
    result = run_cli("serve", "--port", "70000")
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "argument --port" in line and "Traceback" not in result.stderr


def test_every_serve_flag_shows_its_default_in_help() -> None:
    result = call_cli("serve", "--help")
    assert result.returncode == 0
    options = re.split(r"\n(?=  -)", result.stdout.split("options:", 1)[1])
    helps = {re.match(r"\s*(-[-\w]+)", block).group(1): " ".join(block.split()) for block in options if block.strip()}
    assert len(helps) >= 27  # every flag of `lmserve serve`, --help included
    for flag, text in helps.items():
        if flag != "-h":
            assert "(default: " in text, f"{flag} has no default in its help: {text}"
    assert "(default: 8000)" in helps["--port"] and "(default: 50051)" in helps["--grpc-port"]
    assert "[env LMSERVE_MODEL] (default: smollm2-135m-instruct)" in helps["--model"]
    # A variable's value is the default --help shows.
    port_help = call_cli("serve", "--help", env={"LMSERVE_PORT": "9123"}).stdout
    assert "(default: 9123)" in " ".join(port_help.split())


# ---- pre-flight: files and ports before any weight is read -----------------------------------------------

_IN_ACCESS, _IN_OPEN, _IN_NONBLOCK = 0x1, 0x20, 0o4000


class FileWatch:
    """inotify on a folder: which of its files were opened or read (by any process)."""

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(_IN_NONBLOCK)
        assert self._fd >= 0, os.strerror(ctypes.get_errno())
        assert self._libc.inotify_add_watch(self._fd, str(folder).encode(), _IN_ACCESS | _IN_OPEN) >= 0

    def touched(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                names.add(data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode() or ".")
                offset += 16 + length

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def watched_model(tiny_llama_dir: Path) -> Iterator[tuple[Path, FileWatch]]:
    watch = FileWatch(tiny_llama_dir)
    watch.touched()  # drop anything from before
    yield tiny_llama_dir, watch
    watch.close()


def _serve_fails_before_loading(watched: tuple[Path, FileWatch], *args: str, tmp_path: Path) -> str:
    model_dir, watch = watched
    started = time.monotonic()
    result = call_cli(
        "serve", "--model", str(model_dir), "--embedding-model", "none", "--cache-dir", str(tmp_path / "cache"), *args
    )
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "Traceback" not in result.stderr and took < 30
    assert watch.touched() == set(), "the model folder was opened before the error"
    assert not (tmp_path / "cache").exists()
    # The watch works: reading a weight file ourselves is seen.
    (model_dir / "model.safetensors").read_bytes()[:8]
    assert "model.safetensors" in watch.touched()
    return line


def test_port_in_use_is_reported_before_any_weight_is_read(watched_model, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _serve_fails_before_loading(watched_model, "--port", str(port), "--grpc-port", str(free_port()),
                                           tmp_path=tmp_path)
        assert line == (f"error: HTTP (--port) port {port} on 127.0.0.1 is already in use: stop what is using it "
                        "or choose another port")
        line = _serve_fails_before_loading(watched_model, "--port", str(free_port()), "--grpc-port", str(port),
                                           tmp_path=tmp_path)
        assert line.startswith(f"error: gRPC (--grpc-port) port {port} on 127.0.0.1 is already in use")


def test_key_and_tls_files_are_checked_before_any_weight_is_read(watched_model, tmp_path: Path) -> None:
    ports = ("--port", str(free_port()), "--grpc-port", str(free_port()))
    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys yet\n\n   \n")
    line = _serve_fails_before_loading(watched_model, "--api-key-file", str(empty), *ports, tmp_path=tmp_path)
    assert "holds no keys" in line and "every endpoint open" in line
    line = _serve_fails_before_loading(watched_model, "--api-key-file", str(tmp_path / "absent.txt"), *ports,
                                       tmp_path=tmp_path)
    assert line == f"error: API key file (--api-key-file) {tmp_path / 'absent.txt'} does not exist"
    line = _serve_fails_before_loading(
        watched_model, "--grpc-tls-cert", str(empty), "--grpc-tls-key", str(empty), *ports, tmp_path=tmp_path
    )
    assert "--grpc-tls-cert" in line and "not a PEM file" in line
    line = _serve_fails_before_loading(watched_model, "--port", "0", "--grpc-port", "0", tmp_path=tmp_path)
    assert line == "error: --port and --grpc-port are both 0 (off): nothing to serve"
    policy = tmp_path / "policy.yaml"
    policy.write_text("input: [not, a, mapping\n")
    line = _serve_fails_before_loading(watched_model, "--safety-policy", str(policy), *ports, tmp_path=tmp_path)
    assert line.startswith("error: ") and str(policy) in line
    line = _serve_fails_before_loading(
        watched_model, "--safety-policy", str(tmp_path / "absent.yaml"), *ports, tmp_path=tmp_path
    )
    assert line.startswith("error: ") and "absent.yaml" in line


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment")
def test_engine_vllm_without_vllm_fails_before_any_weight_is_read(watched_model, tmp_path: Path) -> None:
    ports = ("--port", str(free_port()), "--grpc-port", str(free_port()))
    line = _serve_fails_before_loading(watched_model, "--engine", "vllm", *ports, tmp_path=tmp_path)
    assert line.startswith("error: ") and "vLLM" in line


# ---- models, generate --------------------------------------------------------------------------------------


def _table(stdout: str, columns: tuple[str, ...]) -> list[list[str]]:
    """The rows of the table whose header line names `columns` (cells cut at the header's offsets)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(columns[0]))
    header, starts = lines[at], []
    for name in columns:
        starts.append(header.index(name, starts[-1] + 1 if starts else 0))
    assert header.split() == " ".join(columns).split()
    rows = []
    for line in lines[at + 1 :]:
        if not line.strip():
            break
        rows.append([line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line)], strict=True)])
    return rows


def _shown(path: Path) -> str:
    return f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)


MODEL_COLUMNS = ("ID", "KIND", "FAMILY", "SIZE", "CACHED", "WHERE")
CACHE_COLUMNS = ("NAME", "KIND", "SIZE", "USED", "USED BY / BUILT FROM")


def test_models_is_a_table(smollm2_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    result = call_cli("models", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    by_id = {row[0]: row for row in _table(result.stdout, MODEL_COLUMNS)}
    smol, minilm = by_id["smollm2-135m-instruct"], by_id["all-minilm-l6-v2"]
    assert smol[1:5] == ["generation", "llama (native)", "93.8 MiB", f"yes: {_shown(smollm2_dir)}"]
    assert smol[5].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert minilm[1:3] == ["embedding", "bert (transformers)"]
    assert minilm[4] == "not needed (a folder)" and minilm[3].endswith("MiB")
    converted = by_id[smollm2_dir.name]
    assert (converted[1], converted[2], converted[4]) == ("generation", "llama (native)", "yes")
    assert converted[5].startswith(_shown(smollm2_dir))
    assert "defaults: --model smollm2-135m-instruct --embedding-model all-minilm-l6-v2" in result.stdout

    fresh = call_cli("models", "--cache-dir", str(tmp_path / "empty"))
    rows = _table(fresh.stdout, MODEL_COLUMNS)
    assert [row[0] for row in rows] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert rows[0][2:5:2] == ["-", "no: converted at first use (about 20 s)"]  # no family before conversion
    assert not (tmp_path / "empty").exists()  # listing creates no cache


@pytest.mark.slow
def test_generate_documents_its_defaults_and_says_when_seed_does_nothing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    help_text = " ".join(call_cli("generate", "--help").stdout.split())
    assert "Sampling defaults: greedy decoding (--temperature 0), --top-p 1, at most 128 new tokens" in help_text
    assert "--max-tokens N most new tokens (default: 128)" in help_text
    assert "0: greedy (the most likely token each step) (default: 0.0)" in help_text

    args = ("--model", str(tiny_llama_dir), "--cache-dir", str(tmp_path), "--num-kv-blocks", "64", "--max-tokens", "6")
    greedy = run_cli("generate", "The capital of France is", *args)  # the command as a user runs it
    seeded = call_cli("generate", "The capital of France is", *args, "--seed", "7")  # the same code, in-process
    assert greedy.returncode == seeded.returncode == 0, greedy.stderr + seeded.stderr
    assert greedy.stdout == seeded.stdout  # the seed changes nothing in greedy decoding
    note = "note: --seed has no effect with greedy decoding (--temperature 0, the default); pass --temperature above 0 to sample"
    assert note in seeded.stderr.splitlines() and "note:" not in greedy.stderr
    assert f"INFO lmserve.progress: loading the weights of {tiny_llama_dir.name}" in greedy.stderr
    too_long = call_cli("generate", "hi", *args[:6], "--max-tokens", "100000", "--seed", "1", "--temperature", "0.5")
    assert "note:" not in too_long.stderr
    assert too_long.returncode == 2 and error_lines(too_long.stderr)[0].startswith("error: prompt (")


# ---- cache ---------------------------------------------------------------------------------------------------


def _fake_entry(cache: Path, name: str, marker: dict) -> Path:
    folder = cache / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 3000)
    (folder / CACHE_MARKER).write_text(json.dumps(marker))
    return folder


def test_cache_lists_entries_and_prunes_what_nothing_uses(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kept_file, gone_file = tmp_path / "kept.gguf", tmp_path / "gone.gguf"
    kept_file.write_bytes(b"GGUF kept model bytes")
    gone_file.write_bytes(b"GGUF a model deleted since")
    used = _fake_entry(cache, f"kept-{gguf_key_of_digest(file_sha256(kept_file, cache))}",
                       {"source": "gguf", "origin": str(kept_file)})
    unused = _fake_entry(cache, f"gone-{gguf_key_of_digest(file_sha256(gone_file, cache))}",
                         {"source": "gguf", "origin": str(gone_file)})
    gone_file.unlink()  # its record is stale now
    orphan_lora = _fake_entry(cache, "adapter-lora-0123456789ab",
                              {"source": "lora", "origin": str(tmp_path / "no-adapter"), "base": str(tmp_path)})
    old_tmp, young_tmp = cache / ".tmp-half-abc", cache / ".tmp-busy-def"
    for folder in (old_tmp, young_tmp):
        folder.mkdir()
        (folder / "part").write_bytes(b"p" * 10)
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    (cache / "notes").mkdir()  # not ours: listed, never removed
    kernels = cache / "kernels"
    kernels.mkdir()
    current = kernel_cache.library_path(cache, kernel_cache.kernel_key(kernel_cache.SOURCE_DIR))
    current.write_bytes(b"\x7fELF current")
    old_build = kernel_cache.library_path(cache, "0123456789abcdef")
    old_build.write_bytes(b"\x7fELF old")
    kernel_cache.remember_user(old_build, tmp_path / "deleted-checkout")

    result = call_cli("cache", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout, CACHE_COLUMNS)
    state = {row[0]: (row[1], row[3]) for row in rows}
    assert state == {
        ".tmp-busy-def": ("partial", "yes"),
        ".tmp-half-abc": ("partial", "no"),
        orphan_lora.name: ("lora", "no"),
        used.name: ("gguf", "yes"),
        unused.name: ("gguf", "no"),
        f"kernels/{current.name}": ("kernel", "yes"),
        f"kernels/{old_build.name}": ("kernel", "no"),
        "notes": ("other", "yes"),
    }
    sizes = {row[0]: row[2] for row in rows}
    assert sizes[used.name] == f"{(3000 + (used / CACHE_MARKER).stat().st_size) / 1024:.1f} KiB"
    assert result.stdout.splitlines()[0].startswith(f"cache {cache}: ")

    dry = call_cli("cache", "prune", "--dry-run", "--cache-dir", str(cache))
    assert dry.returncode == 0 and dry.stdout.count("would remove ") == 5  # 4 entries and the summary line
    assert unused.is_dir() and old_build.exists()

    pruned = call_cli("cache", "prune", "--cache-dir", str(cache))
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 4 entries" in pruned.stdout and "and 1 stale source records" in pruned.stdout
    assert sorted(p.name for p in cache.iterdir()) == sorted([".sources", ".tmp-busy-def", "kernels", "notes", used.name])
    assert sorted(p.name for p in kernels.iterdir()) == [current.name]
    assert not record_path(cache, gone_file.resolve()).exists() and record_path(cache, kept_file.resolve()).exists()
    rows = _table(call_cli("cache", "--cache-dir", str(cache)).stdout, CACHE_COLUMNS)
    assert all(row[3] == "yes" for row in rows)


def test_gguf_quantization_of_a_folder_model_fails_before_any_weight_is_read(watched_model, tmp_path: Path) -> None:
    ports = ("--port", str(free_port()), "--grpc-port", str(free_port()))
    model_dir = watched_model[0]
    line = _serve_fails_before_loading(watched_model, "--quantization", "q4_1", "--dtype", "float32", *ports,
                                       tmp_path=tmp_path)
    assert line == (f"error: --quantization q4_1 serves a GGUF file's own blocks, and the model {str(model_dir)!r} "
                    "is not a GGUF file (use --quantization none)")
