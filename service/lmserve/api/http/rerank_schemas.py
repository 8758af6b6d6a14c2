"""Pydantic models of the rerank and score endpoints: /v1/rerank (Cohere's and Jina's shape, as vLLM serves
it) and /v1/score (vLLM's). Like every request model (schemas.py), an unknown field is refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lmserve.api.http.schemas import UsageInfo, _Request, limit

Texts = list[str]


class RerankRequest(_Request):
    model: str | None = Field(None, description="The rerank model's name (or its checkpoint reference).")
    query: str = Field(description="The text every document is scored against.")
    documents: Texts = Field(
        description="The texts to rank (at least one).", json_schema_extra=limit(maxItems="max_rerank_documents")
    )
    top_n: int | None = Field(None, ge=0, description="Return only the best top_n; absent or 0: every document.")
    return_documents: bool = Field(True, description="Give each result its document's text.")


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="The document's place in the request's documents.")
    document: RerankDocument | None = Field(None, description="Absent when return_documents is false.")
    relevance_score: float = Field(description="The cross-encoder's score (by default the sigmoid of its logit).")


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult] = Field(description="Highest relevance_score first.")


class ScoreRequest(_Request):
    model: str | None = Field(None, description="The rerank model's name (or its checkpoint reference).")
    text_1: str | Texts = Field(description="One text, scored against each of text_2, or as many texts as text_2.")
    text_2: str | Texts = Field(
        description="The texts scored against text_1.", json_schema_extra=limit(maxItems="max_rerank_documents")
    )


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: UsageInfo
