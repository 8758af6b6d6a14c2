"""Sampler: each logits processor's exact semantics, seeding, logprobs and the draw itself."""

from __future__ import annotations

import math

import pytest
import torch

from lmserve.engine.modeling import sampling
from lmserve.engine.request import Request
from lmserve.engine.sampler import (
    SampledToken,
    _apply_presence_frequency,
    _apply_repetition_penalty,
    sample,
)
from lmserve.types import SamplingParams

EOS = 2


def make_request(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset({EOS}),
) -> Request:
    req = Request("r", prompt or [0], params, eos_token_ids=eos)
    for t in output or []:
        req.append_token(t)
    return req


def sample_one(
    logits: list[float],
    params: SamplingParams,
    generator: torch.Generator | None = None,
    **kw,
) -> SampledToken:
    return sample(torch.tensor([logits]), [make_request(params, **kw)], [generator])[0]


GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def test_greedy_is_argmax_batched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    reqs = [make_request(GREEDY) for _ in range(4)]
    out = sample(logits, reqs, [None] * 4)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs == () for t in out)


def test_greedy_bf16_input() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 1.0]], dtype=torch.bfloat16)
    out = sample(logits, [make_request(GREEDY), make_request(GREEDY)], [None, None])
    assert [t.token_id for t in out] == [1, 0]
    mixed = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0.0, logprobs=1)]
    out = sample(logits, [make_request(p) for p in mixed], [None, None])
    assert [t.token_id for t in out] == [1, 0]
    assert out[1].logprob == pytest.approx(torch.log_softmax(logits[1].float(), -1)[0].item())


def test_logits_not_mutated() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    before = logits.clone()
    params = SamplingParams(temperature=0.7, repetition_penalty=2.0, logit_bias=((0, 5.0),))
    sample(logits, [make_request(params, prompt=[2])], [None])
    assert torch.equal(logits, before)


def test_logit_bias_forces_token() -> None:
    params = SamplingParams(temperature=0.0, logit_bias=((0, 100.0),))
    assert sample_one([0.0, 5.0, 3.0], params).token_id == 0
    # at temperature 1 too: exp(-95) mass elsewhere
    params = SamplingParams(temperature=1.0, seed=1, logit_bias=((0, 100.0),))
    for _ in range(5):
        assert sample_one([0.0, 5.0, 3.0], params).token_id == 0


def test_logit_bias_ignores_out_of_vocab_ids() -> None:
    params = SamplingParams(temperature=0.0, logit_bias=((99, 100.0), (0, 10.0)))
    assert sample_one([0.0, 5.0, 3.0], params).token_id == 0


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = [0.0, 1.0, 10.0, 9.0]  # EOS (2) best, stop id 3 next
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sample_one(logits, params, output=[1]).token_id == 1  # 1 output < 2: EOS and 3 banned
    assert sample_one(logits, params, output=[1, 1]).token_id == 2  # min reached: EOS allowed
    # ignore_eos: EOS is not an end, so it is not banned; stop ids still are
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,), ignore_eos=True)
    assert sample_one([0.0, 1.0, 9.0, 10.0], params).token_id == 3
    params = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sample_one(logits, params).token_id == 2


def test_min_tokens_blocks_eos_when_sampling() -> None:
    params = SamplingParams(temperature=1.0, min_tokens=5)
    gen = torch.Generator().manual_seed(0)
    req = make_request(params)
    for _ in range(20):
        tok = sample(torch.tensor([[0.0, 0.0, 8.0]]), [req], [gen])[0]
        assert tok.token_id != EOS


def test_repetition_penalty_exact_values() -> None:
    """HF: seen tokens (prompt + output) with logit > 0 are divided by p, others multiplied."""
    logits = torch.tensor([[4.0, 3.0, -1.0, -2.0, 0.0], [4.0, 3.0, -1.0, -2.0, 0.0]])
    reqs = [
        make_request(SamplingParams(repetition_penalty=2.0), prompt=[0, 0], output=[2, 4]),
        make_request(SamplingParams()),  # penalty 1: untouched
    ]
    _apply_repetition_penalty(logits, reqs, vocab=5)
    assert logits.tolist() == [[2.0, 3.0, -2.0, -2.0, 0.0], [4.0, 3.0, -1.0, -2.0, 0.0]]


def test_repetition_penalty_changes_choice() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_one([4.0, 3.0, -1.0], params, prompt=[0]).token_id == 1  # 4/2 < 3
    assert sample_one([7.0, 3.0, -1.0], params, prompt=[0]).token_id == 0  # 7/2 > 3
    assert sample_one([-1.0, -1.5], params, prompt=[0]).token_id == 1  # -1*2 < -1.5
    assert sample_one([4.0, 3.0, 0.0], params, prompt=[2], output=[0]).token_id == 1  # output counts


def test_presence_and_frequency_penalties_exact() -> None:
    """OpenAI: logit -= presence * (count > 0) + frequency * count, over output tokens only."""
    logits = torch.ones(2, 4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    reqs = [
        # token 0 three times, token 1 once in the output; token 2 only in the prompt
        make_request(params, prompt=[2, 2], output=[0, 0, 0, 1]),
        make_request(SamplingParams(), prompt=[2], output=[0]),
    ]
    _apply_presence_frequency(logits, reqs, vocab=4)
    assert logits.tolist() == [[1.0 - 0.5 - 0.75, 1.0 - 0.5 - 0.25, 1.0, 1.0], [1.0] * 4]


def test_presence_penalty_changes_choice() -> None:
    params = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert sample_one([2.0, 1.5], params, output=[0]).token_id == 1
    assert sample_one([2.0, 1.5], params, prompt=[0]).token_id == 0  # prompt is not penalized


def test_top_k_1_is_argmax_at_temperature_1() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, top_k=1)
    req = make_request(params)
    best = int(logits.argmax())
    for _ in range(20):
        assert sample(logits, [req], [None])[0].token_id == best


def test_top_k_restricts_to_k_best() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, 1.0]])
    req = make_request(SamplingParams(temperature=5.0, top_k=2))
    gen = torch.Generator().manual_seed(0)
    seen = {sample(logits, [req], [gen])[0].token_id for _ in range(100)}
    assert seen == {1, 2}


def test_top_p_tiny_keeps_only_top_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    req = make_request(SamplingParams(temperature=2.0, top_p=1e-6))
    best = int(logits.argmax())
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        assert sample(logits, [req], [gen])[0].token_id == best


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    # probs 0.5, 0.3, 0.2 (given as logs): top_p=0.8 keeps {0, 1}; top_p=0.81 keeps all three
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    req = make_request(SamplingParams(temperature=1.0, top_p=0.79))
    assert {sample(logits, [req], [gen])[0].token_id for _ in range(200)} == {0, 1}
    req = make_request(SamplingParams(temperature=1.0, top_p=0.81))
    assert {sample(logits, [req], [gen])[0].token_id for _ in range(200)} == {0, 1, 2}


def test_min_p() -> None:
    # probs 0.5, 0.3, 0.2: min_p=0.5 keeps probs >= 0.25 -> {0, 1}
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    req = make_request(SamplingParams(temperature=1.0, min_p=0.5))
    assert {sample(logits, [req], [gen])[0].token_id for _ in range(200)} == {0, 1}
    req = make_request(SamplingParams(temperature=1.0, min_p=0.61))  # 0.3 < 0.305
    assert {sample(logits, [req], [gen])[0].token_id for _ in range(50)} == {0}


def _run_seeded(params: SamplingParams, rows: torch.Tensor, others: int) -> list[int]:
    """Sample 20 steps for one seeded request, batched (in the middle) with `others` rows."""
    gen = torch.Generator().manual_seed(params.seed)
    req = make_request(params)
    noise = torch.Generator().manual_seed(1234)
    other_params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(temperature=1.2, top_k=5),
    ]
    tokens = []
    for step in range(rows.shape[0]):
        batch_logits = [rows[step]]
        batch_reqs = [req]
        gens: list[torch.Generator | None] = [gen]
        for j in range(others):
            p = other_params[j % len(other_params)]
            batch_logits.append(torch.randn(rows.shape[1], generator=noise))
            batch_reqs.append(make_request(p))
            gens.append(torch.Generator().manual_seed(99 + j) if p.seed is not None else None)
        mid = len(batch_logits) // 2  # put our row somewhere other than first
        batch_logits.insert(mid, batch_logits.pop(0))
        batch_reqs.insert(mid, batch_reqs.pop(0))
        gens.insert(mid, gens.pop(0))
        out = sample(torch.stack(batch_logits), batch_reqs, gens)
        tokens.append(out[mid].token_id)
    return tokens


@pytest.mark.parametrize("top_p", [0.95, 1.0])  # 1.0: plain temperature, alone a step of sampling.c only
def test_seeded_reproducible_and_batch_independent(top_p: float) -> None:
    rows = torch.randn(20, 64, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=42)
    alone = _run_seeded(params, rows, others=0)
    again = _run_seeded(params, rows, others=0)
    batched = _run_seeded(params, rows, others=4)
    assert alone == again == batched
    other_seed = _run_seeded(SamplingParams(temperature=1.0, top_p=top_p, seed=43), rows, others=0)
    assert other_seed != alone  # 20 draws over 64 tokens: a collision is astronomically unlikely


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    params = [
        SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, logprobs=0, logit_bias=((7, 3.0),)),
    ]
    reqs = [make_request(p, prompt=[1, 2, 3]) for p in params]
    out = sample(logits, reqs, [None, None, torch.Generator().manual_seed(0)])
    ref = torch.log_softmax(logits, dim=-1)
    for i in (0, 2):
        assert out[i].logprob == pytest.approx(ref[i, out[i].token_id].item(), abs=1e-5)
    assert out[1].logprob is None and out[1].top_logprobs == ()
    assert out[2].top_logprobs == ()
    top = out[0].top_logprobs
    assert len(top) == 5
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    ref_vals, ref_ids = torch.topk(ref[0], 5)
    assert [i for i, _ in top] == ref_ids.tolist()
    assert values == pytest.approx(ref_vals.tolist(), abs=1e-5)


def test_logprobs_with_plain_greedy() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    out = sample_one(logits[0].tolist(), SamplingParams(temperature=0.0, logprobs=2))
    ref = torch.log_softmax(logits[0], -1)
    assert out.token_id == 1
    assert out.logprob == pytest.approx(ref[1].item(), abs=1e-6)
    assert [i for i, _ in out.top_logprobs] == [1, 0]


def test_distribution_matches_softmax() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    expected = torch.softmax(logits[0], -1).tolist()  # ~0.665, 0.245, 0.090
    req = make_request(SamplingParams(temperature=1.0, seed=0))
    gen = torch.Generator().manual_seed(0)
    n = 2000
    batch = logits.expand(n, 3).contiguous()
    out = sample(batch, [req] * n, [gen] * n)
    counts = [0, 0, 0]
    for t in out:
        counts[t.token_id] += 1
    for c, p in zip(counts, expected):
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(c / n - p) < 5 * sd  # deterministic with the fixed seed; 5 sigma margin


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    n = 500
    req = make_request(SamplingParams(temperature=0.1, seed=0))
    out = sample(logits.expand(n, 2).contiguous(), [req] * n, [gen] * n)
    # p(1) = 1 / (1 + e^10) ~ 4.5e-5
    assert sum(t.token_id for t in out) <= 2


def test_empty_and_mismatched() -> None:
    assert sample(torch.empty(0, 10), [], []) == []
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 3), [make_request(GREEDY)], [None])


@pytest.mark.parametrize("with_top_p", [False, True], ids=["topk_path", "sort_path"])
def test_mixed_filters_in_one_batch(with_top_p: bool) -> None:
    """Each row gets its own top_k/top_p, whichever filtering path the batch takes."""
    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, 2.7]] * 4)
    params = [
        SamplingParams(temperature=5.0, top_k=2),
        SamplingParams(temperature=5.0),  # no filter
        SamplingParams(temperature=5.0, top_k=-1, top_p=0.3 if with_top_p else 1.0),
        SamplingParams(temperature=5.0, top_k=3),
    ]
    reqs = [make_request(p) for p in params]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    seen: list[set[int]] = [set() for _ in range(4)]
    for _ in range(150):
        for i, t in enumerate(sample(logits, reqs, gens)):
            seen[i].add(t.token_id)
    assert seen[0] == {1, 2}
    assert seen[1] == {0, 1, 2, 3, 4}
    assert seen[2] == ({1, 2} if with_top_p else {0, 1, 2, 3, 4})  # at T=5 each has ~0.2-0.25
    assert seen[3] == {1, 2, 3}


def test_extreme_temperature_and_penalty_fall_back_to_argmax_not_error() -> None:
    """A denormal temperature or repetition penalty must not raise and fail the other rows of the batch."""
    from lmserve.engine.request import Request as _Request
    from lmserve.engine.sampler import sample as _sample
    from lmserve.types import SamplingParams as _SP

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.1, 4.0], [2.0, 1.0, 0.0]])
    reqs = [
        _Request("a", [0], _SP(temperature=1e-45)),
        _Request("b", [1], _SP(temperature=1.0, repetition_penalty=5e-324)),
        _Request("c", [2], _SP(temperature=0.0)),
    ]
    out = _sample(logits, reqs, [None, None, None])
    # Row b: a penalty below 1 boosts the repeated prompt token 1 to +inf, so that token wins.
    assert [t.token_id for t in out] == [1, 1, 0]


_c_sampler = pytest.mark.usefixtures("kernels")  # sampling.c, native and portable builds


@_c_sampler
def test_c_sampler_draws_from_softmax_over_a_real_vocab() -> None:
    """sampling.c: frequencies match softmax(x / T) over 49,152 tokens (its chunked scan, not just 3)."""
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(49152, generator=gen) * 2
    row[:4] = torch.tensor([9.0, 8.5, 8.0, 7.0])  # a head with most of the mass, spread over chunks below
    n, temperature = 4000, 0.8
    probs = torch.softmax(row / temperature, -1)
    got = sampling.sample_temperature(row.expand(n, -1), [temperature] * n, torch.rand(n, generator=gen))
    counts = torch.bincount(got, minlength=49152).double()
    for token in range(4):
        p = probs[token].item()
        assert abs(counts[token].item() / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    tail = probs[4:].sum().item()  # the other 49,148 tokens together
    assert abs(counts[4:].sum().item() / n - tail) < 5 * math.sqrt(tail * (1 - tail) / n) + 1e-3


@_c_sampler
def test_c_sampler_edges() -> None:
    x = torch.tensor([[float("-inf"), 1.0, float("-inf"), 1.0, float("-inf")]] * 3)
    u = torch.tensor([0.0, 0.4999, 0.9999999])
    # u = 0: the first token with mass; u near 1: the last; a banned (-inf) token never, at any temperature.
    assert sampling.sample_temperature(x, [1.0, 1.0, 50.0], u).tolist() == [1, 1, 3]
    nan_row = torch.tensor([[0.0, float("nan"), 3.0, 1.0]])
    assert sampling.sample_temperature(nan_row, [1.0], torch.tensor([0.5])).tolist() == [2]  # argmax
    hot = torch.tensor([[0.0, 200.0, 1.0]])
    assert sampling.sample_temperature(hot, [1e-30], torch.tensor([0.3])).tolist() == [1]  # overflow -> argmax
    # A probability that underflows float32 is zero, as in torch's softmax: never drawn, even at u = 0.
    assert sampling.sample_temperature(torch.tensor([[-200.0, 10.0]]), [1.0], torch.tensor([0.0])).tolist() == [1]
    # u within rounding of 1 over a real vocabulary: the last token with mass, not a massless one after it.
    row = torch.randn(49152, generator=torch.Generator().manual_seed(1))
    row[-3:] = -300.0
    u = 1.0 - torch.arange(1, 65, dtype=torch.float64) * 2.0**-24
    got = sampling.sample_temperature(row.expand(64, -1), [1.0] * 64, u.float())
    assert int(got.max()) < 49149


@_c_sampler
def test_temperature_only_rows_go_through_the_c_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per row: plain-temperature rows to sampling.c, filtered rows to the torch path, in one batch."""
    seen: list[int] = []
    real = sampling.sample_temperature
    monkeypatch.setattr(sampling, "sample_temperature", lambda x, t, u: seen.append(x.shape[0]) or real(x, t, u))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    reqs = [make_request(SamplingParams(temperature=0.7)), make_request(SamplingParams(temperature=1.0, top_k=5)),
            make_request(SamplingParams(temperature=1.3))]  # fmt: skip
    out = sample(logits, reqs, [None] * 3)
    assert seen == [2] and len(out) == 3
    assert out[1].token_id in logits[1].topk(5).indices.tolist()


@_c_sampler
def test_a_step_of_plain_temperature_rows_samples_the_logits_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row temperature-only: sampling.c reads the caller's logits (no copy of the batch) and leaves them
    as they were."""
    seen: list[int] = []
    real = sampling.sample_temperature
    monkeypatch.setattr(sampling, "sample_temperature", lambda x, t, u: seen.append(x.data_ptr()) or real(x, t, u))
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    out = sample(logits, [make_request(SamplingParams(temperature=t)) for t in (0.5, 0.7, 1.0, 1.5)], [None] * 4)
    assert seen == [logits.data_ptr()] and len(out) == 4
    assert torch.equal(logits, before)
