"""The embedding model and its worker thread (the package's docstring has the usage): load a local folder,
tokenize, validate, and on one thread run batches (batching.py) through the model and pool them (pooling.py).

Any folder transformers' AutoModel loads as a bare encoder or decoder (BERT, XLM-RoBERTa, ModernBERT, the
body of a causal LM such as Qwen3-Embedding's) with its sentence-transformers files: pooling (pooling.py),
instruction prompts (prompts.py), Matryoshka sizes (matryoshka.py). Every batch is padded on the right, so a
sequence's last real token sits at its length - 1 whatever side the tokenizer pads on, and a causal model's
real tokens never see a pad.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmserve.embeddings import EmbedderNotRunning, EmbeddingInputError
from lmserve.embeddings.batching import (
    CheckedInputs,
    EmbeddingBatchStats,
    EmbeddingResult,
    EmbedItem,
    EmbedRequest,
    answer,
    select_batch,
)
from lmserve.embeddings.matryoshka import Matryoshka
from lmserve.embeddings.pooling import PoolingConfig, pool
from lmserve.embeddings.prompts import Prompts
from lmserve.progress import progress_step

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Embedder:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        pooling: PoolingConfig,
        model_name: str,
        *,
        device: str | torch.device = "cpu",
        max_batch_tokens: int = 8192,
        pad_token_id: int = 0,
        prompts: Prompts | None = None,
        matryoshka: Matryoshka | None = None,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.model_name = model_name
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.max_input_tokens = pooling.max_seq_length
        self.family = f"{getattr(getattr(model, 'config', None), 'model_type', 'unknown')} (transformers)"
        self.pad_token_id = pad_token_id
        self.prompts = prompts if prompts is not None else Prompts()
        self.matryoshka = matryoshka if matryoshka is not None else Matryoshka()
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

        # A private copy of the Rust tokenizer with truncation and padding off: tokenizer.json
        # files often carry both (this model's pads and truncates to 128), and the transformers
        # wrapper mutates the shared object per call, which is unsafe across threads.
        self._fast = None
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()
        self._slow_lock = threading.Lock()

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

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        name: str,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_tokens: int = 8192,
    ) -> Embedder:
        """Load a local folder (never a hub id). dtype: float32 | bfloat16 | float16 | auto."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model folder not found: {path}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "float16" if str(device).startswith("cuda") else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', not {dtype!r}")
        pooling = PoolingConfig.from_folder(path)
        prompts = Prompts.from_folder(path)
        matryoshka = Matryoshka.from_folder(path)
        with progress_step(f"loading the embedding model {name} ({dtype})"):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), dtype=_DTYPES[dtype], local_files_only=True)
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = 0
        emb = cls(
            model,
            tokenizer,
            pooling,
            name,
            device=device,
            max_batch_tokens=max_batch_tokens,
            pad_token_id=int(pad),
            prompts=prompts,
            matryoshka=matryoshka,
        )
        logger.info(
            "embedding model loaded",
            extra={
                "model": name,
                "pooling": pooling.mode,
                "normalize": pooling.normalize,
                "max_input_tokens": emb.max_input_tokens,
                "dimensions": emb.dimensions,
                "matryoshka": list(matryoshka.dimensions) if matryoshka.dimensions else matryoshka.is_declared,
                "prompts": sorted(name for name, text in prompts.texts.items() if text),
                "default_prompt": prompts.default_name,
                "dtype": dtype,
                "device": str(device),
            },
        )
        return emb

    # ----------------------------------------------------------------- tokenizing

    def tokenize(self, texts: list[str] | list[list[int]] | list[str | list[int]]) -> list[list[int]]:
        """Token ids with special tokens and no truncation, in input order.

        Strings are tokenized; lists of ints (already tokenized) are passed through unchanged
        (they are validated by `embed`). CPU work: call it via `asyncio.to_thread` for big inputs.
        """
        if isinstance(texts, str):
            raise EmbeddingInputError("input must be a list of strings or of token-id lists, not a bare string")
        out: list[list[int] | None] = [None] * len(texts)
        strings: list[str] = []
        where: list[int] = []
        for i, item in enumerate(texts):
            if isinstance(item, str):
                strings.append(item)
                where.append(i)
            elif isinstance(item, (list, tuple)):
                out[i] = list(item)
            else:
                raise EmbeddingInputError(
                    f"input[{i}] must be a string or a list of token ids, not {type(item).__name__}"
                )
        if strings:
            if self._fast is not None:
                encoded = [enc.ids for enc in self._fast.encode_batch(strings, add_special_tokens=True)]
            else:
                with self._slow_lock:
                    encoded = self.tokenizer(
                        strings, add_special_tokens=True, truncation=False, padding=False, verbose=False
                    )["input_ids"]
            for i, ids in zip(where, encoded):
                out[i] = list(ids)
        return out  # type: ignore[return-value]

    # ----------------------------------------------------------------- validation

    def validate(self, inputs: list[list[int]], dimensions: int | None = None) -> CheckedInputs:
        """The inputs as `submit` takes them, or EmbeddingInputError for anything this model cannot embed.
        The API calls it once per request (before its queue slot and safety screen); `embed` does both."""
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int):
                raise EmbeddingInputError("dimensions must be an integer", param="dimensions")
            if not 1 <= dimensions <= self.dimensions:
                raise EmbeddingInputError(
                    f"dimensions must be between 1 and {self.dimensions} for model "
                    f"{self.model_name!r}, got {dimensions}",
                    param="dimensions",
                )
            self.matryoshka.check(dimensions, self.model_name)
        if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
            raise EmbeddingInputError("input must be a non-empty list")
        limit = self.max_input_tokens
        vocab = self.vocab_size
        for i, ids in enumerate(inputs):
            if not isinstance(ids, (list, tuple)):
                raise EmbeddingInputError(f"input[{i}] must be a list of token ids, not {type(ids).__name__}")
            if len(ids) == 0:
                raise EmbeddingInputError(f"input[{i}] is empty: an input must have at least one token")
            if len(ids) > limit:
                raise EmbeddingInputError(
                    f"input[{i}] has {len(ids)} tokens, more than the {limit}-token limit of "
                    f"model {self.model_name!r}; shorten the input",
                    code="context_length_exceeded",
                )
            if not all(type(t) is int for t in ids) or min(ids) < 0 or max(ids) >= vocab:
                bad = next(t for t in ids if type(t) is not int or not 0 <= t < vocab)
                raise EmbeddingInputError(
                    f"input[{i}] contains {bad!r}, which is not a token id of model "
                    f"{self.model_name!r} (integers 0..{vocab - 1})"
                )
        return CheckedInputs([list(ids) for ids in inputs], dimensions)

    # ----------------------------------------------------------------- lifecycle

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"embedder-{self.model_name}", daemon=True)
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
        error = EmbedderNotRunning("the embedding model is shutting down")
        self._fail_requests({item.request for item in pending}, error)
        await asyncio.to_thread(thread.join)
        self._thread = None

    # ----------------------------------------------------------------- requests

    async def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> EmbeddingResult:
        """Vectors for token-id inputs (from `tokenize`), in input order: `validate`, then `submit`.

        Raises EmbeddingInputError before queueing, EmbedderNotRunning when not started.
        `dimensions`: keep the first `dimensions` components and L2-normalize them.
        """
        return await self.submit(self.validate(inputs, dimensions))

    async def submit(self, checked: CheckedInputs) -> EmbeddingResult:
        """Vectors for inputs `validate` accepted, in input order; EmbedderNotRunning when not started."""
        inputs, dimensions = checked.inputs, checked.dimensions
        if not self.is_running:
            raise EmbedderNotRunning("the embedding model is not running")
        loop = asyncio.get_running_loop()
        request = EmbedRequest(
            loop=loop,
            future=loop.create_future(),
            dimensions=dimensions,
            num_tokens=[len(ids) for ids in inputs],
            vectors=[None] * len(inputs),
            remaining=len(inputs),
        )
        items = [EmbedItem(request, i, ids) for i, ids in enumerate(inputs)]
        with self._cond:
            if self._stopping:
                raise EmbedderNotRunning("the embedding model is shutting down")
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
                logger.exception("embedding batch failed", extra={"model": self.model_name, "size": len(batch)})
                error = exc if isinstance(exc, Exception) else RuntimeError(f"embedding batch failed: {exc!r}")
                self._fail_requests({item.request for item in batch}, error)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden

    def _process(self, batch: list[EmbedItem]) -> None:
        batch.sort(key=lambda item: len(item.ids), reverse=True)
        n = len(batch)
        max_len = len(batch[0].ids)
        input_ids = torch.full((n, max_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, max_len), dtype=torch.long)
        for row, item in enumerate(batch):
            L = len(item.ids)
            input_ids[row, :L] = torch.tensor(item.ids, dtype=torch.long)
            attention_mask[row, :L] = 1
        lengths = attention_mask.sum(dim=1)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        lengths = lengths.to(self.device)

        with torch.inference_mode():
            hidden = self._forward(input_ids, attention_mask)
            pooled = pool(hidden, attention_mask, lengths, self.pooling)
            # per-request truncation + renormalization, grouped by requested dimensions
            rows_by_dims: dict[int | None, list[int]] = {}
            for row, item in enumerate(batch):
                rows_by_dims.setdefault(item.request.dimensions, []).append(row)
            vectors: list[list[float] | None] = [None] * n
            for dims, rows in rows_by_dims.items():
                sub = pooled[rows]
                if dims is not None:
                    sub = F.normalize(sub[:, :dims], p=2, dim=-1)
                for row, vec in zip(rows, sub.cpu().tolist()):
                    vectors[row] = vec

        num_real = int(lengths.sum())
        self.num_batches += 1
        self.num_inputs_embedded += n
        self.num_tokens_embedded += num_real
        self.num_padding_tokens += n * max_len - num_real
        # Before answering: a caller holding its vectors then finds this batch in the metrics too.
        if self.on_batch is not None:
            self.on_batch(EmbeddingBatchStats(n, num_real, n * max_len - num_real))

        for row, item in enumerate(batch):
            req = item.request
            if req.done:
                continue
            req.vectors[item.index] = vectors[row]
            req.remaining -= 1
            if req.remaining == 0:
                req.done = True
                result = EmbeddingResult(vectors=req.vectors, num_tokens=req.num_tokens)  # type: ignore[arg-type]
                answer(req, result, None)

    def _fail_requests(self, requests: set[EmbedRequest], error: BaseException) -> None:
        for req in requests:
            if req.done:
                continue
            req.done = True
            answer(req, None, error)
