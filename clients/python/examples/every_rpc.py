"""Every RPC of lmserve's gRPC API (lmserve.v1) and the standard health check, against a running server.

    pip install './clients/python[health]'     # or: PYTHONPATH=clients/python (grpcio, protobuf installed)
    python clients/python/examples/every_rpc.py [HOST:PORT]

The target is the argument, else LMSERVE_GRPC_TARGET, else 127.0.0.1:50051. LMSERVE_API_KEY, when set, is
sent as `authorization: Bearer KEY` metadata on every call (the health check needs none). The channel is
plaintext; for a server started with --grpc-tls-cert use
grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=open("ca.pem", "rb").read())).

One line per RPC, `<service>/<method>: what came back`; on an error, its status, the server's error code
and the request id, and exit status 1. Generation is greedy and short, so a CPU server answers in seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys

import grpc

from lmserve.v1 import lmserve_pb2 as pb
from lmserve.v1 import lmserve_pb2_grpc as rpc

DEFAULT_TARGET = "127.0.0.1:50051"


def show(method: str, text: str) -> None:
    print(f"{method}: {text}", flush=True)


def health(channel: grpc.Channel) -> None:
    """grpc.health.v1.Health/Check (open: no key): SERVING only when the server is ready."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # pip install grpcio-health-checking
    except ImportError:
        show("grpc.health.v1.Health/Check", "skipped (pip install grpcio-health-checking)")
        return
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    show("grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def run_all(channel: grpc.Channel, md: list[tuple[str, str]]) -> None:
    health(channel)

    # Models/ListModels: the generation model and the embedding model, by the names requests may use.
    models = rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=md, timeout=10).data
    show("lmserve.v1.Models/ListModels", ", ".join(f"{m.id} ({m.kind}, {m.max_model_len} tokens)" for m in models))
    gen_model = next(m.id for m in models if m.kind == "generation")

    gen = rpc.GenerationStub(channel)
    # Generation/Complete. `x-request-id` names the request: it comes back in the trailing metadata and
    # in the response id ("cmpl-" + request id), and names the server's access log line.
    req = pb.CompletionRequest(model=gen_model, prompt="The capital of France is", max_tokens=8, temperature=0)
    resp, call = gen.Complete.with_call(req, metadata=[*md, ("x-request-id", "every-rpc-complete")], timeout=60)
    trailers = dict(call.trailing_metadata())
    show(
        "lmserve.v1.Generation/Complete",
        f"{resp.choices[0].text!r} finish={resp.choices[0].finish_reason} id={resp.id} "
        f"x-request-id={trailers['x-request-id']} tokens={resp.usage.total_tokens}",
    )

    # Generation/CompleteStream: deltas per choice; the last message has no choices, only `usage`.
    # Two sampled choices (choice j samples with seed + j), interleaved in the stream by `index`.
    req = pb.CompletionRequest(prompt="Once upon a time", max_tokens=12, temperature=0.8, n=2, seed=7)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in gen.CompleteStream(req, metadata=md, timeout=60):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if chunk.HasField("usage"):
            usage = chunk.usage
    assert usage is not None, "a stream ends with usage"
    show(
        "lmserve.v1.Generation/CompleteStream",
        f"{[texts[i] for i in sorted(texts)]} finish={[finish[i] for i in sorted(finish)]} tokens={usage.total_tokens}",
    )

    # Generation/Chat: the conversation is rendered with the model's chat template.
    messages = [
        pb.ChatMessage(role="system", content="You answer in one short sentence."),
        pb.ChatMessage(role="user", content="What is the capital of France?"),
    ]
    resp = gen.Chat(pb.ChatRequest(messages=messages, max_tokens=16, temperature=0), metadata=md, timeout=60)
    show("lmserve.v1.Generation/Chat", f"{resp.choices[0].content!r} finish={resp.choices[0].finish_reason} id={resp.id}")

    # Generation/Chat with tools: tool_choice names the function, so the output is constrained to its
    # parameters' schema and comes back parsed in `tool_calls` (ids: "call_" + random hex).
    weather = pb.Tool(
        type="function",
        function=pb.FunctionDefinition(
            name="get_weather",
            description="The current weather in a city.",
            parameters=json.dumps(
                {
                    "type": "object",
                    "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
                    "required": ["city"],
                    "additionalProperties": False,
                }
            ),
        ),
    )
    ask = pb.ChatMessage(role="user", content="What's the weather in Paris?")
    req = pb.ChatRequest(
        messages=[ask], tools=[weather], tool_choice=pb.ToolChoice(function_name="get_weather"), max_tokens=32, temperature=0
    )
    resp = gen.Chat(req, metadata=md, timeout=60)
    [tool_call] = resp.choices[0].tool_calls
    show(
        "lmserve.v1.Generation/Chat (tools)",
        f"{tool_call.function.name}({tool_call.function.arguments}) id={tool_call.id} finish={resp.choices[0].finish_reason}",
    )

    # Generation/ChatStream: the tool's result goes back as a "tool" turn naming the call's id; the reply
    # streams as content deltas (role on the first delta), then a last message with usage.
    messages = [
        ask,
        pb.ChatMessage(role="assistant", tool_calls=[tool_call]),
        pb.ChatMessage(role="tool", tool_call_id=tool_call.id, content=json.dumps({"temperature_c": 21, "sky": "clear"})),
    ]
    content, finish_reason, usage = "", "", None
    for chunk in gen.ChatStream(pb.ChatRequest(messages=messages, max_tokens=16, temperature=0), metadata=md, timeout=60):
        for c in chunk.choices:
            content += c.content
            finish_reason = c.finish_reason or finish_reason
        if chunk.HasField("usage"):
            usage = chunk.usage
    assert usage is not None, "a stream ends with usage"
    show("lmserve.v1.Generation/ChatStream", f"{content!r} finish={finish_reason} tokens={usage.total_tokens}")

    # Embeddings/Embed: unit-length vectors, so a dot product is the cosine similarity.
    resp = rpc.EmbeddingsStub(channel).Embed(
        pb.EmbedRequest(input=["a cat sits on the mat", "a kitten rests on a rug"]), metadata=md, timeout=60
    )
    a, b = (list(e.embedding) for e in resp.data)
    cosine = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a))
    show("lmserve.v1.Embeddings/Embed", f"{len(resp.data)} x {len(a)} floats, |a|={norm:.3f}, cos(a, b)={cosine:.3f}")

    # Tokenization/Tokenize (a prompt, or chat messages rendered with the template), then Detokenize.
    tok = rpc.TokenizationStub(channel)
    resp = tok.Tokenize(pb.TokenizeRequest(prompt="Hello, world!", return_token_strs=True), metadata=md, timeout=10)
    show("lmserve.v1.Tokenization/Tokenize", f"{resp.count} tokens {list(resp.tokens)} {list(resp.token_strs)}")
    chat_tokens = tok.Tokenize(pb.TokenizeRequest(messages=[ask]), metadata=md, timeout=10)
    show("lmserve.v1.Tokenization/Tokenize (messages)", f"{chat_tokens.count} tokens of {chat_tokens.max_model_len}")
    text = tok.Detokenize(pb.DetokenizeRequest(tokens=resp.tokens), metadata=md, timeout=10).prompt
    show("lmserve.v1.Tokenization/Detokenize", repr(text))

    # Models/LoadLoraAdapter and UnloadLoraAdapter: a PEFT adapter folder on the server's disk served by name
    # (LMSERVE_LORA_PATH); a server started without --allow-runtime-lora answers NOT_FOUND.
    stub = rpc.ModelsStub(channel)
    lora_path = os.environ.get("LMSERVE_LORA_PATH", "/adapters/example")
    for method, call in (
        ("LoadLoraAdapter", lambda: stub.LoadLoraAdapter(
            pb.LoadLoraAdapterRequest(lora_name="example", lora_path=lora_path), metadata=md, timeout=60)),
        ("UnloadLoraAdapter", lambda: stub.UnloadLoraAdapter(
            pb.UnloadLoraAdapterRequest(lora_name="example"), metadata=md, timeout=10)),
    ):  # fmt: skip
        try:
            show(f"lmserve.v1.Models/{method}", call().message)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            show(f"lmserve.v1.Models/{method}", f"{err.code().name}: {err.details()}")

    # Moderations/Moderate: the safety filter's scanners as a classifier, one result per input.
    try:
        resp = rpc.ModerationsStub(channel).Moderate(
            pb.ModerationRequest(input=["Have a nice day.", "Write to me at jo@acme.io"]),
            metadata=md,
            timeout=30,
        )
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        show("lmserve.v1.Moderations/Moderate", f"INVALID_ARGUMENT: {err.details()}")  # a --no-safety server
    else:
        flagged = [sorted(k for k, v in r.categories.items() if v) for r in resp.results]
        show("lmserve.v1.Moderations/Moderate", f"flagged={[r.flagged for r in resp.results]} categories={flagged} id={resp.id}")

    # Responses: OpenAI's Responses API. CreateResponse stores the response (store unset: true) for this key;
    # CreateResponseStream continues its conversation (previous_response_id) as typed events; then
    # GetResponse reads it back and DeleteResponse removes it.
    responses = rpc.ResponsesStub(channel)
    first = responses.CreateResponse(
        pb.CreateResponseRequest(input="Name a color.", instructions="Answer in one word.", max_output_tokens=6, temperature=0),
        metadata=md,
        timeout=60,
    )
    show("lmserve.v1.Responses/CreateResponse", f"{first.output_text!r} status={first.status} id={first.id}")
    said, last = "", None
    follow_up = pb.CreateResponseRequest(input="Another one.", previous_response_id=first.id, max_output_tokens=6, temperature=0)
    for event in responses.CreateResponseStream(follow_up, metadata=md, timeout=60):
        said += event.delta if event.type == "response.output_text.delta" else ""
        last = event
    assert last is not None and last.HasField("response"), "a stream ends with the whole response"
    show("lmserve.v1.Responses/CreateResponseStream", f"{said!r} {last.type} input_tokens={last.response.usage.input_tokens}")
    got = responses.GetResponse(pb.ResponseIdRequest(response_id=first.id), metadata=md, timeout=10)
    show("lmserve.v1.Responses/GetResponse", f"{got.id} {got.output_text!r}")
    gone = responses.DeleteResponse(pb.ResponseIdRequest(response_id=first.id), metadata=md, timeout=10)
    show("lmserve.v1.Responses/DeleteResponse", f"deleted={gone.deleted}")
    # Reranking/Rerank: documents ordered by a cross-encoder's score; a server without --rerank-model says NOT_FOUND.
    try:
        ranked = rpc.RerankingStub(channel).Rerank(
            pb.RerankRequest(query="capital of France", documents=["Paris", "a cat"]), metadata=md, timeout=30
        )
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        show("lmserve.v1.Reranking/Rerank", f"NOT_FOUND: {err.details()}")
    else:
        show("lmserve.v1.Reranking/Rerank", " ".join(f"{r.index}:{r.relevance_score:.4f}" for r in ranked.results))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = args[0] if args else os.environ.get("LMSERVE_GRPC_TARGET") or DEFAULT_TARGET
    key = os.environ.get("LMSERVE_API_KEY")
    md = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(target) as channel:
        try:
            run_all(channel, md)
        except grpc.RpcError as err:  # the calls' errors are grpc.Call objects too: trailers name the cause
            trailers = dict(err.trailing_metadata() or ())
            print(
                f"{err.code().name}: {err.details()} (lmserve-error-code={trailers.get('lmserve-error-code')}, "
                f"x-request-id={trailers.get('x-request-id')})",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
