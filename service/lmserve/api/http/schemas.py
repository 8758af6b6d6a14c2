"""Pydantic models of the HTTP API, in OpenAI's shapes (plus vLLM's extra sampling fields).

Request models check types and document ranges; the value checks that both transports need
(api/plan.py `check_generation`, its ranges in `BOUNDS`) live in one place. A field that neither OpenAI
nor vLLM defines is refused (400 `unknown_field`, naming it), but for lmserve's own few (embeddings'
`prompt_name`), which docs/http-api.md lists.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from lmserve.api.plan import BOUNDS


def limit(**limits: str) -> dict[str, Any]:
    """Mark a JSON-schema node with server limits, e.g. limit(maximum="max_n").

    http/openapi.py replaces each marker with the running server's value when it serves /openapi.json, so the
    schema documents this server's real caps (and schema-driven clients generate valid requests).
    """
    return {"x-limit": limits}


def bounds(name: str, **limits: str) -> dict[str, Any]:
    """A sampling parameter's range for the schema, from the one table that api/plan.py enforces (so the
    error for a value outside it reads the same on HTTP and gRPC); `limits` adds server limits."""
    return {**BOUNDS[name].json_schema(), **(limit(**limits) if limits else {})}


def at_least(low: int, **limits: str) -> dict[str, Any]:
    """A lower bound the schema documents and api/plan.py enforces (with a server limit above it)."""
    return {"minimum": low, **(limit(**limits) if limits else {})}


TokenId = Annotated[int, Field(ge=0, json_schema_extra=limit(maximum="vocab_max"))]
EmbeddingTokenId = Annotated[int, Field(ge=0, json_schema_extra=limit(maximum="embedding_vocab_max"))]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
EmbeddingTokenIds = Annotated[
    list[EmbeddingTokenId], Field(min_length=1, json_schema_extra=limit(maxItems="embedding_max_tokens"))
]
Prompt = (
    NonEmptyStr
    | Annotated[list[NonEmptyStr], Field(min_length=1, json_schema_extra=limit(maxItems="max_prompts"))]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, json_schema_extra=limit(maxItems="max_prompts"))]
)
EmbeddingInput = (
    NonEmptyStr
    | Annotated[list[NonEmptyStr], Field(min_length=1, json_schema_extra=limit(maxItems="max_embedding_inputs"))]
    | EmbeddingTokenIds
    | Annotated[list[EmbeddingTokenIds], Field(min_length=1, json_schema_extra=limit(maxItems="max_embedding_inputs"))]
)
Stop = NonEmptyStr | Annotated[list[NonEmptyStr], Field(json_schema_extra=limit(maxItems="max_stop_strings"))]
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
    Field(description='{"token_id": bias in [-100, 100]}'),
]

# -- shared --------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx response body."""

    error: ErrorDetail


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="Prompt tokens whose KV came from the prefix cache.")


class GenerationUsage(UsageInfo):
    prompt_tokens_details: PromptTokensDetails


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    # An unknown field is a 400 naming it (`unknown_field`), as OpenAI answers: a misspelt or unsupported
    # parameter silently ignored would change what the client gets without telling it.
    model_config = ConfigDict(extra="forbid")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(None, description="The schema's name (OpenAI requires one; unused here).")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="The JSON schema the output must follow. Absent: any JSON object."
    )
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced exactly.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="text | json_object | json_schema", json_schema_extra={"enum": ["text", "json_object", "json_schema"]})
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="A Lark grammar (llguidance's dialect) or GBNF.")
    json_object: bool | None = None


class _Truncation(_Request):
    """vLLM's prompt truncation, on completions, chat and embeddings."""

    truncate_prompt_tokens: int | None = Field(
        None,
        description="vLLM's: keep this many tokens of the prompt (embeddings: of each input); -1: as many as "
        "fit (the context less one token; embeddings: the model's input limit). Cut from truncation_side.",
        json_schema_extra=bounds("truncate_prompt_tokens"),
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="right: keep the first tokens; left: keep the last. Default: the tokenizer's (usually right)."
    )


class _SamplingFields(_Truncation):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="The served model's name (or its checkpoint reference).")
    n: int = Field(1, description="Choices per prompt.", json_schema_extra=at_least(1, maximum="max_n"))
    temperature: float | None = Field(None, description="Below 1e-5 is greedy. Default 1.", json_schema_extra=bounds("temperature"))
    top_p: float | None = Field(None, json_schema_extra=bounds("top_p"))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: int | None = Field(None, description="Choice j of a prompt uses seed + j.", json_schema_extra=bounds("seed"))
    presence_penalty: float | None = Field(None, json_schema_extra=bounds("presence_penalty"))
    frequency_penalty: float | None = Field(None, json_schema_extra=bounds("frequency_penalty"))
    logit_bias: LogitBias | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, description="0 or -1: off.", json_schema_extra=bounds("top_k"))
    min_p: float | None = Field(None, json_schema_extra=bounds("min_p"))
    repetition_penalty: float | None = Field(None, json_schema_extra=bounds("repetition_penalty"))
    min_tokens: int = Field(0, json_schema_extra=bounds("min_tokens"))
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraints: one of json, regex, choice, grammar, json_object."
    )
    timeout: float | None = Field(
        None,
        json_schema_extra=bounds("timeout"),
        description="Seconds this request may take, from arrival (also the x-request-timeout header; the "
        "smaller wins). Past it the request ends: finish_reason \"timeout\" once tokens have been generated, "
        "else a 504 error (code request_timeout).",
    )
    speculative_tokens: int | None = Field(
        None,
        json_schema_extra=bounds("speculative_tokens"),
        description="Speculative decoding by prompt lookup: at most this many draft tokens per step, taken from "
        "earlier in the prompt and output and verified by the model in one forward (the output is the same; "
        "extractive answers come faster). 0: off. Unset: the server's --speculative-tokens.",
    )
    # vLLM extras that vLLM's clients send (truncation: _Truncation)
    priority: int = Field(0, description="vLLM's; only 0 is served: requests are scheduled first come, first served.")
    prompt_logprobs: int | None = Field(
        None,
        json_schema_extra=bounds("prompt_logprobs"),
        description="vLLM's: score the prompt. The response's prompt_logprobs (completions: per choice; chat: top "
        "level) has one entry per prompt token, the first null, each later one mapping token ids to "
        "{logprob, rank, decoded_token} for the prompt's token and the top this-many alternatives. Streamed, "
        "they come in a choice's first chunk. vLLM's -1 (the whole vocabulary) is not supported.",
    )
    return_tokens_as_token_ids: bool | None = Field(
        None,
        description="vLLM's: logprobs name each token as \"token_id:<id>\" (so tokens that are not valid UTF-8 "
        "alone stay identifiable); prompt_logprobs keep their decoded_token.",
    )


# -- /v1/completions -------------------------------------------------------------------------------------


class CompletionRequest(_SamplingFields):
    prompt: Prompt = Field(description="A string, a list of strings, a token array or a list of token arrays.")
    max_tokens: int | None = Field(
        16, description="Default 16 (capped by the server).", json_schema_extra=at_least(1, maximum="max_tokens_cap")
    )
    logprobs: int | None = Field(None, description="Top alternatives per token (0-5).", json_schema_extra={"minimum": 0, "maximum": 5})
    echo: bool = Field(
        False,
        description="Prepend the prompt to the text. With logprobs, the prompt's tokens are listed with "
        "null logprobs (prompt_logprobs scores them).",
    )
    best_of: int | None = Field(None, ge=1, description="Must equal n if given.")
    add_special_tokens: bool = Field(True, description="vLLM's: the tokenizer's special tokens (BOS, ...) on text prompts.")
    suffix: str | None = Field(None, description="Not supported: a non-null value is rejected.")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class _ChoiceEnd(BaseModel):
    """What every choice says of its end (None while it goes on)."""

    index: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _ResponseHead(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class PromptLogprobValue(BaseModel):
    """vLLM's Logprob: one token's logprob at a prompt position, its rank in the vocabulary (1: the
    likeliest) and its text."""

    logprob: float
    rank: int
    decoded_token: str


# One entry per prompt token: null for the first, else token id (as a JSON key) -> its score.
PromptLogprobs = list[dict[str, PromptLogprobValue] | None]


class CompletionChoice(_ChoiceEnd):
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: GenerationUsage | None = None


# -- /v1/chat/completions -------------------------------------------------------------------------------


class ContentPart(BaseModel):
    # Documented as text-only; other part types still parse, so they get a clear 400 rather than a type error.
    model_config = ConfigDict(extra="allow", json_schema_extra={"required": ["type", "text"]})

    type: str = Field(description='Only "text" parts are supported.', json_schema_extra={"enum": ["text"]})
    text: str | SkipJsonSchema[None] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None,
        description="Deprecated by OpenAI; max_completion_tokens wins. Default: the room left in the context.",
        json_schema_extra=at_least(1, maximum="max_tokens_cap"),
    )
    max_completion_tokens: int | None = Field(None, json_schema_extra=at_least(1, maximum="max_tokens_cap"))
    logprobs: bool = False
    add_special_tokens: bool = Field(
        False, description="vLLM's: add the tokenizer's special tokens on top of what the chat template writes."
    )
    top_logprobs: int | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 20})
    tools: list[dict[str, Any]] | None = Field(
        None, description="Functions the model may call; calls come back in message.tool_calls."
    )
    tool_choice: Any = Field(None, description='"none", "auto" (the default with tools), "required", or a named function.')
    parallel_tool_calls: bool | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(
        None, description="With a reasoning parser: the thinking before the answer (vLLM's field); null when none."
    )
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_ChoiceEnd):
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: GenerationUsage
    prompt_logprobs: PromptLogprobs | None = None  # the prompt's scores, with prompt_logprobs (vLLM's place)


# -- /v1/embeddings ------------------------------------------------------------------------------------


class EmbeddingRequest(_Truncation):
    model: str | None = None
    input: EmbeddingInput = Field(description="A string, a list of strings, a token array or a list of token arrays.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        json_schema_extra=limit(maximum="embedding_dimensions"),
        description="Matryoshka models only (config.json's matryoshka_dimensions or is_matryoshka): keep this "
        "many components, then renormalize. Refused (400) for any other model.",
    )
    user: str | None = None
    prompt_name: NonEmptyStr | None = Field(
        None,
        description="lmserve's (TEI's name; neither OpenAI nor vLLM has one): the model's sentence-transformers "
        "prompt to put before each text, e.g. query. Unset: the folder's default_prompt_name, else none.",
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class LoadLoraAdapterRequest(_Request):
    """vLLM's shape: a PEFT adapter folder on the server's disk, served as `lora_name` from now on."""

    lora_name: NonEmptyStr
    lora_path: NonEmptyStr
    load_inplace: bool = Field(False, description="Not supported: unload the adapter first, then load it again.")


class UnloadLoraAdapterRequest(_Request):
    lora_name: NonEmptyStr
    lora_int_id: int | None = Field(None, description="vLLM's id of the adapter; ignored (the name decides).")


class ModerationRequest(_Request):
    input: str | Annotated[list[str], Field(min_length=1)] = Field(description="A string or a list of strings.")
    model: str | None = None


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


# -- /tokenize, /detokenize (vLLM shapes) -------------------------------------------------------------


class TokenizeRequest(_Request):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
    )

    model: str | None = None
    prompt: str | SkipJsonSchema[None] = Field(None, description="Give either prompt or messages.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | SkipJsonSchema[None] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- models, health, version -----------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmserve"
    max_model_len: int | None = None
    root: str | None = None
    parent: str | None = Field(None, description="For a LoRA adapter: the base model it runs on.")
    family: str | None = Field(
        None, description="The model's family and how it is served: native, transformers (the generic path) or vllm."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: str
    reason: str | None = None


class VersionResponse(BaseModel):
    version: str
    engine: str
