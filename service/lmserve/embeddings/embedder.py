"""The embedding model (the package's docstring has the usage): load a local folder, tokenize, validate, and
on its worker thread (worker.py) run batches through the model and pool them (pooling.py).

Any folder transformers' AutoModel loads as a bare encoder or decoder (BERT, XLM-RoBERTa, ModernBERT, the
body of a causal LM such as Qwen3-Embedding's) with its sentence-transformers files: pooling (pooling.py),
instruction prompts (prompts.py), Matryoshka sizes (matryoshka.py). Every batch is padded on the right, so a
sequence's last real token sits at its length - 1 whatever side the tokenizer pads on, and a causal model's
real tokens never see a pad.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmserve.embeddings import EmbeddingInputError
from lmserve.embeddings.batching import CheckedInputs, EmbeddingResult, EmbedItem
from lmserve.embeddings.matryoshka import Matryoshka
from lmserve.embeddings.pooling import PoolingConfig, pool
from lmserve.embeddings.prompts import Prompts
from lmserve.embeddings.worker import DTYPES, BatchWorker, prepare_for_inference, resolve_placement
from lmserve.progress import progress_step

logger = logging.getLogger(__name__)

def untruncated_copy(tokenizer: Any) -> Any:
    """A private copy of a fast tokenizer's Rust tokenizer with truncation and padding off (None for a slow
    one): tokenizer.json files often carry both (all-MiniLM-L6-v2's pads and truncates to 128), and the
    transformers wrapper mutates the shared object per call, which is unsafe across threads."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_truncation()
    fast.no_padding()
    return fast


class Embedder(BatchWorker):
    label = "embedding model"

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
        super().__init__(model_name, device=device, max_batch_tokens=max_batch_tokens, pad_token_id=pad_token_id)
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_input_tokens = pooling.max_seq_length
        self.family = f"{getattr(getattr(model, 'config', None), 'model_type', 'unknown')} (transformers)"
        self.prompts = prompts if prompts is not None else Prompts()
        self.matryoshka = matryoshka if matryoshka is not None else Matryoshka()
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

        self._fast = untruncated_copy(tokenizer)
        self._slow_lock = threading.Lock()

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
        device, dtype = resolve_placement(device, dtype)
        pooling = PoolingConfig.from_folder(path)
        prompts = Prompts.from_folder(path)
        matryoshka = Matryoshka.from_folder(path)
        with progress_step(f"loading the embedding model {name} ({dtype})"):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
        pad = prepare_for_inference(model, tokenizer, device)
        emb = cls(
            model,
            tokenizer,
            pooling,
            name,
            device=device,
            max_batch_tokens=max_batch_tokens,
            pad_token_id=pad,
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

    # ----------------------------------------------------------------- requests

    async def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> EmbeddingResult:
        """Vectors for token-id inputs (from `tokenize`), in input order: `validate`, then `submit`.

        Raises EmbeddingInputError before queueing, EmbedderNotRunning when not started.
        `dimensions`: keep the first `dimensions` components and L2-normalize them.
        """
        return await self.submit(self.validate(inputs, dimensions))

    async def submit(self, checked: CheckedInputs) -> EmbeddingResult:
        """Vectors for inputs `validate` accepted, in input order; EmbedderNotRunning when not started."""
        vectors = await self._submit_items(checked.inputs, dimensions=checked.dimensions)
        return EmbeddingResult(vectors=vectors, num_tokens=[len(ids) for ids in checked.inputs])

    # ----------------------------------------------------------------- worker thread

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden

    def _compute(
        self,
        batch: list[EmbedItem],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        lengths: torch.Tensor,
    ) -> list[list[float]]:
        hidden = self._forward(input_ids, attention_mask)
        pooled = pool(hidden, attention_mask, lengths, self.pooling)
        # per-request truncation + renormalization, grouped by requested dimensions
        rows_by_dims: dict[int | None, list[int]] = {}
        for row, item in enumerate(batch):
            rows_by_dims.setdefault(item.request.dimensions, []).append(row)
        vectors: list[list[float]] = [[] for _ in batch]
        for dims, rows in rows_by_dims.items():
            sub = pooled[rows]
            if dims is not None:
                sub = F.normalize(sub[:, :dims], p=2, dim=-1)
            for row, vec in zip(rows, sub.cpu().tolist()):
                vectors[row] = vec
        return vectors
