"""Each lmserve.v1 RPC: its message converted to the neutral input (conversion.py), the neutral call, its
presented answer converted back. METHODS lists them for the server (server.py), which wraps each one
with the accounting, authentication and error mapping every RPC shares."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from lmserve.api.admission import Caller
from lmserve.api.embedding_call import EmbedInput, prepare_embedding
from lmserve.api.errors import APIError
from lmserve.api.generation_call import GenerationCall, prepare_chat, prepare_completion
from lmserve.api.grpc import conversion as conv
from lmserve.api.grpc.conversion import opt
from lmserve.api.grpc.responses import create_response, create_response_stream, delete_response_rpc, get_response_rpc
from lmserve.api.models import load_lora_adapter, served_models, unload_lora_adapter
from lmserve.api.moderation import moderate
from lmserve.api.presentation import PresentedChoice
from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.rerank_call import RerankInput, rerank
from lmserve.api.tokens import TokenizeInput, detokenize, tokenize

if TYPE_CHECKING:
    from lmserve.state import AppState

PACKAGE = "lmserve.v1"


async def complete(state: AppState, caller: Caller, req: pb.CompletionRequest) -> pb.CompletionResponse:
    call = prepare_completion(state, caller, conv.completion_input(req))
    result = await call.collect()
    return pb.CompletionResponse(
        id=call.response_id, model=call.model.name, created=call.created,
        choices=[conv.completion_choice(c) for c in result.choices], usage=conv.usage(result.usage),
    )  # fmt: skip


async def complete_stream(state: AppState, caller: Caller, req: pb.CompletionRequest) -> AsyncIterator[pb.CompletionChunk]:
    call = prepare_completion(state, caller, conv.completion_input(req))

    def chunk(piece: PresentedChoice) -> pb.CompletionChunk:
        choice = conv.completion_choice(piece)
        return pb.CompletionChunk(id=call.response_id, model=call.model.name, created=call.created, choices=[choice])

    async for message in _chunks(call, chunk):
        yield message
    yield pb.CompletionChunk(id=call.response_id, model=call.model.name, created=call.created, usage=conv.usage(call.usage))


async def chat(state: AppState, caller: Caller, req: pb.ChatRequest) -> pb.ChatResponse:
    call = prepare_chat(state, caller, conv.chat_input(req))
    result = await call.collect()
    return pb.ChatResponse(
        id=call.response_id, model=call.model.name, created=call.created,
        choices=[conv.chat_choice(c, req.top_logprobs) for c in result.choices], usage=conv.usage(result.usage),
    )  # fmt: skip


async def chat_stream(state: AppState, caller: Caller, req: pb.ChatRequest) -> AsyncIterator[pb.ChatChunk]:
    call = prepare_chat(state, caller, conv.chat_input(req))

    def chunk(piece: PresentedChoice) -> pb.ChatChunk:
        choice = conv.chat_choice(piece, req.top_logprobs)
        return pb.ChatChunk(id=call.response_id, model=call.model.name, created=call.created, choices=[choice])

    async for message in _chunks(call, chunk):
        yield message
    yield pb.ChatChunk(id=call.response_id, model=call.model.name, created=call.created, usage=conv.usage(call.usage))


async def _chunks(call: GenerationCall, chunk: Callable[[PresentedChoice], Message]) -> AsyncIterator[Any]:
    try:
        async with aclosing(call.stream()) as stream:
            async for piece in stream:
                yield chunk(piece)
    finally:
        call.close()


async def embed(state: AppState, caller: Caller, req: pb.EmbedRequest) -> pb.EmbedResponse:
    if req.input and req.input_token_ids:
        raise APIError("Give 'input' or 'input_token_ids', not both.", "invalid_request", "input")
    inputs: list[str] | list[list[int]] = list(req.input) or [list(t.ids) for t in req.input_token_ids]
    inp = EmbedInput(
        opt(req, "model"), inputs, opt(req, "dimensions"),
        truncate_prompt_tokens=opt(req, "truncate_prompt_tokens"), truncation_side=opt(req, "truncation_side"),
        prompt_name=opt(req, "prompt_name"),
    )  # fmt: skip
    call = await prepare_embedding(state, caller, inp)
    result = await call.run()
    return pb.EmbedResponse(
        model=result.model.name,
        data=[pb.Embedding(index=i, embedding=v) for i, v in enumerate(result.vectors)],
        usage=pb.Usage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens),
    )


async def rerank_rpc(state: AppState, caller: Caller, req: pb.RerankRequest) -> pb.RerankResponse:
    return_documents = opt(req, "return_documents")
    inp = RerankInput(
        opt(req, "model"), req.query, list(req.documents), opt(req, "top_n"),
        True if return_documents is None else return_documents,
    )  # fmt: skip
    out = await rerank(state, caller, inp)
    return pb.RerankResponse(
        id=out.id,
        model=out.model.name,
        results=[pb.RerankResult(index=r.index, relevance_score=r.relevance_score, document=r.document) for r in out.results],
        usage=pb.Usage(prompt_tokens=out.total_tokens, total_tokens=out.total_tokens),
    )


async def tokenize_rpc(state: AppState, caller: Caller, req: pb.TokenizeRequest) -> pb.TokenizeResponse:
    add_special = opt(req, "add_special_tokens")
    add_generation_prompt = opt(req, "add_generation_prompt")
    inp = TokenizeInput(
        model=opt(req, "model"),
        prompt=opt(req, "prompt"),
        messages=conv.chat_messages(req.messages) if req.messages else None,
        add_special_tokens=True if add_special is None else add_special,
        add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
        return_token_strs=req.return_token_strs,
    )
    out = tokenize(state, inp)
    return pb.TokenizeResponse(
        count=len(out.tokens), max_model_len=out.max_model_len, tokens=out.tokens, token_strs=out.token_strs or ()
    )


async def detokenize_rpc(state: AppState, caller: Caller, req: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
    return pb.DetokenizeResponse(prompt=detokenize(state, opt(req, "model"), list(req.tokens)))


async def list_models(state: AppState, caller: Caller, req: pb.ListModelsRequest) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        data=[
            pb.Model(
                id=m.served.name, created=m.served.created, owned_by="lmserve", max_model_len=m.max_model_len, kind=m.kind,
                family=m.family, parent=m.served.parent or "", root=m.served.root or "",
            )
            for m in served_models(state)
        ]
    )


async def moderate_rpc(state: AppState, caller: Caller, req: pb.ModerationRequest) -> pb.ModerationResponse:
    out = moderate(state, caller, opt(req, "model"), list(req.input))
    return pb.ModerationResponse(
        id=out.id,
        model=out.model,
        results=[
            pb.ModerationResult(flagged=r.flagged, categories=r.categories, category_scores=r.category_scores)
            for r in out.results
        ],
    )


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[AppState, Caller, Any], Any]  # a coroutine, or an async generator when streaming
    is_stream: bool = False

    @property
    def path(self) -> str:
        return f"/{PACKAGE}.{self.service}/{self.name}"


async def load_lora_rpc(state: AppState, caller: Caller, req: pb.LoadLoraAdapterRequest) -> pb.LoraAdapterResponse:
    _require(lora_name=req.lora_name, lora_path=req.lora_path)
    return pb.LoraAdapterResponse(message=await load_lora_adapter(state, caller, req.lora_name, req.lora_path))


async def unload_lora_rpc(state: AppState, caller: Caller, req: pb.UnloadLoraAdapterRequest) -> pb.LoraAdapterResponse:
    _require(lora_name=req.lora_name)
    return pb.LoraAdapterResponse(message=await unload_lora_adapter(state, caller, req.lora_name))


def _require(**fields: str) -> None:
    """proto3 strings have no "unset": an empty one is a missing field."""
    for name, value in fields.items():
        if not value:
            raise APIError(f"{name} is required.", "missing_field", name)


METHODS = (
    Method("Generation", "Complete", pb.CompletionRequest, pb.CompletionResponse, complete),
    Method("Generation", "CompleteStream", pb.CompletionRequest, pb.CompletionChunk, complete_stream, is_stream=True),
    Method("Generation", "Chat", pb.ChatRequest, pb.ChatResponse, chat),
    Method("Generation", "ChatStream", pb.ChatRequest, pb.ChatChunk, chat_stream, is_stream=True),
    Method("Embeddings", "Embed", pb.EmbedRequest, pb.EmbedResponse, embed),
    Method("Tokenization", "Tokenize", pb.TokenizeRequest, pb.TokenizeResponse, tokenize_rpc),
    Method("Tokenization", "Detokenize", pb.DetokenizeRequest, pb.DetokenizeResponse, detokenize_rpc),
    Method("Models", "ListModels", pb.ListModelsRequest, pb.ListModelsResponse, list_models),
    Method("Models", "LoadLoraAdapter", pb.LoadLoraAdapterRequest, pb.LoraAdapterResponse, load_lora_rpc),
    Method("Models", "UnloadLoraAdapter", pb.UnloadLoraAdapterRequest, pb.LoraAdapterResponse, unload_lora_rpc),
    Method("Moderations", "Moderate", pb.ModerationRequest, pb.ModerationResponse, moderate_rpc),
    Method("Responses", "CreateResponse", pb.CreateResponseRequest, pb.Response, create_response),
    Method("Responses", "CreateResponseStream", pb.CreateResponseRequest, pb.ResponseEvent, create_response_stream, is_stream=True),
    Method("Responses", "GetResponse", pb.ResponseIdRequest, pb.Response, get_response_rpc),
    Method("Responses", "DeleteResponse", pb.ResponseIdRequest, pb.DeleteResponseResponse, delete_response_rpc),
    Method("Reranking", "Rerank", pb.RerankRequest, pb.RerankResponse, rerank_rpc),
)


