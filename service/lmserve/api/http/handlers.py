"""The HTTP endpoints other than generation: embeddings, rerank and score, tokenize/detokenize, models,
moderations and the LoRA adapters' load/unload. Each parses its body, calls the neutral handler and serializes the answer."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from lmserve.api.embedding_call import EmbedInput, prepare_embedding
from lmserve.api.errors import APIError
from lmserve.api.http import rerank_schemas, schemas
from lmserve.api.http.serialize import json_response
from lmserve.api.http.sse import until_disconnect
from lmserve.api.http.wire import caller, chat_messages, embedding_inputs
from lmserve.api.models import load_lora_adapter, served_models, unload_lora_adapter
from lmserve.api.moderation import moderate
from lmserve.api.rerank_call import RerankInput, ScoreInput, rerank, score
from lmserve.api.tokens import TokenizeInput, detokenize, tokenize

if TYPE_CHECKING:
    from lmserve.state import AppState


def _encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def embeddings(state: AppState, body: schemas.EmbeddingRequest, request: Request) -> Response:
    who = caller(request)
    inp = EmbedInput(
        body.model, embedding_inputs(body.input), body.dimensions, logged_input=body.input,
        truncate_prompt_tokens=body.truncate_prompt_tokens, truncation_side=body.truncation_side,
        prompt_name=body.prompt_name,
    )  # fmt: skip
    call = await prepare_embedding(state, who, inp)
    result = await until_disconnect(request, call.run())
    response = schemas.EmbeddingResponse(
        data=[
            schemas.EmbeddingData(index=i, embedding=_encode_vector(v, body.encoding_format))
            for i, v in enumerate(result.vectors)
        ],
        model=result.model.name,
        usage=schemas.UsageInfo(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens),
    )
    return json_response(response, who.response_headers)


async def rerank_documents(state: AppState, body: rerank_schemas.RerankRequest, request: Request) -> Response:
    who = caller(request)
    inp = RerankInput(body.model, body.query, body.documents, body.top_n, body.return_documents)
    out = await until_disconnect(request, rerank(state, who, inp))
    response = rerank_schemas.RerankResponse(
        id=out.id,
        model=out.model.name,
        usage=rerank_schemas.RerankUsage(prompt_tokens=out.total_tokens, total_tokens=out.total_tokens),
        results=[
            rerank_schemas.RerankResult(
                index=r.index,
                relevance_score=r.relevance_score,
                document=rerank_schemas.RerankDocument(text=r.document) if r.document is not None else None,
            )
            for r in out.results
        ],
    )
    # Without return_documents a result has no `document` key (Cohere's shape), rather than a null one.
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json", headers=who.response_headers)


async def score_pairs(state: AppState, body: rerank_schemas.ScoreRequest, request: Request) -> Response:
    who = caller(request)
    inp = ScoreInput(body.model, _texts(body.text_1), _texts(body.text_2))
    out = await until_disconnect(request, score(state, who, inp))
    response = rerank_schemas.ScoreResponse(
        id=out.id,
        created=out.created,
        model=out.model.name,
        data=[rerank_schemas.ScoreData(index=i, score=s) for i, s in enumerate(out.scores)],
        usage=schemas.UsageInfo(prompt_tokens=out.total_tokens, total_tokens=out.total_tokens),
    )
    return json_response(response, who.response_headers)


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def tokenize_text(state: AppState, body: schemas.TokenizeRequest) -> Response:
    inp = TokenizeInput(
        model=body.model,
        prompt=body.prompt,
        messages=None if body.messages is None else chat_messages(body.messages),
        add_special_tokens=body.add_special_tokens,
        add_generation_prompt=body.add_generation_prompt,
        return_token_strs=body.return_token_strs,
        tools=body.tools,
        template_kwargs=body.chat_template_kwargs,
    )
    out = tokenize(state, inp)
    response = schemas.TokenizeResponse(
        count=len(out.tokens), max_model_len=out.max_model_len, tokens=out.tokens, token_strs=out.token_strs
    )
    return json_response(response, {})


def detokenize_tokens(state: AppState, body: schemas.DetokenizeRequest) -> Response:
    return json_response(schemas.DetokenizeResponse(prompt=detokenize(state, body.model, body.tokens)), {})

def model_cards(state: AppState) -> list[schemas.ModelCard]:
    return [
        schemas.ModelCard(
            id=m.served.name, created=m.served.created, max_model_len=m.max_model_len,
            root=m.served.root or m.served.name, parent=m.served.parent, family=m.family,
        )  # fmt: skip
        for m in served_models(state)
    ]


def retrieve_model(state: AppState, model_id: str) -> Response:
    for card, info in zip(model_cards(state), served_models(state), strict=True):
        if model_id in info.served.aliases:
            return json_response(card, {})
    raise APIError(f"The model '{model_id}' does not exist.", "model_not_found", "model")


async def load_lora(state: AppState, body: schemas.LoadLoraAdapterRequest, request: Request) -> Response:
    who = caller(request)
    text = await load_lora_adapter(state, who, body.lora_name, body.lora_path, body.load_inplace)
    return PlainTextResponse(text, headers=who.response_headers)


async def unload_lora(state: AppState, body: schemas.UnloadLoraAdapterRequest, request: Request) -> Response:
    who = caller(request)
    text = await unload_lora_adapter(state, who, body.lora_name)
    return PlainTextResponse(text, headers=who.response_headers)


def moderation(state: AppState, body: schemas.ModerationRequest, request: Request) -> Response:
    who = caller(request)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    out = moderate(state, who, body.model, texts)
    response = schemas.ModerationResponse(
        id=out.id, model=out.model, results=[schemas.ModerationResult(**r.to_dict()) for r in out.results]
    )
    return json_response(response, who.response_headers)
