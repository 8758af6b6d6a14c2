"""--served-model-name and --served-embedding-model-name over both transports: the first name is the one
listed and echoed, every name is accepted, the checkpoint's own name no longer is; and the flags' parsing."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.cli import build_parser, serve_config_from_args
from tests.api.conftest import SERVED_EMBEDDING_NAMES, SERVED_NAMES, LiveServer

MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def named(servers) -> LiveServer:
    return servers.named


def test_http_lists_the_first_name_and_answers_to_every_name(named: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{named.base_url}/v1", api_key=named.api_key, max_retries=0, timeout=60.0)
    with client:
        assert [m.id for m in client.models.list().data] == [SERVED_NAMES[0], SERVED_EMBEDDING_NAMES[0]]
        for name in SERVED_NAMES:
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
            )
            assert reply.model == SERVED_NAMES[0] and reply.choices[0].message.content
            assert client.models.retrieve(name).id == SERVED_NAMES[0]
        chunks = list(client.completions.create(model=SERVED_NAMES[1], prompt="One, two,", max_tokens=3, stream=True))
        assert {c.model for c in chunks} == {SERVED_NAMES[0]}
        vectors = client.embeddings.create(model=SERVED_EMBEDDING_NAMES[0], input=["a cat"])
        assert vectors.model == SERVED_EMBEDDING_NAMES[0] and len(vectors.data[0].embedding) == 384
        # The checkpoint's own ids are not served names here (as in vLLM).
        for model, served, call in (
            (MODEL, SERVED_NAMES[0], lambda m: client.completions.create(model=m, prompt="Hi", max_tokens=2)),
            (EMBED_MODEL, SERVED_EMBEDDING_NAMES[0], lambda m: client.embeddings.create(model=m, input=["a cat"])),
        ):
            with pytest.raises(openai.NotFoundError) as caught:
                call(model)
            assert caught.value.code == "model_not_found" and f"'{served}'" in caught.value.message
    metrics = httpx.get(f"{named.base_url}/metrics", headers=named.headers).text
    assert f'model="{SERVED_NAMES[0]}"' in metrics


def test_grpc_lists_the_first_name_and_answers_to_every_name(named: LiveServer) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(named.grpc_target) as channel:
            md = named.grpc_metadata
            models = await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=md)
            assert [(m.id, m.kind) for m in models.data] == [
                (SERVED_NAMES[0], "generation"), (SERVED_EMBEDDING_NAMES[0], "embedding")
            ]
            stub = rpc.GenerationStub(channel)
            for name in SERVED_NAMES:
                req = pb.ChatRequest(model=name, messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=4)
                assert (await stub.Chat(req, metadata=md)).model == SERVED_NAMES[0]
                async for chunk in stub.ChatStream(req, metadata=md):
                    assert chunk.model == SERVED_NAMES[0]
            emb = await rpc.EmbeddingsStub(channel).Embed(
                pb.EmbedRequest(model=SERVED_EMBEDDING_NAMES[0], input=["a cat"]), metadata=md
            )
            assert emb.model == SERVED_EMBEDDING_NAMES[0]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Complete(pb.CompletionRequest(model=MODEL, prompt="Hi", max_tokens=2), metadata=md)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and SERVED_NAMES[0] in caught.value.details()

    asyncio.run(go())


def _config(*args: str, env: dict[str, str] | None = None):
    env = env or {}
    return serve_config_from_args(build_parser(env).parse_args(["serve", *args]), env)


def test_flags_and_variables() -> None:
    assert _config().served_model_names == () and _config().served_embedding_model_names == ()
    config = _config("--served-model-name", "a", "b/c:latest", "--served-embedding-model-name", "e")
    assert config.served_model_names == ("a", "b/c:latest") and config.served_embedding_model_names == ("e",)
    env = {"LMSERVE_SERVED_MODEL_NAME": "x, y", "LMSERVE_SERVED_EMBEDDING_MODEL_NAME": "z"}
    assert _config(env=env).served_model_names == ("x", "y")
    assert _config("--served-model-name", "w", env=env).served_model_names == ("w",)  # a flag wins
    with pytest.raises(ValueError, match="names both models: a"):
        _config("--served-model-name", "a", "--served-embedding-model-name", "a")
    with pytest.raises(ValueError, match="needs an embedding model"):
        _config("--served-embedding-model-name", "e", "--embedding-model", "none")
