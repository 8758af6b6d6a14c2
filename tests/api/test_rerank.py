"""/v1/rerank, /rerank, /v1/score and gRPC Rerank against the real server serving a tiny random BERT
cross-encoder (BertForSequenceClassification, num_labels=1, the bundled MiniLM's tokenizer) beside a tiny
generation model: the scores are transformers' (AutoModelForSequenceClassification on the same pairs, float32,
through the sigmoid) to 1e-5, in order, with top_n, return_documents, errors, auth, metrics and the access
line. A tiny XLM-RoBERTa cross-encoder (with a unigram tokenizer built here) through the reranker's batch
worker, against transformers the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.config import EngineConfig, LimitsConfig, ServeConfig
from lmserve.embeddings.reranker import Reranker
from tests.api.conftest import LiveServer, metric_value, served
from tests.api.test_logging import LogCapture
from tests.cli_process import call_cli, free_port

KEY = "test-key-rerank"
MAX_DOCUMENTS = 8
MAX_POSITIONS = 128
QUERY = "what is the capital of france"
DOCUMENTS = [
    "paris is the capital of france",
    "the cat sat on the mat",
    "berlin is the capital of germany, and a quick brown fox jumps over the lazy dog",
    "france",
    "",
    "what is the capital of france",
]
TOO_LONG = "capital " * 200  # > MAX_POSITIONS tokens with the query


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far enough from the init that the scores differ clearly between documents."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


def build_bert_cross_encoder(dest: Path, minilm_dir: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_POSITIONS, num_labels=1,
    )  # fmt: skip
    _randomized(BertForSequenceClassification(config)).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def build_xlm_roberta_cross_encoder(dest: Path) -> Path:
    """XLM-R's sentencepiece (unigram) tokenizer, trained here on a few sentences, with XLM-R's special
    tokens at XLM-R's ids and its pair template <s> A </s></s> B </s>."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizerFast

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        [QUERY, *DOCUMENTS] * 20, vocab_size=120, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>", show_progress=False,
    )  # fmt: skip
    unigram._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = XLMRobertaTokenizerFast(
        tokenizer_object=unigram._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
    )  # fmt: skip
    tokenizer.save_pretrained(str(dest))
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, num_labels=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    )  # fmt: skip
    _randomized(XLMRobertaForSequenceClassification(config)).save_pretrained(str(dest))
    return dest


def reference_scores(folder: Path, firsts: list[str], seconds: list[str]) -> tuple[list[float], list[int]]:
    """transformers' sigmoid(logit) for each pair, in one padded float32 batch, and each pair's length."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tokenizer(firsts, seconds, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits  # [pairs, 1]
    return torch.sigmoid(logits[:, 0]).tolist(), enc["attention_mask"].sum(dim=1).tolist()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return build_bert_cross_encoder(tmp_path_factory.mktemp("bert-reranker"), minilm_dir)


@pytest.fixture(scope="module")
def expected(bert_dir: Path) -> tuple[list[float], list[int]]:
    return reference_scores(bert_dir, [QUERY] * len(DOCUMENTS), DOCUMENTS)


@pytest.fixture(scope="module")
def rerank_server(bert_dir: Path, tiny_llama_dir: Path, cache_dir: Path) -> Iterator[LiveServer]:
    config = ServeConfig(
        model=str(tiny_llama_dir), embedding_model=None, rerank_model=str(bert_dir), cache_dir=cache_dir,
        api_keys=(KEY,), drain_timeout_s=1.0,
        engine=EngineConfig(dtype="float32", device="cpu", max_model_len=64, num_kv_blocks=16),
        # A small batch budget: the six pairs are cut into several padded batches.
        limits=LimitsConfig(
            max_rerank_documents=MAX_DOCUMENTS, embedding_max_batch_tokens=64, requests_per_minute=1000,
            tokens_per_minute=100_000,
        ),
    )  # fmt: skip
    with served(config, KEY, "rerank") as server:
        yield server


@pytest.fixture
def client(rerank_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rerank_server.base_url, headers=rerank_server.headers, timeout=60.0) as http:
        yield http


def _error(resp: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    return error["message"]


def test_rerank_scores_equal_transformers_in_order(client: httpx.Client, expected, bert_dir: Path) -> None:
    scores, lengths = expected
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # distinct: the order is meaningful
    resp = client.post("/v1/rerank", json={"model": bert_dir.name, "query": QUERY, "documents": DOCUMENTS})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ratelimit-limit-requests"] == "1000"
    body = resp.json()
    assert body["id"] == f"rerank-{resp.headers['x-request-id']}" and body["model"] == bert_dir.name
    assert body["usage"] == {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}
    results = body["results"]
    assert [r["index"] for r in results] == sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    for r in results:
        assert abs(r["relevance_score"] - scores[r["index"]]) <= 1e-5
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}


def test_top_n_and_return_documents(client: httpx.Client, expected) -> None:
    scores = expected[0]
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    resp = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["index"] for r in results] == best[:2]
    assert all(set(r) == {"index", "relevance_score"} for r in results)
    every = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:3], "top_n": 10}).json()
    assert len(every["results"]) == 3


def test_score_in_vllm_shape(client: httpx.Client, expected, bert_dir: Path) -> None:
    scores, lengths = expected
    one_to_many = client.post("/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS})
    assert one_to_many.status_code == 200, one_to_many.text
    body = one_to_many.json()
    assert body["object"] == "list" and body["id"].startswith("score-") and body["model"] == bert_dir.name
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(DOCUMENTS))]
    assert max(abs(d["score"] - s) for d, s in zip(body["data"], scores)) <= 1e-5
    assert body["usage"] == {"prompt_tokens": sum(lengths), "completion_tokens": 0, "total_tokens": sum(lengths)}

    firsts, seconds = ["france", "the cat"], ["paris is the capital of france", "a dog"]
    pairwise = client.post("/score", json={"text_1": firsts, "text_2": seconds}).json()
    want, _ = reference_scores(bert_dir, firsts, seconds)
    assert max(abs(d["score"] - s) for d, s in zip(pairwise["data"], want, strict=True)) <= 1e-5
    single = client.post("/v1/score", json={"text_1": [QUERY], "text_2": "france"}).json()
    assert abs(single["data"][0]["score"] - scores[DOCUMENTS.index("france")]) <= 1e-5


def test_concurrent_requests_share_batches_and_keep_their_scores(client: httpx.Client, expected) -> None:
    """Requests at once: the worker may pad pairs of several requests (segment ids included) into one batch;
    each request still gets its own documents' scores."""
    scores = expected[0]
    subsets = [[0, 1], [2, 3, 4], [5], [1, 3, 5], [4, 0]]

    def score(indexes: list[int]) -> list[float]:
        body = client.post("/v1/score", json={"text_1": QUERY, "text_2": [DOCUMENTS[i] for i in indexes]}).json()
        return [d["score"] for d in body["data"]]

    with ThreadPoolExecutor(len(subsets)) as pool:
        answers = list(pool.map(score, subsets))
    for indexes, got in zip(subsets, answers, strict=True):
        assert max(abs(g - scores[i]) for g, i in zip(got, indexes, strict=True)) <= 1e-5


def test_http_errors(client: httpx.Client, rerank_server: LiveServer) -> None:
    _error(client.post("/v1/rerank", json={"query": QUERY, "documents": []}), 400, "invalid_value", "documents")
    many = ["a document"] * (MAX_DOCUMENTS + 1)
    assert "At most 8 documents" in _error(
        client.post("/v1/rerank", json={"query": QUERY, "documents": many}), 400, "invalid_value", "documents"
    )
    long = client.post("/v1/rerank", json={"query": QUERY, "documents": ["fine", TOO_LONG]})
    assert "documents[1]" in _error(long, 400, "context_length_exceeded", "documents")
    _error(client.post("/v1/rerank", json={"query": " ", "documents": ["x"]}), 400, "invalid_value", "query")
    _error(client.post("/v1/rerank", json={"query": QUERY, "documents": ["x"], "top_n": -1}), 400, "invalid_value", "top_n")
    _error(client.post("/v1/rerank", json={"query": QUERY, "documents": ["x"], "model": "nope"}), 404, "model_not_found", "model")
    _error(client.post("/v1/rerank", json={"query": QUERY, "documents": ["x"], "bogus": 1}), 400, "unknown_field", "bogus")
    _error(client.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), 400, "invalid_value", "text_1")
    _error(client.post("/v1/score", json={"text_1": "a", "text_2": []}), 400, "invalid_value", "text_2")
    _error(client.post("/v1/score", json={"text_1": "a", "text_2": [TOO_LONG]}), 400, "context_length_exceeded", "text_2")
    # Odd but well-typed input is served or refused, never a 5xx.
    for body in [
        {"query": "é😀\u202e\x00", "documents": ["\x00", "\ud7ff", " "], "top_n": 2**40},
        {"query": QUERY, "documents": [QUERY] * MAX_DOCUMENTS, "return_documents": False},
    ]:
        resp = client.post("/v1/rerank", json=body)
        assert resp.status_code == 200 and len(resp.json()["results"]) == len(body["documents"]), resp.text
    _error(client.post("/v1/rerank", json={"query": 3, "documents": ["x"]}), 400, "invalid_type", "query")
    no_key = httpx.post(f"{rerank_server.base_url}/v1/rerank", json={"query": QUERY, "documents": ["x"]})
    _error(no_key, 401, "invalid_api_key", None)


def test_grpc_rerank(rerank_server: LiveServer, expected) -> None:
    scores = expected[0]

    async def go() -> None:
        async with grpc.aio.insecure_channel(rerank_server.grpc_target) as channel:
            stub, md = rpc.RerankingStub(channel), rerank_server.grpc_metadata
            resp = await stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS, top_n=3), metadata=md)
            assert [r.index for r in resp.results] == sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])[:3]
            assert all(abs(r.relevance_score - scores[r.index]) <= 1e-5 for r in resp.results)
            assert all(r.document == DOCUMENTS[r.index] for r in resp.results)
            bare = await stub.Rerank(pb.RerankRequest(query=QUERY, documents=["x"], return_documents=False), metadata=md)
            assert not bare.results[0].HasField("document") and bare.usage.total_tokens > 0
            for request, code in [
                (pb.RerankRequest(query=QUERY), "invalid_value"),
                (pb.RerankRequest(query=QUERY, documents=["x"] * (MAX_DOCUMENTS + 1)), "invalid_value"),
                (pb.RerankRequest(query=QUERY, documents=[TOO_LONG]), "context_length_exceeded"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Rerank(request, metadata=md)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert dict(err.value.trailing_metadata())["lmserve-error-code"] == code

    asyncio.run(go())


def test_models_metrics_and_access_line(client: httpx.Client, rerank_server: LiveServer, bert_dir: Path) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards[bert_dir.name]["max_model_len"] == MAX_POSITIONS and cards[bert_dir.name]["family"] == "bert (transformers)"

    async def list_models() -> list[pb.Model]:
        async with grpc.aio.insecure_channel(rerank_server.grpc_target) as channel:
            resp = await rpc.ModelsStub(channel).ListModels(pb.ListModelsRequest(), metadata=rerank_server.grpc_metadata)
            return list(resp.data)

    assert {m.id: m.kind for m in asyncio.run(list_models())}[bert_dir.name] == "rerank"

    before = client.get("/metrics").text
    capture, root, lmserve_logger = LogCapture("json"), logging.getLogger(), logging.getLogger("lmserve")
    saved_level = lmserve_logger.level
    lmserve_logger.setLevel(logging.INFO)
    root.addHandler(capture.handler)
    try:
        resp = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]}, headers={"x-request-id": "rr-1"})
        line = capture.access("rr-1")
    finally:
        root.removeHandler(capture.handler)
        lmserve_logger.setLevel(saved_level)
    tokens = resp.json()["usage"]["total_tokens"]
    assert line["prompt_tokens"] == tokens and line["path"] == "/v1/rerank" and line["response_id"] == "rerank-rr-1"
    after = client.get("/metrics").text
    label = {"model": bert_dir.name}
    assert metric_value(after, "lmserve_rerank_tokens_total", label) - metric_value(before, "lmserve_rerank_tokens_total", label) == tokens
    assert metric_value(after, "lmserve_embedding_batches_total", label) > metric_value(before, "lmserve_embedding_batches_total", label)
    ok = {"endpoint": "/v1/rerank", "transport": "http", "status": "200"}
    assert metric_value(after, "lmserve_requests_total", ok) == metric_value(before, "lmserve_requests_total", ok) + 1


def test_xlm_roberta_reranker_equals_transformers(tmp_path: Path) -> None:
    folder = build_xlm_roberta_cross_encoder(tmp_path / "xlmr-reranker")
    scores, lengths = reference_scores(folder, [QUERY] * len(DOCUMENTS), DOCUMENTS)
    reranker = Reranker.load(folder, "xlmr", max_batch_tokens=64)  # several batches
    assert not reranker.uses_type_ids and reranker.max_input_tokens == MAX_POSITIONS

    async def go():
        await reranker.start()
        try:
            ids, type_ids = reranker.tokenize_pairs([(QUERY, d) for d in DOCUMENTS])
            return await reranker.submit(reranker.validate(ids, type_ids, [f"documents[{i}]" for i in range(len(ids))]))
        finally:
            await reranker.stop()

    result = asyncio.run(go())
    assert result.num_tokens == lengths and reranker.num_batches > 1
    assert max(abs(a - b) for a, b in zip(result.scores, scores, strict=True)) <= 1e-5


def test_serve_refuses_a_rerank_model_that_is_no_cross_encoder(tiny_llama_dir: Path, bert_dir: Path) -> None:
    """Before any weight is read: a causal LM, or a classifier with two outputs, is no --rerank-model."""
    import json

    two_labels = bert_dir.parent / "two-labels"
    two_labels.mkdir(exist_ok=True)
    config = json.loads((bert_dir / "config.json").read_text())
    (two_labels / "config.json").write_text(json.dumps({**config, "id2label": {"0": "no", "1": "yes"}}))
    for folder, reason in [(tiny_llama_dir, "*ForSequenceClassification checkpoint"), (two_labels, "num_labels=1")]:
        result = call_cli(
            "serve", "--model", str(tiny_llama_dir), "--embedding-model", "none", "--rerank-model", str(folder),
            "--port", str(free_port()), "--grpc-port", "0",
        )  # fmt: skip
        assert result.returncode == 2 and result.stderr.startswith("error: --rerank-model: ") and reason in result.stderr

