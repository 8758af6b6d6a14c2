"""/v1/rerank, /v1/score and Rerank, transport-neutral: text pairs scored by the rerank model (a cross-encoder).

Both go the embeddings' way (embedding_call.py): rate limit, model, the request's shape, the safety screen of
the texts, tokens (the reranker's length check), a queue slot; then the reranker's batch worker scores every
(query, document) pair. Rerank orders the documents by score; score returns one score per pair.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmserve.api.admission import Admitted, Caller, check_request
from lmserve.api.embedding_call import submit_admitted
from lmserve.api.errors import APIError
from lmserve.api.models import require_model
from lmserve.api.screening import screen_input
from lmserve.state import ServedModel

if TYPE_CHECKING:
    from lmserve.embeddings.reranker import CheckedPairs
    from lmserve.state import AppState

# Tokenizing this much text on the event loop would stall every other request; above it, a thread does it.
_INLINE_TOKENIZE_CHARS = 64_000


@dataclass(frozen=True)
class RerankInput:
    model: str | None
    query: str
    documents: list[str]
    top_n: int | None = None  # None or 0: every document
    return_documents: bool = True


@dataclass(frozen=True)
class ScoreInput:
    model: str | None
    text_1: list[str]  # one text (scored against each of text_2) or as many as text_2 (pairwise)
    text_2: list[str]


@dataclass(frozen=True)
class RankedDocument:
    index: int  # the document's place in the request
    relevance_score: float
    document: str | None  # its text, when return_documents


@dataclass(frozen=True)
class RerankOutput:
    id: str
    model: ServedModel
    results: list[RankedDocument]  # highest score first
    total_tokens: int


@dataclass(frozen=True)
class ScoreOutput:
    id: str
    created: int
    model: ServedModel
    scores: list[float]  # one per pair, in pair order
    total_tokens: int


@dataclass
class PairCall:
    """An admitted request for pair scores; `run()` once."""

    state: AppState
    caller: Caller
    model: ServedModel
    checked: CheckedPairs
    admitted: Admitted

    async def run(self) -> tuple[list[float], int]:
        reranker = self.state.reranker
        assert reranker is not None
        result = await submit_admitted(reranker, self.checked, self.caller, self.admitted)
        self.state.metrics.rerank_tokens_total.inc(result.total_tokens)
        return result.scores, result.total_tokens


def _check_texts(texts: list[str], param: str, allow_blank: bool) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise APIError(f"{param}[{i}] must be a string.", "invalid_type", param)
        if not allow_blank and not text.strip():
            raise APIError(f"{param} must contain text other than whitespace.", "invalid_value", param)


async def _prepare(
    state: AppState, caller: Caller, model: str | None, pairs: list[tuple[str, str]], names: list[str], param: str
) -> PairCall:
    """The steps every pair request takes once its texts are checked and screened: tokens, the reranker's
    length check, the token reservation and queue slot."""
    from lmserve.embeddings import EmbeddingInputError

    served = require_model(state.rerank_model, model, "rerank")
    reranker = state.reranker
    assert reranker is not None
    try:
        if sum(len(q) + len(d) for q, d in pairs) > _INLINE_TOKENIZE_CHARS:
            ids, type_ids = await asyncio.to_thread(reranker.tokenize_pairs, pairs)
        else:
            ids, type_ids = reranker.tokenize_pairs(pairs)
        checked = reranker.validate(ids, type_ids, names)
    except EmbeddingInputError as exc:
        raise APIError(str(exc), exc.code, exc.param or param) from None
    admitted = Admitted(state, caller, sum(len(x) for x in ids))
    return PairCall(state, caller, served, checked, admitted)


def _check_count(state: AppState, count: int, what: str, param: str) -> None:
    limit = state.config.limits.max_rerank_documents
    if count > limit:
        raise APIError(f"At most {limit} {what} per request, got {count}.", "invalid_value", param)


async def rerank(state: AppState, caller: Caller, inp: RerankInput) -> RerankOutput:
    """The documents ordered by their score against the query, the top `top_n` of them."""
    check_request(state, caller)
    require_model(state.rerank_model, inp.model, "rerank")
    if caller.record.log_prompts:
        caller.record.prompt = {"query": inp.query, "documents": inp.documents}
    if not inp.documents:
        raise APIError("documents must not be empty.", "invalid_value", "documents")
    _check_count(state, len(inp.documents), "documents", "documents")
    if inp.top_n is not None and inp.top_n < 0:
        raise APIError("top_n must be 0 (every document) or more.", "invalid_value", "top_n")
    _check_texts([inp.query], "query", allow_blank=False)
    _check_texts(inp.documents, "documents", allow_blank=True)
    (query,) = screen_input(state, caller, [inp.query], "query")
    documents = screen_input(state, caller, list(inp.documents), "documents")
    names = [f"the query with documents[{i}]" for i in range(len(documents))]
    call = await _prepare(state, caller, inp.model, [(query, d) for d in documents], names, "documents")
    scores, total_tokens = await call.run()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: equal scores keep request order
    top_n = inp.top_n or len(order)
    results = [
        RankedDocument(i, scores[i], inp.documents[i] if inp.return_documents else None) for i in order[:top_n]
    ]
    response_id = f"rerank-{caller.record.request_id}"
    caller.record.response_id = response_id
    return RerankOutput(response_id, call.model, results, total_tokens)


async def score(state: AppState, caller: Caller, inp: ScoreInput) -> ScoreOutput:
    """vLLM's score: text_1 against each text_2 (one text_1), or pairwise (as many of each)."""
    check_request(state, caller)
    require_model(state.rerank_model, inp.model, "rerank")
    if caller.record.log_prompts:
        caller.record.prompt = {"text_1": inp.text_1, "text_2": inp.text_2}
    for param, texts in (("text_1", inp.text_1), ("text_2", inp.text_2)):
        if not texts:
            raise APIError(f"{param} must not be empty.", "invalid_value", param)
    if len(inp.text_1) not in (1, len(inp.text_2)):
        raise APIError(
            f"text_1 must be one text or as many texts as text_2 ({len(inp.text_2)}), got {len(inp.text_1)}.",
            "invalid_value",
            "text_1",
        )
    _check_count(state, len(inp.text_2), "pairs", "text_2")
    _check_texts(inp.text_1, "text_1", allow_blank=False)
    _check_texts(inp.text_2, "text_2", allow_blank=True)
    text_1 = screen_input(state, caller, list(inp.text_1), "text_1")
    text_2 = screen_input(state, caller, list(inp.text_2), "text_2")
    firsts = text_1 * len(text_2) if len(text_1) == 1 else text_1
    names = [f"text_1[{0 if len(text_1) == 1 else i}] with text_2[{i}]" for i in range(len(text_2))]
    call = await _prepare(state, caller, inp.model, list(zip(firsts, text_2)), names, "text_2")
    scores, total_tokens = await call.run()
    response_id = f"score-{caller.record.request_id}"
    caller.record.response_id = response_id
    return ScoreOutput(response_id, int(time.time()), call.model, scores, total_tokens)
