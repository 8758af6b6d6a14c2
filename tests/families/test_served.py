"""Every family served over HTTP by the real server, to the openai SDK: concurrent float32 greedy completions
whose text and token counts are transformers' `generate`, chat, and /v1/models naming the family. One
family through the `lmserve serve` command itself, and an unservable architecture refused by `lmserve serve` with exit 2 before any weight is read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from lmserve.app import build_state
from lmserve.config import EngineConfig, ServeConfig
from lmserve.preflight import PreflightError, check_architecture
from tests.api.conftest import ServerThread
from tests.cli_process import call_cli, cli_server, free_port
from tests.families.conftest import Family, family_checkpoint
from tests.families.variants import GENERIC, NATIVE
from tests.test_cli import FileWatch

MAX_TOKENS = 20  # test_exactness.MAX_NEW_TOKENS: the references' length


def _serve_config(family: Family, tmp: Path) -> ServeConfig:
    return ServeConfig(
        model=str(family.folder), embedding_model=None, cache_dir=tmp, safety=False, grpc_port=0,
        engine=EngineConfig(dtype="float32", device="cpu", num_kv_blocks=96, block_size=16, max_num_batched_tokens=48),
    )  # fmt: skip


def _check_completions(client: openai.OpenAI, family: Family, expected_family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(family.folder)
    (card,) = client.models.list().data
    assert card.model_extra["family"] == expected_family

    def complete(prompt: list[int]):
        return client.completions.create(model=card.id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)

    with ThreadPoolExecutor(len(family.prompts)) as pool:  # all at once: batched, prefills chunked by 48
        responses = list(pool.map(complete, family.prompts))
    for i, (response, expected) in enumerate(zip(responses, family.expected, strict=True)):
        assert response.usage.completion_tokens == len(expected), f"{family.name}: prompt {i}"
        assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), f"{family.name}: {i}"
    chat = client.chat.completions.create(
        model=card.id, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0.0
    )
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens >= 1


@pytest.mark.parametrize("name", [*NATIVE, *GENERIC])
def test_served_over_http(name: str, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> None:
    family = family_checkpoint(name, tmp_path_factory, smollm2_dir)
    state = build_state(_serve_config(family, tmp_path_factory.mktemp("cache")))
    thread = ServerThread(state, {"main": state})
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{thread.port('main')}/v1", api_key="unused", max_retries=0)
        path = "native" if name in NATIVE else "transformers"
        _check_completions(client, family, f"{state.engine.runner.hf_config.model_type} ({path})")
    finally:
        thread.stop()


@pytest.fixture
def cli_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Family:
    return family_checkpoint(request.param, tmp_path_factory, smollm2_dir)


# One family through the command itself (a process start costs ~10 s on 2 cores): the transformers-class path
# is served in-process above (test_served_over_http[cohere]), the command line is the same for both.
@pytest.mark.parametrize("cli_family, expected", [("gemma2", "gemma2 (native)")], indirect=["cli_family"])
@pytest.mark.slow
def test_lmserve_serve_command(cli_family: Family, expected: str, tmp_path: Path) -> None:
    port = free_port()
    args = [
        "serve", "--model", str(cli_family.folder), "--embedding-model", "none", "--no-safety", "--dtype", "float32",
        "--port", str(port), "--grpc-port", "0", "--cache-dir", str(tmp_path / "cache"), "--max-num-batched-tokens", "48",
    ]  # fmt: skip
    with cli_server(args, port, tmp_path / "server.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        _check_completions(client, cli_family, expected)
    log = (tmp_path / "server.log").read_text()
    assert f"model loaded: {expected}" in log


@pytest.fixture
def unservable(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[tuple[Path, FileWatch]]:
    folder = tmp_path / "t5-like"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5", "is_encoder_decoder": True,
                                                    "architectures": ["T5ForConditionalGeneration"]}))  # fmt: skip
    watch = FileWatch(folder)
    watch.touched()
    yield folder, watch
    watch.close()


def test_unservable_architecture_exits_2_before_loading(unservable: tuple[Path, FileWatch], tmp_path: Path) -> None:
    folder, watch = unservable
    result = call_cli(
        "serve", "--model", str(folder), "--embedding-model", "none", "--port", str(free_port()), "--grpc-port", "0",
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {folder / 'config.json'}: model_type='t5' (T5ForConditionalGeneration) cannot be served: it is an "
        "encoder-decoder model; lmserve serves decoders; `--engine vllm` serves more architectures where vLLM runs"
    ], result.stderr
    assert "Traceback" not in result.stderr
    assert watch.touched() <= {".", "config.json", "adapter_config.json"}, "weights were read before the error"


def test_quantization_on_the_transformers_path_is_refused_at_preflight(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path
) -> None:
    """The same preflight `lmserve serve` runs (its exit 2 is test_unservable_architecture's path)."""
    family = family_checkpoint("cohere", tmp_path_factory, smollm2_dir)
    with pytest.raises(PreflightError) as refused:
        check_architecture(str(family.folder), "auto", "int8")
    assert str(refused.value) == (
        f"--quantization int8 runs on lmserve's own modules, and {family.folder} (cohere) is served by "
        "transformers' CohereForCausalLM (docs/model-families.md)"
    )
    check_architecture(str(family.folder), "auto", "none")
