"""The rerank model: a cross-encoder (`*ForSequenceClassification` with one output, e.g. BERT or XLM-RoBERTa)
that scores (query, document) pairs, batched on the same worker thread machinery as the embedder (worker.py).

    rr = Reranker.load(path, "my-reranker", max_batch_tokens=8192)
    await rr.start()
    ids, type_ids = rr.tokenize_pairs([(query, doc) for doc in documents])
    checked = rr.validate(ids, type_ids, names=[f"documents[{i}]" for i in range(len(documents))])
    result = await rr.submit(checked)        # result.scores[i], result.num_tokens[i]

A pair is tokenized as the model's tokenizer joins two texts (BERT: [CLS] q [SEP] d [SEP] with segment ids
0/1; XLM-R: <s> q </s></s> d </s>), never truncated: a pair over the model's position limit is an error.
The score is the single logit through the checkpoint's activation (checkpoints/cross_encoder.py: the sigmoid
unless config.json names another), as sentence-transformers' CrossEncoder and vLLM's score/rerank compute it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmserve.checkpoints.cross_encoder import cross_encoder_spec
from lmserve.embeddings import EmbeddingInputError
from lmserve.embeddings.batching import EmbedItem
from lmserve.embeddings.embedder import untruncated_copy
from lmserve.embeddings.worker import DTYPES, BatchWorker, prepare_for_inference, resolve_placement
from lmserve.progress import progress_step

logger = logging.getLogger(__name__)

ACTIVATIONS = ("sigmoid", "identity")


@dataclass(frozen=True)
class CheckedPairs:
    """Token ids of sentence pairs that Reranker.validate accepted: what Reranker.submit takes."""

    inputs: list[list[int]]
    type_ids: list[list[int]] | None  # None: the model takes no token type ids


@dataclass(frozen=True)
class ScoreResult:
    scores: list[float]  # one per pair, in input order
    num_tokens: list[int]  # tokens each pair used

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Reranker(BatchWorker):
    label = "rerank model"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_name: str,
        *,
        max_input_tokens: int,
        activation: str = "sigmoid",
        device: str | torch.device = "cpu",
        max_batch_tokens: int = 8192,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(model_name, device=device, max_batch_tokens=max_batch_tokens, pad_token_id=pad_token_id)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.activation = activation
        self.family = f"{getattr(getattr(model, 'config', None), 'model_type', 'unknown')} (transformers)"
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.uses_type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self._fast = untruncated_copy(tokenizer)
        self._slow_lock = threading.Lock()

    @classmethod
    def load(
        cls, path: str | Path, name: str, dtype: str = "float32", device: str = "cpu", max_batch_tokens: int = 8192
    ) -> Reranker:
        """Load a local cross-encoder folder (never a hub id). dtype: float32 | bfloat16 | float16 | auto."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        spec = cross_encoder_spec(path)  # CheckpointError for anything but a one-output *ForSequenceClassification
        device, dtype = resolve_placement(device, dtype)
        with progress_step(f"loading the rerank model {name} ({dtype})"):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=DTYPES[dtype], local_files_only=True
            )
        pad = prepare_for_inference(model, tokenizer, device)
        rr = cls(
            model, tokenizer, name, max_input_tokens=spec.max_input_tokens, activation=spec.activation, device=device,
            max_batch_tokens=max_batch_tokens, pad_token_id=pad,
        )  # fmt: skip
        logger.info(
            "rerank model loaded",
            extra={"model": name, "activation": spec.activation, "max_input_tokens": spec.max_input_tokens, "dtype": dtype},
        )
        return rr

    def tokenize_pairs(self, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids (with the special tokens that join a pair, no truncation) and, for models that take
        them, token type ids, in pair order. CPU work: call it via `asyncio.to_thread` for big inputs."""
        if self._fast is not None:
            encoded = self._fast.encode_batch(pairs, add_special_tokens=True)
            ids, types = [list(e.ids) for e in encoded], [list(e.type_ids) for e in encoded]
        else:
            with self._slow_lock:
                out = self.tokenizer(
                    [q for q, _ in pairs], [d for _, d in pairs], add_special_tokens=True, truncation=False,
                    padding=False, return_token_type_ids=True, verbose=False,
                )  # fmt: skip
            ids, types = [list(x) for x in out["input_ids"]], [list(x) for x in out["token_type_ids"]]
        return ids, types if self.uses_type_ids else None

    def validate(self, inputs: list[list[int]], type_ids: list[list[int]] | None, names: list[str]) -> CheckedPairs:
        """The pairs as `submit` takes them, or EmbeddingInputError (context_length_exceeded) for a pair
        longer than the model takes; `names[i]` says which texts pair i joined, for the message."""
        if not inputs:
            raise EmbeddingInputError("there must be at least one pair to score", param=None)
        limit = self.max_input_tokens
        for ids, name in zip(inputs, names, strict=True):
            if len(ids) > limit:
                raise EmbeddingInputError(
                    f"{name} is {len(ids)} tokens as a pair, more than the {limit}-token limit of model "
                    f"{self.model_name!r}; shorten it",
                    code="context_length_exceeded",
                    param=None,
                )
        return CheckedPairs(inputs, type_ids if self.uses_type_ids else None)

    async def submit(self, checked: CheckedPairs) -> ScoreResult:
        """Scores for pairs `validate` accepted, in input order; EmbedderNotRunning when not started."""
        scores = await self._submit_items(checked.inputs, checked.type_ids)
        return ScoreResult(scores=scores, num_tokens=[len(ids) for ids in checked.inputs])

    def _compute(
        self,
        batch: list[EmbedItem],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        lengths: torch.Tensor,
    ) -> list[float]:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()  # [rows, 1]
        scores = logits[:, 0]
        if self.activation == "sigmoid":
            scores = torch.sigmoid(scores)
        return scores.cpu().tolist()
