"""The encoder models, server side: the embedding model (tokenize, batch, forward, pool, normalize) and the
rerank model (a cross-encoder scoring text pairs). No HTTP here.

worker.py is the worker thread and batch loop both models share, batching.py how its queue is cut into batches,
embedder.py the embedding model, pooling.py how a checkpoint pools, prompts.py the instruction it puts before a
text, matryoshka.py whether its vectors may be cut short, reranker.py the cross-encoder; this module holds the
errors a transport maps to responses.

Usage from a transport:

    emb = Embedder.load(path, "all-minilm-l6-v2", max_batch_tokens=limits.embedding_max_batch_tokens)
    await emb.start()
    texts = [emb.prompts.text(prompt_name) + t for t in texts]  # None: the folder's default prompt, if any
    ids = await asyncio.to_thread(emb.tokenize, texts)       # strings or token-id lists, in order
    result = await emb.embed(ids, dimensions=None)           # raises EmbeddingInputError (a clear 4xx)
    result.vectors[i], result.num_tokens[i]
    await emb.stop()

`embed` validates everything before queueing. One worker thread owns the model: it takes the
oldest queued sequence plus as many others as fit under `max_batch_tokens` (padded length x
count), runs one forward under `torch.inference_mode`, pools, normalizes, and hands each caller
its vectors through `loop.call_soon_threadsafe`. A request's inputs may be spread over several
batches. A forward that raises fails only the requests with a sequence in that batch.
"""

from __future__ import annotations


class EmbeddingInputError(ValueError):
    """An embeddings request this model can never serve. The message is safe to show the client.

    `code` is one of api/errors.py's string codes; `param` names the offending request field.
    """

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = "input") -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EmbedderNotRunning(RuntimeError):
    """`embed` called before `start` or after `stop`, or the embedder stopped under a request."""
