"""GGUF: conversion matches transformers' own float32 load, the cache is reused and published atomically."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lmserve.checkpoints import CheckpointError, bundled_location, load_weights, resolve_model
from lmserve.checkpoints import fingerprint
from lmserve.checkpoints import gguf as gguf_mod
from lmserve.progress import PROGRESS_LOGGER


def _refuse(*args, **kwargs):
    raise AssertionError("a cached GGUF must not be loaded again")


def test_second_resolve_is_fast_and_loads_nothing(smollm2_dir: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _refuse)
    gguf_file = bundled_location("smollm2-135m-instruct")
    start = time.perf_counter()
    by_id = resolve_model("smollm2-135m-instruct", cache_dir)
    by_path = resolve_model(str(gguf_file), cache_dir)
    assert time.perf_counter() - start < 1.0
    assert by_id.path == by_path.path == smollm2_dir
    assert (by_path.source, by_path.name) == ("gguf", "SmolLM2-135M-Instruct.Q4_1")
    assert smollm2_dir.name == f"SmolLM2-135M-Instruct.Q4_1-{gguf_mod.gguf_cache_key(gguf_file, cache_dir)}"


@pytest.mark.slow
def test_converted_folder_matches_transformers_gguf_load(smollm2_dir: Path) -> None:
    gguf_file = bundled_location("smollm2-135m-instruct")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).state_dict()
    converted = load_weights(smollm2_dir)
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= converted.keys()
    assert converted.keys() <= reference.keys()  # lm_head is tied, so only the embedding is stored
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_converted_tokenizer_matches_gguf_tokenizer(smollm2_dir: Path) -> None:
    gguf_file = bundled_location("smollm2-135m-instruct")
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    converted = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert converted.eos_token == "<|im_end|>" and converted.chat_template
    messages = [{"role": "user", "content": "Hi there! ¿Qué tal? 123"}]
    assert converted.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(
        messages, tokenize=False
    )
    for text in ["Hello world", "  spaces\tand\nnewlines", "<|im_start|>user\nhé 😀<|im_end|>"]:
        assert converted(text).input_ids == reference(text).input_ids


# ---- cache mechanics, on a tiny valid GGUF with the heavy conversion replaced ----------------------


def _write_tiny_gguf(path: Path, scale: float = 1.0) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", scale * np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fake_converter(calls: list[Path], delay: float = 0.0):
    def convert(path: Path, dest: Path) -> None:
        calls.append(path)
        time.sleep(delay)  # widen the window in which a reader could see a half folder
        (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (dest / "model.safetensors").write_bytes(b"x" * 1000)
        gguf_mod.write_marker(dest, {"source": "gguf", "origin": str(path)})

    return convert


def _progress(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER and r.levelno == logging.INFO]


def test_convert_once_then_cache_hit(tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    calls: list[Path] = []
    monkeypatch.setattr(gguf_mod, "_convert_into", _fake_converter(calls))
    gguf_file = _write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    first = resolve_model(str(gguf_file), cache)
    (line,) = _progress(caplog)  # the one slow step of a first run says what it does
    assert line.startswith(f"converting tiny.gguf (") and f"float32 safetensors folder in {cache} (once per file" in line
    caplog.clear()
    second = resolve_model(str(gguf_file), cache)
    assert first == second and len(calls) == 1 and _progress(caplog) == []
    assert first.path.name.startswith("tiny-") and first.path.parent == cache
    # No temp dir left behind; .verified remembers the hashes the second resolve checked (integrity.py).
    assert sorted(p.name for p in cache.iterdir()) == [".sources", ".verified", first.path.name]
    # Touching the file without changing its bytes: hashed again, the same entry.
    os.utime(gguf_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_model(str(gguf_file), cache).path == first.path and len(calls) == 1
    # New content: a new entry, never the stale one.
    _write_tiny_gguf(gguf_file, scale=2.0)
    third = resolve_model(str(gguf_file), cache)
    assert third.path != first.path and len(calls) == 2


def test_cache_is_keyed_by_content_so_clones_share_it(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_mod, "_convert_into", _fake_converter(calls))
    cache = tmp_path / "cache"
    clone_a, clone_b = tmp_path / "clone-a" / "tiny.gguf", tmp_path / "clone-b" / "tiny.gguf"
    clone_a.parent.mkdir()
    clone_b.parent.mkdir()
    _write_tiny_gguf(clone_a)
    clone_b.write_bytes(clone_a.read_bytes())
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(clone_a.read_bytes())
    folders = {resolve_model(str(p), cache).path for p in (clone_a, clone_b, renamed)}
    assert len(folders) == 1 and len(calls) == 1  # one conversion for the three copies
    # Each path was hashed once and is remembered by size and mtime: a second round reads no file.
    records = sorted((cache / ".sources").glob("*.json"))
    assert len(records) == 3
    monkeypatch.setattr(fingerprint, "_hash_file", _refuse)
    assert {resolve_model(str(p), cache).path for p in (clone_a, clone_b, renamed)} == folders


def test_incomplete_folder_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_mod, "_convert_into", _fake_converter(calls))
    gguf_file = _write_tiny_gguf(tmp_path / "tiny.gguf")
    final = gguf_mod.gguf_cache_path(gguf_file, tmp_path / "cache")
    final.mkdir(parents=True)  # e.g. a hand copy cut short: no completion marker
    (final / "config.json").write_text("{")
    assert resolve_model(str(gguf_file), tmp_path / "cache").path == final
    assert len(calls) == 1 and json.loads((final / "config.json").read_text()) == {"model_type": "llama"}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".sources", final.name]


def test_concurrent_converters_publish_one_complete_folder(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_mod, "_convert_into", _fake_converter(calls, delay=0.2))
    gguf_file = _write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    final = gguf_mod.gguf_cache_path(gguf_file, cache)
    results: list[Path] = []
    seen_partial: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # the published folder, whenever it exists, is complete
        while not stop.is_set():
            if final.exists() and not (final / "lmserve-cache.json").is_file():
                seen_partial.append(str(final))

    def converter() -> None:
        results.append(gguf_mod.convert_gguf(gguf_file, cache))

    watcher = threading.Thread(target=reader)
    watcher.start()
    workers = [threading.Thread(target=converter) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    assert results == [final] * 3 and not seen_partial
    # .verified appears when a thread came late enough to find the entry published and check it.
    assert sorted(p.name for p in cache.iterdir() if p.name != ".verified") == [".sources", final.name]
    assert (final / "config.json").is_file()


def test_garbage_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(CheckpointError, match="garbage.gguf is not a valid GGUF file"):
        resolve_model(str(bad), tmp_path / "cache")
    other = tmp_path / "weights.txt"
    other.write_text("x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        resolve_model(str(other), tmp_path / "cache")


def test_truncated_gguf(tmp_path: Path) -> None:
    source = bundled_location("smollm2-135m-instruct")
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(4 << 20))  # header and metadata, but only part of the tensor data
    with pytest.raises(CheckpointError, match="cut.gguf is not a valid GGUF file .corrupt or truncated"):
        resolve_model(str(cut), tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not cache.exists() or [p.name for p in cache.iterdir()] == [".sources"]  # only the file's hash
