// Every RPC of lmserve's gRPC API (lmserve.v1) from Node.js, against a running server.
//
//   cd clients/node && npm install && node every_rpc.js [HOST:PORT]
//
// The proto is loaded at run time with @grpc/proto-loader (no generated code): from ../../protos, or from
// LMSERVE_PROTO_DIR (the folder that holds lmserve/v1/lmserve.proto). The target is the argument, else
// LMSERVE_GRPC_TARGET, else 127.0.0.1:50051; LMSERVE_API_KEY, when set, goes in `authorization` metadata.
// One line per RPC, `<service>/<method>: what came back`; on an error, its status and the server's error
// code, and exit status 1.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoDir = process.env.LMSERVE_PROTO_DIR || path.join(__dirname, "..", "..", "protos");
const target = process.argv[2] || process.env.LMSERVE_GRPC_TARGET || "127.0.0.1:50051";

// keepCase: the proto's field names (max_tokens, not maxTokens); int64s (`created`, `seed`) as strings.
const definition = protoLoader.loadSync("lmserve/v1/lmserve.proto", {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true, // unset fields read as their zero values (false, 0, "", [])
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).lmserve.v1;

const creds = grpc.credentials.createInsecure();
const gen = new v1.Generation(target, creds);
const emb = new v1.Embeddings(target, creds);
const tok = new v1.Tokenization(target, creds);
const models = new v1.Models(target, creds);
const mod = new v1.Moderations(target, creds);
const responses = new v1.Responses(target, creds);
const rerank = new v1.Reranking(target, creds);

function metadata(requestId) {
  const md = new grpc.Metadata();
  if (process.env.LMSERVE_API_KEY) md.set("authorization", `Bearer ${process.env.LMSERVE_API_KEY}`);
  if (requestId) md.set("x-request-id", requestId);
  return md;
}

const deadline = (seconds) => ({ deadline: new Date(Date.now() + seconds * 1000) });

// A unary call as a promise.
function unary(client, method, request, requestId) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(requestId), deadline(60), (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

// A server stream, collected: every message in order.
function collect(client, method, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, metadata(), deadline(60));
    call.on("data", (m) => messages.push(m));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

function show(method, text) {
  console.log(`lmserve.v1.${method}: ${text}`);
}

async function main() {
  const list = await unary(models, "ListModels", {});
  show("Models/ListModels", list.data.map((m) => `${m.id} (${m.kind})`).join(", "));

  const done = await unary(gen, "Complete", { prompt: "The capital of France is", max_tokens: 8, temperature: 0 }, "node-complete");
  show("Generation/Complete", `${JSON.stringify(done.choices[0].text)} id=${done.id} tokens=${done.usage.total_tokens}`);

  const chunks = await collect(gen, "CompleteStream", { prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
  const streamed = chunks.flatMap((c) => c.choices.map((ch) => ch.text)).join("");
  show("Generation/CompleteStream", `${JSON.stringify(streamed)} usage=${chunks[chunks.length - 1].usage.total_tokens}`);

  const messages = [{ role: "user", content: "What is the capital of France?" }];
  const chat = await unary(gen, "Chat", { messages, max_tokens: 12, temperature: 0 });
  show("Generation/Chat", `${JSON.stringify(chat.choices[0].content)} id=${chat.id}`);

  const deltas = await collect(gen, "ChatStream", { messages, max_tokens: 12, temperature: 0 });
  const content = deltas.flatMap((c) => c.choices.map((ch) => ch.content)).join("");
  show("Generation/ChatStream", `${JSON.stringify(content)} usage=${deltas[deltas.length - 1].usage.total_tokens}`);

  const vectors = await unary(emb, "Embed", { input: ["a cat sits on the mat"] });
  show("Embeddings/Embed", `${vectors.data.length} x ${vectors.data[0].embedding.length} floats`);

  const ids = await unary(tok, "Tokenize", { prompt: "Hello, world!" });
  show("Tokenization/Tokenize", `${ids.count} tokens [${ids.tokens.join(", ")}]`);
  const text = await unary(tok, "Detokenize", { tokens: ids.tokens });
  show("Tokenization/Detokenize", JSON.stringify(text.prompt));

  // LoRA adapters at run time: a server without --allow-runtime-lora answers NOT_FOUND (code 5).
  const loraPath = process.env.LMSERVE_LORA_PATH || "/adapters/example";
  for (const [method, request] of [
    ["LoadLoraAdapter", { lora_name: "example", lora_path: loraPath }],
    ["UnloadLoraAdapter", { lora_name: "example" }],
  ]) {
    try {
      show(`Models/${method}`, (await unary(models, method, request)).message);
    } catch (err) {
      if (err.code !== grpc.status.NOT_FOUND && err.code !== grpc.status.INVALID_ARGUMENT) throw err;
      show(`Models/${method}`, `${err.code === grpc.status.NOT_FOUND ? "NOT_FOUND" : "INVALID_ARGUMENT"}: ${err.details}`);
    }
  }

  const verdict = await unary(mod, "Moderate", { input: ["Have a nice day."] });
  show("Moderations/Moderate", `flagged=${verdict.results.map((r) => r.flagged).join(",")} id=${verdict.id}`);

  // The Responses API: a stored response, its conversation continued by previous_response_id (streamed as
  // typed events), read back, and deleted.
  const first = await unary(responses, "CreateResponse", { input: "Name a color.", max_output_tokens: 6, temperature: 0 });
  show("Responses/CreateResponse", `${JSON.stringify(first.output_text)} status=${first.status} id=${first.id}`);
  const events = await collect(responses, "CreateResponseStream", {
    input: "Another one.", previous_response_id: first.id, max_output_tokens: 6, temperature: 0,
  });
  const said = events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");
  show("Responses/CreateResponseStream", `${JSON.stringify(said)} ${events[events.length - 1].type}`);
  const got = await unary(responses, "GetResponse", { response_id: first.id });
  show("Responses/GetResponse", `${got.id} ${JSON.stringify(got.output_text)}`);
  const gone = await unary(responses, "DeleteResponse", { response_id: first.id });
  show("Responses/DeleteResponse", `deleted=${gone.deleted}`);
  // Reranking/Rerank: a server without --rerank-model answers NOT_FOUND (code 5).
  try {
    const ranked = await unary(rerank, "Rerank", { query: "capital of France", documents: ["Paris", "a cat"] });
    show("Reranking/Rerank", ranked.results.map((r) => `${r.index}:${r.relevance_score.toFixed(4)}`).join(" "));
  } catch (err) {
    if (err.code !== grpc.status.NOT_FOUND) throw err;
    show("Reranking/Rerank", `NOT_FOUND: ${err.details}`);
  }
}

main()
  .then(() => process.exit(0))
  .catch((err) => {
    const code = err.metadata ? err.metadata.get("lmserve-error-code")[0] : undefined;
    console.error(`${grpc.status[err.code] || "ERROR"}: ${err.details || err.message} (lmserve-error-code=${code})`);
    process.exit(1);
  });
