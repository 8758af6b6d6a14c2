"""Embedding checkpoints beyond BERT, served over HTTP and gRPC by the real server: tiny random XLM-RoBERTa and
ModernBERT encoders and a Qwen3 decoder embedder (last-token pooling, an instruction prompt), built here as real
sentence-transformers folders, give sentence-transformers' own `encode` vectors; `dimensions` is served where
config.json declares Matryoshka sizes and refused (400 / INVALID_ARGUMENT) where it does not; a folder it
cannot reproduce is refused by `lmserve serve` before loading.

One server thread, one tiny generation engine, three states: one per embedding model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch

from lmserve.api.proto import lmserve_pb2 as pb
from lmserve.api.proto import lmserve_pb2_grpc as rpc
from lmserve.app import build_state, state_from_models
from lmserve.config import EngineConfig, ServeConfig
from lmserve.embeddings.embedder import Embedder
from lmserve.state import ServedModel
from tests.api.conftest import ServerThread
from tests.cli_process import call_cli, free_port
from tests.conftest import SMOLLM2_VOCAB_SIZE

HIDDEN = 64
BERT_VOCAB_SIZE = 30522  # MiniLM's tokenizer, which the encoders share
QWEN3_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
# Lengths within a factor of two, so that one batch takes them all and pads the shorter ones.
TEXTS = [
    "A cat sat on the warm mat by the door.",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog near the river.",
    "Embeddings map texts to vectors.",
]
MIN_COSINE = 0.99999


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def _encoder(dest: Path, config, pooling: str, minilm_dir: Path, **st_kwargs) -> Path:
    """Saved by sentence-transformers itself (6.x's files: pooling_mode, max length in tokenizer_config)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoModel, AutoTokenizer

    hf = dest.with_name(dest.name + "-hf")
    _randomize(AutoModel.from_config(config)).save_pretrained(hf)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(hf)
    modules = [Transformer(str(hf), max_seq_length=128), Pooling(HIDDEN, pooling_mode=pooling), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", **st_kwargs).save(str(dest))
    return dest


def _qwen3_embedder(dest: Path, smollm2_dir: Path) -> Path:
    """The layout Qwen3-Embedding ships: a causal LM's folder, tokenizer appending <|endoftext|> and padding on
    the left, the legacy pooling_mode_* flags with last-token pooling, a query instruction, is_matryoshka."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    config = Qwen3Config(
        vocab_size=SMOLLM2_VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    config.is_matryoshka = True
    _randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    eot = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eot}:0", pair=f"$A:0 {eot}:0 $B:1 {eot}:1",
        special_tokens=[(eot, tokenizer.convert_tokens_to_ids(eot))],
    )  # fmt: skip
    tokenizer.pad_token = eot
    tokenizer.save_pretrained(dest)
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "left"}))
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True,
        },  # fmt: skip
        "config_sentence_transformers.json": {
            "prompts": {"query": QWEN3_QUERY, "document": ""}, "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },  # fmt: skip
        "sentence_bert_config.json": {"max_seq_length": 256, "do_lower_case": False},
    }
    for name, content in files.items():
        (dest / name).parent.mkdir(exist_ok=True)
        (dest / name).write_text(json.dumps(content, indent=2))
    (dest / "2_Normalize").mkdir(exist_ok=True)
    return dest


@dataclass(frozen=True)
class Served:
    name: str
    folder: Path
    http: str  # base URL
    grpc_target: str
    embedder: Embedder


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, minilm_dir: Path, smollm2_dir: Path
) -> Iterator[dict[str, Served]]:
    from transformers import ModernBertConfig, XLMRobertaConfig

    root = tmp_path_factory.mktemp("embedders")
    xlmr = XLMRobertaConfig(
        vocab_size=BERT_VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=130, type_vocab_size=1, pad_token_id=0,
    )  # fmt: skip
    modernbert = ModernBertConfig(
        vocab_size=BERT_VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=8,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
    )  # fmt: skip
    modernbert.matryoshka_dimensions = [16, 32, HIDDEN]
    prompts = {"query": "query: ", "document": "passage: "}
    folders = {
        "xlm-roberta": _encoder(root / "xlm-roberta", xlmr, "cls", minilm_dir, prompts=prompts),
        # a default prompt, which sentence-transformers' encode applies unasked
        "modernbert": _encoder(
            root / "modernbert", modernbert, "mean", minilm_dir, prompts=prompts, default_prompt_name="query"
        ),
        "qwen3": _qwen3_embedder(root / "qwen3", smollm2_dir),
    }
    names = list(folders)
    config = ServeConfig(
        model=str(tiny_llama_dir), embedding_model=str(folders[names[0]]), cache_dir=root, safety=False, grpc_port=0,
        engine=EngineConfig(dtype="float32", device="cpu", num_kv_blocks=16, block_size=16),
    )  # fmt: skip
    base = build_state(config)
    states = {names[0]: base}
    for name in names[1:]:
        embedder = Embedder.load(folders[name], name)
        served_model = ServedModel(name=name, aliases=frozenset({name}), created=0)
        states[name] = state_from_models(
            config, base.engine, base.tokenizer, base.generation_model, embedder, served_model
        )
    thread = ServerThread(base, states)
    thread.start()
    try:
        yield {
            name: Served(
                state.embedding_model.name,  # type: ignore[union-attr]
                folders[name],
                f"http://127.0.0.1:{thread.port(name)}",
                f"127.0.0.1:{thread.grpc_port(name)}",
                state.embedder,  # type: ignore[arg-type]
            )
            for name, state in states.items()
        }
    finally:
        thread.stop()


def _cosines(got, expected) -> np.ndarray:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)


def _post(model: Served, body: dict) -> httpx.Response:
    return httpx.post(f"{model.http}/v1/embeddings", json={"model": model.name, **body}, timeout=60.0)


def _embed_grpc(model: Served, request: pb.EmbedRequest) -> pb.EmbedResponse:
    with grpc.insecure_channel(model.grpc_target) as channel:
        return rpc.EmbeddingsStub(channel).Embed(request, timeout=60.0)


@pytest.mark.parametrize("name", ["xlm-roberta", "modernbert", "qwen3"])
def test_vectors_are_sentence_transformers(served: dict[str, Served], name: str) -> None:
    from sentence_transformers import SentenceTransformer

    model = served[name]
    st = SentenceTransformer(str(model.folder), device="cpu")
    assert st.tokenizer.padding_side == ("left" if name == "qwen3" else "right")  # as the reference pads
    # encode() as a user calls it (the folder's default prompt, if any), then the query prompt named.
    for prompt_name in (None, "query"):
        expected = st.encode(TEXTS, batch_size=len(TEXTS), prompt_name=prompt_name)
        padding_before = model.embedder.num_padding_tokens
        response = _post(model, {"input": TEXTS, "prompt_name": prompt_name})
        assert response.status_code == 200, response.text
        body = response.json()
        vectors = [d["embedding"] for d in body["data"]]
        assert min(_cosines(vectors, expected)) >= MIN_COSINE, (prompt_name, _cosines(vectors, expected))
        assert model.embedder.num_padding_tokens > padding_before  # the texts shared a padded batch
        prompt = st.prompts.get(prompt_name or st.default_prompt_name or "", "")
        num_tokens = sum(len(ids) for ids in st.tokenizer([prompt + text for text in TEXTS])["input_ids"])
        assert body["usage"]["prompt_tokens"] == num_tokens

        request = pb.EmbedRequest(model=model.name, input=TEXTS)
        if prompt_name is not None:
            request.prompt_name = prompt_name
        reply = _embed_grpc(model, request)
        assert min(_cosines([list(d.embedding) for d in reply.data], expected)) >= MIN_COSINE
    assert name != "qwen3" or st.prompts["query"] == QWEN3_QUERY  # the instruction really was in the way


def test_dimensions_where_the_model_declares_matryoshka(served: dict[str, Served]) -> None:
    from sentence_transformers import SentenceTransformer

    qwen3 = served["qwen3"]  # is_matryoshka: any size
    full = SentenceTransformer(str(qwen3.folder), device="cpu").encode(TEXTS)
    for dims in (8, 32):
        response = _post(qwen3, {"input": TEXTS, "dimensions": dims})
        vectors = np.asarray([d["embedding"] for d in response.json()["data"]])
        assert vectors.shape == (len(TEXTS), dims)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # renormalized
        assert min(_cosines(vectors, full[:, :dims])) >= MIN_COSINE
    short = _embed_grpc(qwen3, pb.EmbedRequest(model=qwen3.name, input=TEXTS[:1], dimensions=32))
    assert len(short.data[0].embedding) == 32

    modernbert = served["modernbert"]  # matryoshka_dimensions [16, 32, 64]: those sizes only
    assert len(_post(modernbert, {"input": "hi", "dimensions": 16}).json()["data"][0]["embedding"]) == 16
    refused = _post(modernbert, {"input": "hi", "dimensions": 24})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"
    assert "16, 32, 64" in refused.json()["error"]["message"]

    xlmr = served["xlm-roberta"]  # declares neither
    refused = _post(xlmr, {"input": "hi", "dimensions": 32})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "dimensions" and "Matryoshka" in refused.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as error:
        _embed_grpc(xlmr, pb.EmbedRequest(model=xlmr.name, input=["hi"], dimensions=32))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Matryoshka" in error.value.details()


def test_prompt_name_errors(served: dict[str, Served]) -> None:
    qwen3 = served["qwen3"]
    unknown = _post(qwen3, {"input": "hi", "prompt_name": "passage"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "prompt_name"
    assert "document, query" in unknown.json()["error"]["message"]
    with_ids = _post(qwen3, {"input": [[28120, 905, 0]], "prompt_name": "query"})
    assert with_ids.status_code == 400 and with_ids.json()["error"]["param"] == "prompt_name"
    with pytest.raises(grpc.RpcError) as error:
        _embed_grpc(qwen3, pb.EmbedRequest(model=qwen3.name, input=["hi"], prompt_name="passage"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_folder_it_cannot_reproduce_is_refused_before_loading(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`lmserve serve` with an embedding folder holding a Dense module: one error line, exit 2, before any weight."""
    folder = tmp_path / "dense-embedder"
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 512}))
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    result = call_cli(
        "serve", "--model", str(tiny_llama_dir), "--embedding-model", str(folder), "--port", str(free_port()),
        "--grpc-port", "0", "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: embedding model {folder}: {folder / 'modules.json'}: module 'sentence_transformers.models.Dense' is "
        "not supported (only Transformer, Pooling, Normalize): its vectors would differ from sentence-transformers'"
    ], result.stderr
    assert "Traceback" not in result.stderr
