"""Embedding inputs that together exceed the embedder's batch budget are split over several engine
batches and served, never refused for their total size: over HTTP and gRPC, on the real server, whose
budget (EMBEDDING_BATCH_TOKENS) is a fraction of what one request may carry."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from tests.api.conftest import EMBEDDING_BATCH_TOKENS, LIMITS, LiveServer

EMBED_MODEL = "all-minilm-l6-v2"


def _inputs() -> list[str]:
    """As many inputs as a request may hold, about 100 to 240 tokens each (the model takes 256): 2.7 times
    the batch budget in all."""
    return [f"item {i}: " + "the quick brown fox jumps over the lazy dog " * (11 + i) for i in range(LIMITS.max_embedding_inputs)]


def test_inputs_over_the_batch_budget_are_split_not_refused(server: LiveServer, http: httpx.Client) -> None:
    embedder = server.state.embedder
    assert embedder is not None and embedder.max_batch_tokens == EMBEDDING_BATCH_TOKENS
    inputs = _inputs()
    token_counts = [len(ids) for ids in embedder.tokenize(inputs)]
    assert sum(token_counts) > 2 * EMBEDDING_BATCH_TOKENS and max(token_counts) <= embedder.max_input_tokens

    batches_before = embedder.num_batches
    resp = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": inputs})
    assert resp.status_code == 200, resp.text[:300]
    body = resp.json()
    assert body["usage"]["prompt_tokens"] == sum(token_counts)
    together = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    assert together.shape == (len(inputs), 384)
    assert embedder.num_batches - batches_before >= 3  # padded length x count per batch stays within the budget

    # Each vector is the one the input gets on its own (batching and padding change nothing but the float
    # summation order).
    for i in (0, 7, len(inputs) - 1):
        alone = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": inputs[i]}).json()["data"][0]["embedding"]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)

    async def over_grpc() -> pb.EmbedResponse:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            return await rpc.EmbeddingsStub(channel).Embed(pb.EmbedRequest(input=inputs), metadata=server.grpc_metadata)

    batches_before = embedder.num_batches
    reply = asyncio.run(over_grpc())
    assert [d.index for d in reply.data] == list(range(len(inputs))) and reply.usage.prompt_tokens == sum(token_counts)
    np.testing.assert_allclose(np.array([list(d.embedding) for d in reply.data]), together, atol=1e-5)
    assert embedder.num_batches - batches_before >= 3
