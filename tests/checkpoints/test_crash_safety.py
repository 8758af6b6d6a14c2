"""Crash safety of the model cache: a conversion or merge killed midway (SIGKILL of a real process) leaves
nothing a later start trusts, and the next start builds it again; a damaged entry (truncated, bit-flipped,
a file gone, no manifest) is found, removed with a warning, and rebuilt.

Everything runs on tiny real checkpoints: a 1-layer Llama GGUF with a 262-token byte-level vocabulary
(written here with the gguf package) and a LoRA adapter on the shared tiny Llama, so that each real
conversion or merge takes about a second.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmserve.cache import list_cache, prune_cache
from lmserve.checkpoints import integrity, load_weights, resolve_model
from lmserve.checkpoints.gguf import gguf_cache_path
from lmserve.checkpoints.weights import CACHE_MARKER
from tests.checkpoints.lora_adapters import save_random_lora
from tests.cli_process import REPO_ROOT, cli_env

CACHE_LOGGER = "lmserve.cache"
PAUSED = "PAUSED-AFTER-SAVE"
# Run in a child: resolve a model into a cache, but stop for good right after the weights are written
# and before the marker that completes the folder, so the parent can SIGKILL it at that point.
CHILD = """
import sys, time
from pathlib import Path
from lmserve.checkpoints import resolve_model
import lmserve.checkpoints.{module} as target

real_save = target.save_plain_model
def save_then_stop(model, dest):
    real_save(model, dest)
    print("{paused}", dest, flush=True)
    time.sleep(600)

target.save_plain_model = save_then_stop
resolve_model(sys.argv[1], Path(sys.argv[2]))
print("FINISHED", flush=True)
"""


def write_tiny_gguf(dest: Path, hidden: int = 32, ffn: int = 64, heads: int = 2, kv_heads: int = 1) -> Path:
    """A real, loadable one-layer Llama GGUF (float32 tensors, a byte-level BPE tokenizer)."""
    from gguf import GGUFWriter

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_gpt2_bytes(), "Ġt", "he", "Ġthe"]
    writer = GGUFWriter(str(dest), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    shapes.update(
        {
            "blk.0.attn_norm.weight": (hidden,),
            "blk.0.attn_q.weight": (hidden, hidden),
            "blk.0.attn_k.weight": (kv, hidden),
            "blk.0.attn_v.weight": (kv, hidden),
            "blk.0.attn_output.weight": (hidden, hidden),
            "blk.0.ffn_norm.weight": (hidden,),
            "blk.0.ffn_gate.weight": (ffn, hidden),
            "blk.0.ffn_up.weight": (ffn, hidden),
            "blk.0.ffn_down.weight": (hidden, ffn),
        }
    )
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.normal(0.0, 0.5, size=shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _gpt2_bytes() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "crash-lora"
    return save_random_lora(tiny_llama_dir, folder, r=2, alpha=4, targets=["q_proj"], seed=2)


def _kill_midway(module: str, ref: Path, cache: Path) -> Path:
    """Run a real conversion or merge of `ref` into `cache` in a child process and SIGKILL it once the
    weights are on disk but the folder is not yet complete; returns the temp folder it was writing."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(module=module, paused=PAUSED), str(ref), str(cache)],
        cwd=REPO_ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # blocks until the child pauses (or dies, with "")
        assert line.startswith(PAUSED), f"the child did not reach the pause: {line!r}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return Path(line.split(" ", 1)[1].strip())


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


# ---- killed midway ----------------------------------------------------------------------------------------


def test_gguf_conversion_killed_midway_is_not_trusted_and_is_redone(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    partial = _kill_midway("gguf", tiny_gguf, cache)
    # The weights were written, into a temp folder that nothing resolves to; no entry under the final name.
    assert partial.parent == cache and partial.name.startswith(".tmp-") and (partial / "model.safetensors").is_file()
    final = gguf_cache_path(tiny_gguf, cache)
    assert not final.exists() and _entries(cache) == []
    assert [(e.kind, e.is_used) for e in list_cache(cache).entries] == [("partial", True)]  # young: maybe in progress

    resolved = resolve_model(str(tiny_gguf), cache)
    assert resolved.path == final and integrity.entry_problem(final, cache) is None
    assert load_weights(final)["model.embed_tokens.weight"].shape == (262, 32)
    manifest = json.loads((final / CACHE_MARKER).read_text())[integrity.MANIFEST_KEY]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= manifest.keys()
    # The killed run's leftovers are an hour-old partial entry to `lmserve cache prune`, never an entry.
    old = time.time() - 2 * 3600
    os.utime(partial, (old, old))
    removed, _ = prune_cache(cache)
    assert [e.path for e in removed] == [partial] and _entries(cache) == [final.name]


def test_lora_merge_killed_midway_is_not_trusted_and_is_redone(tiny_adapter: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    partial = _kill_midway("lora", tiny_adapter, cache)
    assert partial.name.startswith(".tmp-crash-lora-lora-") and (partial / "model.safetensors").is_file()
    assert not (partial / CACHE_MARKER).exists() and _entries(cache) == []

    resolved = resolve_model(str(tiny_adapter), cache)
    assert resolved.source == "lora" and resolved.path.parent == cache
    assert _entries(cache) == [resolved.path.name] and integrity.entry_problem(resolved.path, cache) is None
    assert partial.name.startswith(f".tmp-{resolved.path.name}-")


# ---- damaged after completion ------------------------------------------------------------------------------


@pytest.fixture
def converted(tiny_gguf: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(cache, entry): a real, complete conversion of the tiny GGUF."""
    cache = tmp_path / "cache"
    return cache, resolve_model(str(tiny_gguf), cache).path


def _flip_bit(path: Path, offset: int) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back, it is found


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _delete(path: Path) -> None:
    path.unlink()


def _strip_manifest(path: Path) -> None:
    marker = path.parent / CACHE_MARKER
    info = json.loads(marker.read_text())
    del info[integrity.MANIFEST_KEY]
    marker.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage,file,problem",
    [
        (lambda p: _flip_bit(p, p.stat().st_size - 100), "model.safetensors", "does not hash"),
        (_truncate, "model.safetensors", "bytes;"),
        (lambda p: _flip_bit(p, 10), "tokenizer.json", "does not hash"),
        (_delete, "config.json", "is missing"),
        (_strip_manifest, "config.json", "older lmserve"),
    ],
    ids=["bit-flip-weights", "truncated-weights", "bit-flip-tokenizer", "file-gone", "no-manifest"],
)
def test_damaged_entry_is_found_removed_with_a_warning_and_rebuilt(
    converted: tuple[Path, Path], tiny_gguf: Path, damage, file: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache, entry = converted
    good = {p.name: p.read_bytes() for p in entry.iterdir() if p.name != CACHE_MARKER}
    damage(entry / file)
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    assert resolve_model(str(tiny_gguf), cache).path == entry
    (warning,) = [r.getMessage() for r in caplog.records if r.name == CACHE_LOGGER]
    assert f"cache entry {entry} is damaged" in warning and problem in warning and "building it again" in warning
    assert {p.name: p.read_bytes() for p in entry.iterdir() if p.name != CACHE_MARKER} == good  # rebuilt as it was
    assert _entries(cache) == [entry.name]  # the damaged copy is gone, no stale folder left
    assert integrity.entry_problem(entry, cache) is None


def test_an_unchanged_entry_is_not_hashed_again_but_a_touched_one_is(
    converted: tuple[Path, Path], tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, entry = converted
    assert resolve_model(str(tiny_gguf), cache).path == entry  # hashes once more (first start after the build)
    hashed: list[str] = []
    real = integrity._sha256
    monkeypatch.setattr(integrity, "_sha256", lambda path: hashed.append(path.name) or real(path))
    assert resolve_model(str(tiny_gguf), cache).path == entry and hashed == []
    os.utime(entry / "config.json")  # a touch alone, same bytes: hashed again, still trusted
    assert resolve_model(str(tiny_gguf), cache).path == entry and hashed == ["config.json"]
