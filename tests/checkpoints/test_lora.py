"""LoRA adapters: merged with peft, cached, and exported as plain folders."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

from lmserve.cache import list_cache, prune_cache
from lmserve.checkpoints import CheckpointError, export_model, load_weights, resolve_model, validate_model_folder
from lmserve.progress import PROGRESS_LOGGER
from tests.checkpoints.lora_adapters import save_random_lora


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "tiny-lora"
    return save_random_lora(tiny_llama_dir, folder, r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1)


def test_merged_weights_equal_peft_merge(adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(adapter_dir), tmp_path)
    assert (resolved.source, resolved.name) == ("lora", "tiny-lora")
    assert resolved.path.parent == tmp_path and resolved.path.name.startswith("tiny-lora-lora-")
    validate_model_folder(resolved.path)
    assert json.loads((resolved.path / "generation_config.json").read_text())["eos_token_id"] == 2

    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()
    merged = load_weights(resolved.path)
    original = load_weights(tiny_llama_dir)
    assert merged.keys() == original.keys()
    for name, tensor in merged.items():
        assert torch.equal(tensor, expected[name]), name
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(merged[q], original[q])  # adapted
    assert torch.equal(merged[k], original[k])  # not targeted


def test_second_resolve_uses_cache(adapter_dir: Path, tmp_path: Path, monkeypatch) -> None:
    first = resolve_model(str(adapter_dir), tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached merge must not load the model again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert resolve_model(str(adapter_dir), tmp_path) == first


def test_export_merged_adapter(adapter_dir: Path, tmp_path: Path) -> None:
    dest = export_model(str(adapter_dir), tmp_path / "out", cache_dir=tmp_path / "cache")
    assert dest == tmp_path / "out" and not (dest / "lmserve-cache.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(dest))
    exported = model.state_dict()
    for name, tensor in load_weights(resolve_model(str(adapter_dir), tmp_path / "cache").path).items():
        assert torch.equal(exported[name], tensor), name
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        export_model(str(adapter_dir), tmp_path / "busy", cache_dir=tmp_path / "cache")


def test_export_folder_into_empty_dest(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()  # existing but empty is fine
    dest = export_model(str(tiny_qwen2_dir), tmp_path / "dest", cache_dir=tmp_path / "cache")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(dest))
    source = load_weights(tiny_qwen2_dir)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no temp dir left


def test_adapter_with_unresolvable_base(adapter_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hub-lora"
    folder.mkdir()
    for item in adapter_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="base model of LoRA adapter .*nothing is downloaded"):
        resolve_model(str(folder), tmp_path / "cache")


def test_clones_share_one_merge_announced_once_and_prune_drops_it_when_gone(
    tiny_llama_dir: Path, adapter_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two clones holding the same adapter and base (the base named relative to the adapter) merge once:
    the cache is keyed by content, not by where the folders lie."""
    # A relative base is taken from the working directory first: run where "../base" is nothing.
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    cache = tmp_path / "cache"
    clones = [tmp_path / "clone-a", tmp_path / "clone-b"]
    for clone in clones:
        shutil.copytree(tiny_llama_dir, clone / "base")
        shutil.copytree(adapter_dir, clone / "tiny-lora")
        config_path = clone / "tiny-lora" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = "../base"
        config_path.write_text(json.dumps(config))
    merged = {resolve_model(str(clone / "tiny-lora"), cache).path for clone in clones}
    assert len(merged) == 1
    merges = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER and r.levelno == logging.INFO]
    assert merges == ["merging LoRA adapter tiny-lora into base (once per adapter and base)"]
    (entry,) = [e for e in list_cache(cache).entries if e.kind == "lora"]
    assert entry.path in merged and entry.is_used

    shutil.rmtree(clones[0])  # the clone that merged it: the other one still uses the entry
    assert [e.is_used for e in list_cache(cache).entries if e.kind == "lora"] == [True]
    removed, stale = prune_cache(cache)
    assert removed == [] and entry.path.is_dir()
    # Dropped: clone-a's adapter record and the hashes of its base's files (config.json, model.safetensors).
    assert sorted(p.parent.name for p in stale) == [".lora-users", ".sources", ".sources"]
    shutil.rmtree(clones[1])
    assert [e.is_used for e in list_cache(cache).entries if e.kind == "lora"] == [False]
    removed, stale = prune_cache(cache)
    assert [e.path for e in removed] == [entry.path] and not entry.path.exists()
    assert sorted(p.parent.name for p in stale) == [".lora-users", ".sources", ".sources"]
