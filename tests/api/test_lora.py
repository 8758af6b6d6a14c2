"""LoRA adapters chosen per request, through `lmserve serve --lora-modules` on a tiny random Llama base and
random PEFT adapters the tests build (different ranks, target sets, rsLoRA):

- every adapter's float32 greedy output, in batches mixing all adapters and the base at once with fewer
  slots than adapters (--max-loras 2: evictions), equals transformers + PEFT's for that adapter, token for
  token, over HTTP (openai SDK) and gRPC; the prefix cache never hands one adapter's KV to another;
- load, serve, unload and reload at run time over both transports while other adapters' streams run,
  nothing in flight disturbed;
- bad adapters refused with a clear error, the server still serving;
- /v1/models and ListModels list each adapter with its parent; metrics count by adapter; the access line
  names it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import metric_value
from tests.checkpoints.lora_adapters import save_random_lora
from tests.cli_process import call_cli, cli_server, free_port

MAX_TOKENS = 12
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (rank, alpha, targets, rsLoRA)
ADAPTERS = {
    "qv": (4, 8, ["q_proj", "v_proj"], False),
    "all": (8, 16, ALL_LINEAR, True),
    "mlp": (2, 4, ["up_proj", "down_proj"], False),
    "late": (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),  # loaded at run time
}
STARTUP = ("qv", "all", "mlp")
# Longer than a KV block (16 tokens), so that the prefix cache has full blocks to offer across adapters.
PROMPTS = [
    [1, 5, 77, 300, 12, 900, 45, 2000, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [1, 4000, 321, 99, 1234, 5678, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53],
]


@dataclass
class LoraServer:
    base_url: str
    grpc_target: str
    adapters: dict[str, Path]
    expected: dict[tuple[str | None, int], list[int]]  # (adapter or None, prompt index) -> token ids
    tokenizer: object
    log: Path

    def text(self, adapter: str | None, index: int) -> str:
        return self.tokenizer.decode(self.expected[(adapter, index)], skip_special_tokens=True)


def _reference(base_dir: Path, adapter_dir: Path | None) -> list[list[int]]:
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    outs = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=2)
        outs.append(out[0, len(prompt) :].tolist())
    return outs


@pytest.fixture(scope="module")
def lora_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraServer]:
    root = tmp_path_factory.mktemp("lora")
    adapters = {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        folder = save_random_lora(tiny_llama_dir, root / name, r=rank, alpha=alpha, targets=targets, seed=10 + i)
        if rslora:
            config_path = folder / "adapter_config.json"
            config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_rslora": True}))
        adapters[name] = folder
    expected = {}
    for name in (None, *ADAPTERS):
        for i, tokens in enumerate(_reference(tiny_llama_dir, None if name is None else adapters[name])):
            expected[(name, i)] = tokens
    port, grpc_port = free_port(), free_port()
    args = [
        "serve", "--model", str(tiny_llama_dir), "--embedding-model", "none", "--no-safety", "--dtype", "float32",
        "--port", str(port), "--grpc-port", str(grpc_port), "--cache-dir", str(root / "cache"),
        "--max-num-batched-tokens", "32", "--num-kv-blocks", "64",
        "--lora-modules", *(f"{n}={adapters[n]}" for n in STARTUP),
        "--max-loras", "2", "--max-cpu-loras", "2", "--allow-runtime-lora",
    ]  # fmt: skip
    log = root / "server.log"
    with cli_server(args, port, log) as base_url:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
        yield LoraServer(base_url, f"127.0.0.1:{grpc_port}", adapters, expected, tokenizer, log)


def _client(server: LoraServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120.0)


async def _complete(client: openai.AsyncOpenAI, model: str, index: int) -> tuple[str, int]:
    reply = await client.completions.create(model=model, prompt=PROMPTS[index], max_tokens=MAX_TOKENS, temperature=0)
    return reply.choices[0].text, reply.usage.completion_tokens


def test_models_list_each_adapter_with_its_parent(lora_server: LoraServer, tiny_llama_dir: Path) -> None:
    reply = httpx.get(f"{lora_server.base_url}/v1/models")
    assert reply.status_code == 200, reply.text
    cards = reply.json()["data"]
    base = cards[0]["id"]
    assert [c["id"] for c in cards] == [base, *STARTUP]
    assert cards[0]["parent"] is None
    for card in cards[1:]:
        assert card["parent"] == base and card["root"] == str(lora_server.adapters[card["id"]])

    async def grpc_list() -> list[pb.Model]:
        async with grpc.aio.insecure_channel(lora_server.grpc_target) as channel:
            return list((await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest())).data)

    models = asyncio.run(grpc_list())
    assert [(m.id, m.parent) for m in models] == [(base, ""), *((n, base) for n in STARTUP)]


def test_every_adapter_exact_in_batches_mixing_all_of_them(lora_server: LoraServer) -> None:
    """Base and three adapters, two prompts each, all at once on two slots (so adapters are evicted and
    loaded again mid-run), then once more one after the other (the prefix cache then holds every prompt's
    first block under the base and each adapter): each output is its adapter's, as transformers + PEFT."""
    base = httpx.get(f"{lora_server.base_url}/v1/models").json()["data"][0]["id"]
    jobs = [(name, i) for name in (None, *STARTUP) for i in range(len(PROMPTS))]

    async def run() -> tuple[list, list]:
        async with _client(lora_server) as client:
            together = await asyncio.gather(*(_complete(client, name or base, i) for name, i in jobs))
            one_by_one = [await _complete(client, name or base, i) for name, i in jobs]
        return together, one_by_one

    together, one_by_one = asyncio.run(run())
    for results in (together, one_by_one):
        for (name, i), (text, count) in zip(jobs, results, strict=True):
            assert (text, count) == (lora_server.text(name, i), len(lora_server.expected[(name, i)])), (name, i)
    metrics = httpx.get(f"{lora_server.base_url}/metrics").text
    for name in STARTUP:
        assert metric_value(metrics, "lmserve_lora_requests_total", {"lora_adapter": name}) >= 4
    assert metric_value(metrics, "lmserve_lora_evictions_total") >= 1
    assert metric_value(metrics, "lmserve_lora_adapters_resident") == 2
    assert metric_value(metrics, "lmserve_prefix_cache_hit_tokens_total") > 0
    assert '"lora_adapter": "all"' in lora_server.log.read_text()


def test_grpc_serves_each_adapter_exactly(lora_server: LoraServer) -> None:
    async def run() -> list[tuple[str, str]]:
        async with grpc.aio.insecure_channel(lora_server.grpc_target) as channel:
            stub = rpc.GenerationStub(channel)
            out = []
            for name in STARTUP:
                req = pb.CompletionRequest(
                    model=name, prompt_token_ids=pb.TokenIds(ids=PROMPTS[1]), max_tokens=MAX_TOKENS, temperature=0
                )
                reply = await stub.Complete(req)
                chunks = [c async for c in stub.CompleteStream(req)]
                out.append((reply.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)))
            return out

    for name, (unary, streamed) in zip(STARTUP, asyncio.run(run()), strict=True):
        assert unary == streamed == lora_server.text(name, 1), name


def test_load_unload_and_reload_at_run_time_with_streams_running(lora_server: LoraServer) -> None:
    """Streams of `qv` and `all` run while `late` is loaded (HTTP), served, `qv` unloaded under its own
    running stream (which finishes exactly), refused afterwards, and loaded again (gRPC)."""
    url = lora_server.base_url

    async def run() -> None:
        async with _client(lora_server) as client, httpx.AsyncClient(base_url=url, timeout=120.0) as http:

            async def stream(model: str, index: int) -> str:
                chunks = await client.completions.create(
                    model=model, prompt=PROMPTS[index], max_tokens=MAX_TOKENS, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in chunks if c.choices])

            running = [asyncio.create_task(stream("qv", 0)), asyncio.create_task(stream("all", 1))]
            load = await http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(lora_server.adapters["late"])})
            assert (load.status_code, load.text) == (200, "Success: LoRA adapter 'late' added successfully.")
            assert await _complete(client, "late", 0) == (lora_server.text("late", 0), len(lora_server.expected[("late", 0)]))
            unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"})
            assert unload.status_code == 200, unload.text
            assert await asyncio.gather(*running) == [lora_server.text("qv", 0), lora_server.text("all", 1)]
            with pytest.raises(openai.NotFoundError) as gone:
                await _complete(client, "qv", 0)
            assert gone.value.code == "model_not_found"
            again = await http.post("/v1/unload_lora_adapter", json={"lora_name": "qv"})
            assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"
            async with grpc.aio.insecure_channel(lora_server.grpc_target) as channel:
                models = rpc.ModelsStub(channel)
                reply = await models.LoadLoraAdapter(pb.LoadLoraAdapterRequest(lora_name="qv", lora_path=str(lora_server.adapters["qv"])))
                assert reply.message == "Success: LoRA adapter 'qv' added successfully."
                with pytest.raises(grpc.aio.AioRpcError) as taken:
                    await models.LoadLoraAdapter(pb.LoadLoraAdapterRequest(lora_name="qv", lora_path=str(lora_server.adapters["qv"])))
                assert taken.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already" in taken.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await models.UnloadLoraAdapter(pb.UnloadLoraAdapterRequest(lora_name="nope"))
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            assert await _complete(client, "qv", 1) == (lora_server.text("qv", 1), len(lora_server.expected[("qv", 1)]))
            assert await _complete(client, "late", 1) == (lora_server.text("late", 1), len(lora_server.expected[("late", 1)]))

    asyncio.run(run())


def _bad_adapters(good: Path, other_base: Path, dest: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, a phrase its error must hold)."""
    bad: dict[str, tuple[Path, str]] = {}

    def copy(name: str) -> Path:
        folder = dest / name
        shutil.copytree(good, folder)
        return folder

    bad["wrong-base"] = (
        save_random_lora(other_base, dest / "wrong-base", r=4, alpha=8, targets=["q_proj"], seed=3),
        "which this base has no projection of",
    )
    folder = copy("rank")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))
    bad["rank"] = (folder, "rank 64 is above --max-lora-rank 16")
    folder = copy("missing")
    (folder / "adapter_model.safetensors").unlink()
    bad["missing"] = (folder, "has no adapter weights")
    folder = copy("pickle")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    bad["pickle"] = (folder, "is a pickle checkpoint")
    folder = copy("nan")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    bad["nan"] = (folder, "NaN or infinite")
    folder = copy("saves-modules")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    bad["saves-modules"] = (folder, "modules_to_save")
    bad["not-a-folder"] = (dest / "nowhere", "is not a folder")
    return bad


def test_bad_adapters_are_refused_and_the_server_keeps_serving(
    lora_server: LoraServer, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """tiny_qwen2 has the same widths but three layers: its adapter names a layer the Llama base lacks."""
    bad = _bad_adapters(lora_server.adapters["mlp"], tiny_qwen2_dir, tmp_path)
    with httpx.Client(base_url=lora_server.base_url, timeout=60.0) as http:
        for name, (folder, phrase) in bad.items():
            reply = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
            assert reply.status_code == 400, (name, reply.text)
            error = reply.json()["error"]
            assert error["code"] == "invalid_value" and error["param"] == "lora_path", (name, error)
            assert phrase in error["message"], (name, error["message"])
        names = [c["id"] for c in http.get("/v1/models").json()["data"]]
        assert not set(bad) & set(names)
        missing = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    reply = asyncio.run(_complete_once(lora_server, "mlp", 0))
    assert reply == (lora_server.text("mlp", 0), len(lora_server.expected[("mlp", 0)]))


async def _complete_once(server: LoraServer, model: str, index: int) -> tuple[str, int]:
    async with _client(server) as client:
        return await _complete(client, model, index)


def test_runtime_loading_is_off_without_its_flag(server) -> None:
    """The shared test server has no --allow-runtime-lora: both transports refuse, naming the flag."""
    reply = httpx.post(
        f"{server.base_url}/v1/load_lora_adapter", headers=server.headers, json={"lora_name": "x", "lora_path": "/x"}
    )
    assert reply.status_code == 404 and "--allow-runtime-lora" in reply.json()["error"]["message"]

    async def grpc_load() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rpc.ModelsStub(channel).UnloadLoraAdapter(
                    pb.UnloadLoraAdapterRequest(lora_name="x"), metadata=server.grpc_metadata
                )
            return refused.value

    error = asyncio.run(grpc_load())
    assert error.code() == grpc.StatusCode.NOT_FOUND and "--allow-runtime-lora" in error.details()


def test_an_adapter_whose_folder_went_away_fails_its_own_requests_alone(lora_server: LoraServer, tmp_path: Path) -> None:
    """Two slots and two host copies: once `fragile` is out of both, its next request must read the folder
    again; the folder is gone, so that request fails (with the reason) and the others are served."""
    folder = tmp_path / "fragile"
    shutil.copytree(lora_server.adapters["mlp"], folder)

    async def run() -> None:
        async with _client(lora_server) as client, httpx.AsyncClient(base_url=lora_server.base_url, timeout=120.0) as http:
            load = await http.post("/v1/load_lora_adapter", json={"lora_name": "fragile", "lora_path": str(folder)})
            assert load.status_code == 200, load.text
            assert await _complete(client, "fragile", 0) == (lora_server.text("mlp", 0), len(lora_server.expected[("mlp", 0)]))
            for name in ("qv", "all", "qv", "all"):  # fragile leaves the slots and the host copies
                await _complete(client, name, 1)
            shutil.rmtree(folder)
            with pytest.raises(openai.InternalServerError) as failed:
                await _complete(client, "fragile", 0)
            assert "cannot be read" in failed.value.message
            assert await _complete(client, "qv", 0) == (lora_server.text("qv", 0), len(lora_server.expected[("qv", 0)]))

    asyncio.run(run())


def test_a_bad_adapter_at_start_is_one_error_line_before_the_base_loads(lora_server: LoraServer, tmp_path: Path) -> None:
    folder = tmp_path / "too-big"
    shutil.copytree(lora_server.adapters["qv"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    result = call_cli(
        "serve", "--model", str(tmp_path / "no-such-base-is-read"), "--embedding-model", "none",
        "--port", str(free_port()), "--grpc-port", "0", "--lora-modules", f"big={folder}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --lora-modules big: {folder / 'adapter_config.json'}: rank 32 is above --max-lora-rank 16"]
    assert "Traceback" not in result.stderr
