"""The embedding model, server side: tokenize, batch, forward, pool, normalize. No HTTP here.

Usage from a transport:

    emb = Embedder.load(path, "all-minilm-l6-v2", max_batch_tokens=limits.embedding_max_batch_tokens)
    await emb.start()
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

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmserve.progress import progress_step

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "cls", "lasttoken", "max"]
_POOLING_MODES = ("mean", "cls", "lasttoken", "max")

# sentence-transformers 1_Pooling/config.json keys -> our modes
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
}
_UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How many queued sequences the worker looks at when filling one batch.
_SCAN_LIMIT = 4096


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


# --------------------------------------------------------------------------- pooling config


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, (dict, list)):
        raise ValueError(f"{path}: expected a JSON object")
    return data  # type: ignore[return-value]


def _model_max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the checkpoint's position table allows, from its config.json."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            if key == "max_position_embeddings" and "roberta" in str(config.get("model_type", "")):
                # RoBERTa-family position ids start after padding_idx: 514 positions -> 512 tokens.
                pad = config.get("pad_token_id")
                value -= (pad if isinstance(pad, int) else 1) + 1
            return value
    return None


@dataclass(frozen=True)
class PoolingConfig:
    mode: PoolingMode = "mean"
    normalize: bool = False
    max_seq_length: int = 512

    def __post_init__(self) -> None:
        if self.mode not in _POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {_POOLING_MODES}, not {self.mode!r}")
        if self.max_seq_length < 1:
            raise ValueError("max_seq_length must be positive")

    @classmethod
    def from_folder(cls, path: str | Path) -> PoolingConfig:
        """Read a sentence-transformers folder (a plain transformers folder works too).

        modules.json names the Pooling module's folder and whether a Normalize module follows;
        without it `1_Pooling/` is tried. Defaults: mean pooling, no normalization,
        max_seq_length = min(model max positions, sentence_bert_config.json max_seq_length).
        """
        path = Path(path)
        pooling_dir: Path | None = None
        normalize = False
        modules_file = path / "modules.json"
        if modules_file.is_file():
            modules = _read_json(modules_file)
            if not isinstance(modules, list):
                raise ValueError(f"{modules_file}: expected a JSON list of modules")
            for module in modules:
                kind = str(module.get("type", "")).rsplit(".", 1)[-1]
                if kind == "Pooling":
                    pooling_dir = path / str(module.get("path", ""))
                elif kind == "Normalize":
                    normalize = True
        elif (path / "1_Pooling").is_dir():
            pooling_dir = path / "1_Pooling"

        mode: str = "mean"
        if pooling_dir is not None and (pooling_dir / "config.json").is_file():
            mode = cls._mode_from_pooling_config(_read_json(pooling_dir / "config.json"), pooling_dir)

        lengths = []
        if (path / "config.json").is_file():
            positions = _model_max_positions(_read_json(path / "config.json"))
            if positions is not None:
                lengths.append(positions)
        sbert = path / "sentence_bert_config.json"
        if sbert.is_file():
            value = _read_json(sbert).get("max_seq_length")
            if isinstance(value, int) and value > 0:
                lengths.append(value)
        max_seq_length = min(lengths) if lengths else 512
        return cls(mode=mode, normalize=normalize, max_seq_length=max_seq_length)  # type: ignore[arg-type]

    @staticmethod
    def _mode_from_pooling_config(cfg: dict[str, Any], where: Path) -> str:
        if isinstance(cfg.get("pooling_mode"), str):  # newer single-key form
            mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(
                cfg["pooling_mode"], cfg["pooling_mode"]
            )
            if mode not in _POOLING_MODES:
                raise ValueError(f"{where}: unsupported pooling mode {cfg['pooling_mode']!r}")
            return mode
        unsupported = [k for k in _UNSUPPORTED_POOLING_FLAGS if cfg.get(k)]
        if unsupported:
            raise ValueError(f"{where}: unsupported pooling {unsupported}")
        modes = [mode for key, mode in _POOLING_FLAGS.items() if cfg.get(key)]
        if len(modes) > 1:
            raise ValueError(f"{where}: concatenated pooling modes {modes} are not supported")
        return modes[0] if modes else "mean"


# --------------------------------------------------------------------------- results and queue items


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]  # one per input, in input order
    num_tokens: list[int]  # tokens each input used (its prompt_tokens share)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


@dataclass(frozen=True)
class EmbeddingBatchStats:
    """What one forward did; handed to the embedder's `on_batch` hook (metrics)."""

    num_inputs: int
    num_tokens: int  # real tokens
    num_padding_tokens: int  # pad positions the forward computed as well


@dataclass(eq=False)
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[EmbeddingResult]
    dimensions: int | None
    num_tokens: list[int]
    vectors: list[list[float] | None]
    remaining: int
    done: bool = False  # set by the worker (finished/failed) or by embed (cancelled); read by the worker


@dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    ids: list[int]


def _resolve(
    future: asyncio.Future[EmbeddingResult], result: EmbeddingResult | None, error: BaseException | None
) -> None:
    """Runs on the request's loop."""
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the embedder


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
        self._queue: deque[_Item] = deque()
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
        )
        logger.info(
            "embedding model loaded",
            extra={
                "model": name,
                "pooling": pooling.mode,
                "normalize": pooling.normalize,
                "max_input_tokens": emb.max_input_tokens,
                "dimensions": emb.dimensions,
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

    def validate(self, inputs: list[list[int]], dimensions: int | None = None) -> None:
        """Raise EmbeddingInputError for anything `embed` would reject."""
        if dimensions is not None:
            if isinstance(dimensions, bool) or not isinstance(dimensions, int):
                raise EmbeddingInputError("dimensions must be an integer", param="dimensions")
            if not 1 <= dimensions <= self.dimensions:
                raise EmbeddingInputError(
                    f"dimensions must be between 1 and {self.dimensions} for model "
                    f"{self.model_name!r}, got {dimensions}",
                    param="dimensions",
                )
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
        """Vectors for token-id inputs (from `tokenize`), in input order.

        Raises EmbeddingInputError before queueing, EmbedderNotRunning when not started.
        `dimensions`: keep the first `dimensions` components and L2-normalize them.
        """
        self.validate(inputs, dimensions)
        if not self.is_running:
            raise EmbedderNotRunning("the embedding model is not running")
        loop = asyncio.get_running_loop()
        request = _Request(
            loop=loop,
            future=loop.create_future(),
            dimensions=dimensions,
            num_tokens=[len(ids) for ids in inputs],
            vectors=[None] * len(inputs),
            remaining=len(inputs),
        )
        items = [_Item(request, i, list(ids)) for i, ids in enumerate(inputs)]
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
                batch = self._take_batch()
            if not batch:
                continue
            try:
                self._process(batch)
            except BaseException as exc:  # noqa: BLE001 - a bad batch must not kill the worker
                self.num_failed_batches += 1
                logger.exception("embedding batch failed", extra={"model": self.model_name, "size": len(batch)})
                error = exc if isinstance(exc, Exception) else RuntimeError(f"embedding batch failed: {exc!r}")
                self._fail_requests({item.request for item in batch}, error)

    def _take_batch(self) -> list[_Item]:
        """Under the lock: pick the next batch from the queue.

        The oldest live sequence always goes (so nothing starves). Around it, in length order,
        the batch grows one neighbour at a time, always by the candidate that adds the least
        padding, while padded length x count stays within max_batch_tokens and the padding a
        candidate adds is no more than the real tokens it brings (a much shorter or longer
        sequence waits for a batch of its own kind instead).
        """
        queue = self._queue
        while queue and queue[0].request.done:
            queue.popleft()
        if not queue:
            return []
        budget = self.max_batch_tokens
        scan_len = min(len(queue), _SCAN_LIMIT)
        scan = [queue[k] for k in range(scan_len)]
        live = [k for k in range(scan_len) if not scan[k].request.done]  # live[0] == 0: the head
        order = sorted(live, key=lambda k: len(scan[k].ids))  # stable: older first among equals
        pos = order.index(0)
        lo, hi = pos - 1, pos + 1
        chosen = [0]
        max_len = len(scan[0].ids)
        while True:
            n = len(chosen)
            best: tuple[int, str] | None = None  # (added padding, side)
            if lo >= 0:
                length = len(scan[order[lo]].ids)
                waste = max_len - length
                if max_len * (n + 1) <= budget and waste <= length:
                    best = (waste, "lo")
            if hi < len(order):
                length = len(scan[order[hi]].ids)
                waste = (length - max_len) * n
                if length * (n + 1) <= budget and waste <= length and (best is None or waste < best[0]):
                    best = (waste, "hi")
            if best is None:
                break
            if best[1] == "lo":
                chosen.append(order[lo])
                lo -= 1
            else:
                chosen.append(order[hi])
                max_len = len(scan[order[hi]].ids)
                hi += 1
        taken = set(chosen)
        rest = [scan[k] for k in live if k not in taken]
        for _ in range(scan_len):
            queue.popleft()
        queue.extendleft(reversed(rest))
        return [scan[k] for k in chosen]

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        mode = self.pooling.mode
        if mode == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        elif mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "lasttoken":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        else:  # max
            pooled = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)
        if self.pooling.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def _process(self, batch: list[_Item]) -> None:
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
            pooled = self._pool(hidden, attention_mask, lengths)
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
                self._call(req, result, None)

    def _fail_requests(self, requests: set[_Request], error: BaseException) -> None:
        for req in requests:
            if req.done:
                continue
            req.done = True
            self._call(req, None, error)

    @staticmethod
    def _call(req: _Request, result: EmbeddingResult | None, error: BaseException | None) -> None:
        try:
            req.loop.call_soon_threadsafe(_resolve, req.future, result, error)
        except RuntimeError:  # the caller's loop is closed; nobody is waiting
            pass


__all__ = [
    "EmbedderNotRunning",
    "Embedder",
    "EmbeddingInputError",
    "EmbeddingResult",
    "PoolingConfig",
]
