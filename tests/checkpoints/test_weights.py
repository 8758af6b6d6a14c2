"""load_weights over sharded folders, and index consistency."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve.checkpoints import CheckpointError, load_weights, resolve_model


@pytest.fixture(scope="module")
def sharded_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model.save_pretrained(str(folder), max_shard_size="10MB")
    for item in tiny_llama_dir.iterdir():
        if item.name.startswith("tokenizer") or item.name.endswith(".jinja"):
            shutil.copy(item, folder / item.name)
    return folder


def test_sharded_load_equals_single_file(sharded_dir: Path, tiny_llama_dir: Path) -> None:
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    single = load_weights(tiny_llama_dir)
    sharded = load_weights(sharded_dir)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) and sharded[k].device.type == "cpu" for k in single)
    assert resolve_model(str(sharded_dir), sharded_dir / "cache").source == "folder"


def test_missing_shard(sharded_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(sharded_dir, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}, which is missing"):
        resolve_model(str(folder), tmp_path)
    with pytest.raises(CheckpointError, match="which is missing"):
        load_weights(folder)


def test_index_naming_absent_tensor(sharded_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(sharded_dir, tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.ghost.weight, which no shard holds"):
        load_weights(folder)


def test_load_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a weights file"):
        load_weights(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="has no weights"):
        load_weights(tmp_path)
