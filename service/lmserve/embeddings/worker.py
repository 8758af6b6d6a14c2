"""One encoder model on one worker thread: the queue, the batch loop and the lifecycle that the embedder
(embedder.py) and the reranker (reranker.py) share. A subclass says what one padded batch computes
(`_compute`); everything else, how requests are queued, cut into batches (batching.py), padded, counted
and answered, is here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from lmserve.embeddings import EmbedderNotRunning
from lmserve.embeddings.batching import EmbeddingBatchStats, EmbedItem, EmbedRequest, answer, select_batch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_placement(device: str, dtype: str) -> tuple[str, str]:
    """The device and dtype a model loads on, `auto` resolved (CUDA where there is one; float16 there, else
    float32); ValueError for a dtype not in DTYPES."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', not {dtype!r}")
    return device, dtype


def prepare_for_inference(model: torch.nn.Module, tokenizer: Any, device: str) -> int:
    """Move a loaded model to `device` for inference only; its pad token id (the tokenizer's, else the
    config's, else 0)."""
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


class BatchWorker:
    """The queue and worker thread of one encoder model. `label` names the model in errors and logs."""

    label = "encoder model"

    def __init__(self, model_name: str, *, device: str | torch.device, max_batch_tokens: int, pad_token_id: int) -> None:
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.model_name = model_name
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.pad_token_id = pad_token_id

        # stats, read by the metrics layer (written only by the worker thread)
        self.num_batches = 0
        self.num_tokens_embedded = 0
        self.num_inputs_embedded = 0
        self.num_padding_tokens = 0
        self.num_failed_batches = 0
        # Per-batch metrics hook, called on the worker thread; None costs nothing.
        self.on_batch: Callable[[EmbeddingBatchStats], None] | None = None

        self._cond = threading.Condition()
        self._queue: deque[EmbedItem] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----------------------------------------------------------------- lifecycle

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        name = f"{type(self).__name__.lower()}-{self.model_name}"  # embedder-..., reranker-...
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Fail what is still queued, let the batch in flight finish, and join the worker."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        error = EmbedderNotRunning(f"the {self.label} is shutting down")
        self._fail_requests({item.request for item in pending}, error)
        await asyncio.to_thread(thread.join)
        self._thread = None

    # ----------------------------------------------------------------- requests

    async def _submit_items(
        self, inputs: list[list[int]], type_ids: list[list[int]] | None = None, dimensions: int | None = None
    ) -> list[Any]:
        """One output per input sequence (checked by the subclass), in input order; EmbedderNotRunning when
        not started. A cancelled caller's still-queued sequences are skipped."""
        if not self.is_running:
            raise EmbedderNotRunning(f"the {self.label} is not running")
        loop = asyncio.get_running_loop()
        request = EmbedRequest(
            loop=loop,
            future=loop.create_future(),
            dimensions=dimensions,
            num_tokens=[len(ids) for ids in inputs],
            outputs=[None] * len(inputs),
            remaining=len(inputs),
        )
        items = [
            EmbedItem(request, i, ids, type_ids[i] if type_ids is not None else None) for i, ids in enumerate(inputs)
        ]
        with self._cond:
            if self._stopping:
                raise EmbedderNotRunning(f"the {self.label} is shutting down")
            self._queue.extend(items)
            self._cond.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            request.done = True  # the worker skips its still-queued sequences
            raise

    # ----------------------------------------------------------------- worker thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = select_batch(self._queue, self.max_batch_tokens)
            if not batch:
                continue
            try:
                self._process(batch)
            except BaseException as exc:  # noqa: BLE001 - a bad batch must not kill the worker
                self.num_failed_batches += 1
                logger.exception(f"{self.label} batch failed", extra={"model": self.model_name, "size": len(batch)})
                error = exc if isinstance(exc, Exception) else RuntimeError(f"{self.label} batch failed: {exc!r}")
                self._fail_requests({item.request for item in batch}, error)

    def _compute(
        self,
        batch: list[EmbedItem],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        lengths: torch.Tensor,
    ) -> list[Any]:
        """One output per row of the padded batch ([rows, max_len] tensors on the model's device), under
        torch.inference_mode."""
        raise NotImplementedError

    def _process(self, batch: list[EmbedItem]) -> None:
        batch.sort(key=lambda item: len(item.ids), reverse=True)
        n = len(batch)
        max_len = len(batch[0].ids)
        input_ids = torch.full((n, max_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, max_len), dtype=torch.long)
        has_types = batch[0].type_ids is not None
        token_type_ids = torch.zeros((n, max_len), dtype=torch.long) if has_types else None
        for row, item in enumerate(batch):
            L = len(item.ids)
            input_ids[row, :L] = torch.tensor(item.ids, dtype=torch.long)
            attention_mask[row, :L] = 1
            if token_type_ids is not None and item.type_ids is not None:
                token_type_ids[row, :L] = torch.tensor(item.type_ids, dtype=torch.long)
        lengths = attention_mask.sum(dim=1)
        with torch.inference_mode():
            outputs = self._compute(
                batch,
                input_ids.to(self.device),
                attention_mask.to(self.device),
                token_type_ids.to(self.device) if token_type_ids is not None else None,
                lengths.to(self.device),
            )

        num_real = int(lengths.sum())
        self.num_batches += 1
        self.num_inputs_embedded += n
        self.num_tokens_embedded += num_real
        self.num_padding_tokens += n * max_len - num_real
        # Before answering: a caller holding its outputs then finds this batch in the metrics too.
        if self.on_batch is not None:
            self.on_batch(EmbeddingBatchStats(n, num_real, n * max_len - num_real))

        for row, item in enumerate(batch):
            req = item.request
            if req.done:
                continue
            req.outputs[item.index] = outputs[row]
            req.remaining -= 1
            if req.remaining == 0:
                req.done = True
                answer(req, req.outputs, None)

    def _fail_requests(self, requests: set[EmbedRequest], error: BaseException) -> None:
        for req in requests:
            if req.done:
                continue
            req.done = True
            answer(req, None, error)
