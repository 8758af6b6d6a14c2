"""The HTTP transport: an OpenAI-compatible FastAPI app over an AppState (`create_app(state)`).

Routes: /v1/completions, /v1/chat/completions, /v1/responses (and GET/DELETE /v1/responses/{id}), /v1/embeddings,
/v1/rerank (and /rerank), /v1/score (and /score), /v1/models[/{id}], /tokenize, /detokenize, /version, /livez,
/readyz, /health, /metrics, /docs, /openapi.json.

Every error is `{"error": {"message", "type", "param", "code"}}` (never FastAPI's 422 shape). Generation
goes through the transport-neutral calls in api/, shared with gRPC; http/ only parses and serializes.

Structured outputs (`response_format`, vLLM's `structured_outputs`) and tool calls (`tools`, `tool_choice`)
are parsed in api/structured.py and api/tools.py, shared with gRPC, as is the reasoning split (api/reasoning.py). Not supported (documented in the
OpenAPI schema): `suffix`, `best_of` != n, image/audio content parts. With `echo` + `logprobs`, prompt
tokens carry null logprobs.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from lmserve.api.errors import APIError
from lmserve.api.http import generation, handlers, rerank_schemas, responses, schemas
from lmserve.api.http.errors import error_response, install_error_handlers
from lmserve.api.http.middleware import AccountingMiddleware, AuthMiddleware, BodyLimitMiddleware, JsonBodyMiddleware
from lmserve.api.http.openapi import (
    BODY_ERRORS,
    ERROR_RESPONSES,
    GENERATION_ERRORS,
    MODEL_ERRORS,
    PLAIN_TEXT_200,
    PROBE_RESPONSES,
    STORED_ERRORS,
    STREAM_200,
    build_openapi,
    schema_limits,
)
from lmserve.api.http.serialize import json_response
from lmserve.logs import PROBE_PATHS
from lmserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lmserve.state import readiness

if TYPE_CHECKING:
    from lmserve.state import AppState


def _version() -> str:
    try:
        return metadata.version("lmserve")
    except metadata.PackageNotFoundError:
        return "0.1.0"



def _unavailable(reason: str) -> Response:
    return error_response(APIError(f"Not ready: {reason}.", "service_unavailable"))


def create_app(state: AppState) -> FastAPI:
    """The HTTP app over `state` (models already loaded; started by the caller)."""
    app = FastAPI(
        title="lmserve",
        version=_version(),
        description=__doc__,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    install_error_handlers(app, state)

    @app.post(
        "/v1/completions",
        response_model=schemas.CompletionResponse,
        responses={**GENERATION_ERRORS, **STREAM_200},
        tags=["openai"],
    )
    async def create_completion(body: schemas.CompletionRequest, request: Request) -> Response:
        """OpenAI completions; `stream: true` answers Server-Sent Events ending in `data: [DONE]`."""
        return await generation.completion(state, body, request)

    @app.post(
        "/v1/chat/completions",
        response_model=schemas.ChatCompletionResponse,
        responses={**GENERATION_ERRORS, **STREAM_200},
        tags=["openai"],
    )
    async def create_chat_completion(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions (text content only; tools reach the template, calls are not parsed)."""
        return await generation.chat(state, body, request)

    @app.post("/v1/responses", responses={**GENERATION_ERRORS, **STREAM_200}, tags=["openai"])
    async def create_response(body: responses.ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API over the chat path; `stream: true` answers its typed Server-Sent Events."""
        return await responses.create(state, body, request)

    @app.get("/v1/responses/{response_id}", responses=STORED_ERRORS, tags=["openai"])
    async def retrieve_response(response_id: str, request: Request) -> Response:
        """A stored response (`store: true`), to the API key that created it only."""
        return responses.retrieve(state, response_id, request)

    @app.delete("/v1/responses/{response_id}", responses=STORED_ERRORS, tags=["openai"])
    async def delete_response(response_id: str, request: Request) -> Response:
        return responses.delete(state, response_id, request)

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, responses=BODY_ERRORS, tags=["openai"])
    async def create_embeddings(body: schemas.EmbeddingRequest, request: Request) -> Response:
        """OpenAI embeddings; `encoding_format: base64` gives little-endian float32 bytes."""
        return await handlers.embeddings(state, body, request)

    async def create_rerank(body: rerank_schemas.RerankRequest, request: Request) -> Response:
        """Documents ordered by relevance to the query, scored by the rerank model (Cohere's and Jina's shape)."""
        return await handlers.rerank_documents(state, body, request)

    async def create_score(body: rerank_schemas.ScoreRequest, request: Request) -> Response:
        """vLLM's score: text_1 against each text_2 (or pairwise), by the rerank model."""
        return await handlers.score_pairs(state, body, request)

    for path in ("/v1/rerank", "/rerank"):
        app.add_api_route(
            path, create_rerank, methods=["POST"], response_model=rerank_schemas.RerankResponse,
            responses=BODY_ERRORS, tags=["rerank"], operation_id=f"rerank{path.replace('/', '_')}",
        )  # fmt: skip
    for path in ("/v1/score", "/score"):
        app.add_api_route(
            path, create_score, methods=["POST"], response_model=rerank_schemas.ScoreResponse,
            responses=BODY_ERRORS, tags=["rerank"], operation_id=f"score{path.replace('/', '_')}",
        )  # fmt: skip

    @app.get("/v1/models", response_model=schemas.ModelList, responses=ERROR_RESPONSES, tags=["openai"])
    async def list_models() -> Response:
        return json_response(schemas.ModelList(data=handlers.model_cards(state)), {})

    @app.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard, responses=MODEL_ERRORS, tags=["openai"])
    async def retrieve_model(model_id: str) -> Response:
        return handlers.retrieve_model(state, model_id)

    @app.post("/v1/load_lora_adapter", responses={**BODY_ERRORS, **PLAIN_TEXT_200}, tags=["lora"])
    async def load_lora(body: schemas.LoadLoraAdapterRequest, request: Request) -> Response:
        """vLLM's: serve the PEFT adapter folder `lora_path` as the model `lora_name` (with --allow-runtime-lora)."""
        return await handlers.load_lora(state, body, request)

    @app.post("/v1/unload_lora_adapter", responses={**BODY_ERRORS, **PLAIN_TEXT_200}, tags=["lora"])
    async def unload_lora(body: schemas.UnloadLoraAdapterRequest, request: Request) -> Response:
        """vLLM's: stop serving `lora_name`; requests already running with it finish."""
        return await handlers.unload_lora(state, body, request)

    @app.post("/v1/moderations", response_model=schemas.ModerationResponse, responses=BODY_ERRORS, tags=["openai"])
    async def create_moderation(body: schemas.ModerationRequest, request: Request) -> Response:
        """OpenAI moderations, backed by the safety filter's scanners: every category found is flagged."""
        return handlers.moderation(state, body, request)

    @app.post("/tokenize", response_model=schemas.TokenizeResponse, responses=BODY_ERRORS, tags=["tokens"])
    async def tokenize(body: schemas.TokenizeRequest) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""
        return handlers.tokenize_text(state, body)

    @app.post("/detokenize", response_model=schemas.DetokenizeResponse, responses=BODY_ERRORS, tags=["tokens"])
    async def detokenize(body: schemas.DetokenizeRequest) -> Response:
        return handlers.detokenize_tokens(state, body)

    @app.get("/version", response_model=schemas.VersionResponse, responses=ERROR_RESPONSES, tags=["service"])
    async def version() -> Response:
        return json_response(schemas.VersionResponse(version=app.version, engine=state.config.engine_kind), {})

    @app.get("/livez", response_model=schemas.HealthResponse, responses=PROBE_RESPONSES, tags=["service"])
    async def livez() -> Response:
        """200 while the process and the engine loop are alive."""
        if not state.engine.stats().is_alive:
            return _unavailable("the generation engine loop is not running")
        return json_response(schemas.HealthResponse(status="ok"), {})

    async def ready() -> Response:
        reason = readiness(state)
        if reason is not None:
            return _unavailable(reason)
        return json_response(schemas.HealthResponse(status="ready"), {})

    app.add_api_route(
        "/readyz", ready, methods=["GET"], response_model=schemas.HealthResponse, responses=PROBE_RESPONSES,
        tags=["service"], summary="200 when models are loaded, the engine is healthy and not draining",
    )
    app.add_api_route(
        "/health", ready, methods=["GET"], response_model=schemas.HealthResponse, responses=PROBE_RESPONSES,
        tags=["service"], summary="Same as /readyz", operation_id="health",
    )

    @app.get(
        "/metrics",
        responses={**ERROR_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "OK"}},
        response_class=Response,
        tags=["service"],
    )
    async def metrics() -> Response:
        """Prometheus text exposition."""
        state.metrics.observe_engine(state.engine.stats())
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    limit_values = schema_limits(state)
    app.openapi = lambda: build_openapi(app, limit_values)  # type: ignore[method-assign]

    # Middleware: the last added runs first. Accounting (outermost, so every response, CORS preflights
    # included, carries the request id and gets an access line) -> CORS -> auth -> body limit -> JSON
    # body -> app.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, state=state, max_body_bytes=state.config.limits.max_request_body_bytes)
    open_paths = PROBE_PATHS | ({"/metrics"} if state.config.metrics_open else set())
    app.add_middleware(AuthMiddleware, state=state, open_paths=frozenset(open_paths))
    if state.config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[
                "Retry-After",
                "x-request-id",
                *(f"x-ratelimit-{a}-{b}" for a in ("limit", "remaining", "reset") for b in ("requests", "tokens")),
            ],
        )
    app.add_middleware(AccountingMiddleware, state=state)
    return app


__all__ = ["create_app", "error_response"]
