"""Choosing the next token of each sequence from the model's logits.

Pure functions of (logits, per-request parameters, per-request RNGs): no state lives here,
so the engine can call `sample` for any subset of its batch in any order.

Per row, in this order (vLLM / HF / OpenAI semantics):
    logit_bias (add) -> min_tokens (ban EOS / stop ids) -> repetition_penalty (HF, prompt+output)
    -> presence/frequency penalties (OpenAI, output only)
    -> greedy: argmax | random: / temperature -> top_k -> top_p -> min_p -> draw from softmax.
Logprobs are always those of the raw model logits (vLLM's default), so a client sees what the
model believed, not what the processors made of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmserve.engine.modeling import sampling
from lmserve.engine.request import Request
from lmserve.types import SamplingParams


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    # log_softmax of the raw logits at the chosen token; None unless params.logprobs is set.
    logprob: float | None
    # The top `params.logprobs` (id, logprob) of the raw logits, best first.
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample(
    logits: torch.Tensor,
    requests: Sequence[Request],
    generators: Sequence[torch.Generator | None],
) -> list[SampledToken]:
    """One token per row of `logits` ([num_rows, vocab]); row i belongs to requests[i].

    generators[i] is request i's own RNG (seeded requests) or None for the global RNG. A
    seeded row's draw uses only its own logits and generator, so a seed reproduces the same
    text whatever else happens to share the batch.
    """
    num_rows = logits.shape[0]
    if len(requests) != num_rows or len(generators) != num_rows:
        raise ValueError(
            f"{num_rows} logits rows but {len(requests)} requests and {len(generators)} generators"
        )
    if num_rows == 0:
        return []

    if all(_is_plain_greedy(r) for r in requests):
        # The common decode step: one argmax over the batch and one device->host copy.
        return [SampledToken(int(t), None) for t in logits.argmax(dim=-1).tolist()]

    vocab = logits.shape[1]
    if sampling.sample_temperature_supported(logits) and all(
        not r.sampling.is_greedy and _unprocessed(r) and _temperature_only(r.sampling, vocab) for r in requests
    ):
        # The common sampled step (temperature only, as vllm bench serve's requests): sampling.c draws every
        # row, exactly as the general path below would, and only reads the logits, so they need no copy.
        chosen = _draw_plain(logits, [r.sampling for r in requests], generators).tolist()
        return [SampledToken(token_id, None) for token_id in chosen]

    device = logits.device
    x = logits.to(dtype=torch.float32, copy=True)  # never mutate the caller's logits

    # Raw logprobs, before any processing, only for the rows that asked for them.
    lp_rows = [i for i, r in enumerate(requests) if r.sampling.logprobs is not None]
    raw_logprobs = torch.log_softmax(x[lp_rows], dim=-1) if lp_rows else None

    _apply_logit_bias(x, requests, vocab)
    _apply_min_tokens(x, requests, vocab)
    _apply_repetition_penalty(x, requests, vocab)
    _apply_presence_frequency(x, requests, vocab)

    token_ids = torch.empty(num_rows, dtype=torch.long, device=device)
    greedy_rows = [i for i, r in enumerate(requests) if r.sampling.is_greedy]
    random_rows = [i for i, r in enumerate(requests) if not r.sampling.is_greedy]
    if greedy_rows:
        g_idx = _index(greedy_rows, device)
        token_ids[g_idx] = x[g_idx].argmax(dim=-1)
    # Rows whose only processor left is a temperature are drawn by the C kernel on CPU (sampling.c: no
    # probabilities materialised; the same CDF inversion as _draw); the decision is per row, so a row's
    # draw does not depend on what else shares the batch.
    in_c = sampling.sample_temperature_supported(x)
    plain = [i for i in random_rows if in_c and _temperature_only(requests[i].sampling, vocab)]
    filtered = sorted(set(random_rows) - set(plain))
    for rows, draw in ((plain, _draw_plain), (filtered, _draw_filtered)):
        if len(rows) == num_rows:  # the usual case: no copy of the rows
            token_ids = draw(x, [r.sampling for r in requests], generators)
        elif rows:
            idx = _index(rows, device)
            token_ids[idx] = draw(x[idx], [requests[i].sampling for i in rows], [generators[i] for i in rows])

    chosen = token_ids.tolist()
    out_logprob: list[float | None] = [None] * num_rows
    out_top: list[tuple[tuple[int, float], ...]] = [()] * num_rows
    if raw_logprobs is not None:
        lp_idx = _index(lp_rows, device)
        chosen_lp = raw_logprobs.gather(1, token_ids[lp_idx].unsqueeze(1)).squeeze(1).tolist()
        ks = [requests[i].sampling.logprobs or 0 for i in lp_rows]
        k_max = min(max(ks), vocab)
        if k_max > 0:
            top_vals, top_ids = torch.topk(raw_logprobs, k_max, dim=-1)  # sorted, best first
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
        for j, row in enumerate(lp_rows):
            out_logprob[row] = chosen_lp[j]
            k = min(ks[j], vocab)
            if k > 0:
                out_top[row] = tuple(zip(top_ids_l[j][:k], top_vals_l[j][:k]))
    return [SampledToken(chosen[i], out_logprob[i], out_top[i]) for i in range(num_rows)]


def processed_probs(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """The distribution `sample` draws from for each row of `logits`, all rows `req`'s (speculative
    verification); only for requests whose processors do not depend on the output so far
    (Request.max_drafts): logit_bias, temperature, top_k, top_p, min_p."""
    x = logits.to(dtype=torch.float32, copy=True)
    rows = [req] * x.shape[0]
    _apply_logit_bias(x, rows, x.shape[1])
    return _random_probs(x, [req.sampling] * x.shape[0])


def draw_from(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` (unnormalised weights are fine), as `sample` draws."""
    return _draw(probs, generators)


def _unprocessed(r: Request) -> bool:
    """No logits processor applies to this row now, and it asks for no logprobs."""
    p = r.sampling
    return not p.logit_bias and not p.needs_penalties and p.logprobs is None and r.num_output_tokens >= p.min_tokens


def _is_plain_greedy(r: Request) -> bool:
    return r.sampling.is_greedy and _unprocessed(r)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _flat_indices(
    per_row: list[tuple[int, Sequence[int]]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) index tensors for a ragged list of token ids per row; ids outside the vocab
    are dropped (a model's vocab can differ from the tokenizer's; never crash the batch)."""
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in per_row:
        rows.extend([row] * len(ids))
        cols.extend(ids)
    r = torch.tensor(rows, dtype=torch.long, device=device)
    c = torch.tensor(cols, dtype=torch.long, device=device)
    keep = (c >= 0) & (c < vocab)
    return r[keep], c[keep]


def _apply_logit_bias(x: torch.Tensor, requests: Sequence[Request], vocab: int) -> None:
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, r in enumerate(requests):
        for tok, bias in r.sampling.logit_bias:
            rows.append(i)
            cols.append(tok)
            vals.append(bias)
    if not rows:
        return
    device = x.device
    r_t = torch.tensor(rows, dtype=torch.long, device=device)
    c_t = torch.tensor(cols, dtype=torch.long, device=device)
    v_t = torch.tensor(vals, dtype=torch.float32, device=device)
    keep = (c_t >= 0) & (c_t < vocab)
    x.index_put_((r_t[keep], c_t[keep]), v_t[keep], accumulate=True)


def _apply_min_tokens(x: torch.Tensor, requests: Sequence[Request], vocab: int) -> None:
    """Until min_tokens are out, a sequence must not be able to end: ban EOS and stop ids."""
    banned: list[tuple[int, Sequence[int]]] = []
    for i, r in enumerate(requests):
        p = r.sampling
        if r.num_output_tokens < p.min_tokens:
            ids = list(p.stop_token_ids)
            if not p.ignore_eos:
                ids.extend(r.eos_token_ids)
            if ids:
                banned.append((i, ids))
    if banned:
        rows, cols = _flat_indices(banned, vocab, x.device)
        x[rows, cols] = float("-inf")


def _apply_repetition_penalty(x: torch.Tensor, requests: Sequence[Request], vocab: int) -> None:
    """HF semantics over every token seen (prompt and output): shrink toward "less likely"."""
    per_row = [
        (i, r.token_ids) for i, r in enumerate(requests) if r.sampling.repetition_penalty != 1.0
    ]
    if not per_row:
        return
    device = x.device
    rows, cols = _flat_indices(per_row, vocab, device)
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[rows, cols] = True
    penalty = torch.ones(x.shape[0], 1, dtype=x.dtype, device=device)
    row_idx = _index([i for i, _ in per_row], device)
    penalty[row_idx, 0] = torch.tensor(
        [requests[i].sampling.repetition_penalty for i, _ in per_row], dtype=x.dtype, device=device
    )
    penalized = torch.where(x > 0, x / penalty, x * penalty)
    x.copy_(torch.where(seen, penalized, x))


def _apply_presence_frequency(x: torch.Tensor, requests: Sequence[Request], vocab: int) -> None:
    """OpenAI semantics over output tokens: logit -= presence*(count>0) + frequency*count."""
    active = [
        i
        for i, r in enumerate(requests)
        if r.sampling.presence_penalty != 0.0 or r.sampling.frequency_penalty != 0.0
    ]
    if not active:
        return
    device = x.device
    rows, cols = _flat_indices([(i, requests[i].output_token_ids) for i in active], vocab, device)
    counts = torch.zeros_like(x)
    counts.index_put_((rows, cols), torch.ones_like(rows, dtype=x.dtype), accumulate=True)
    presence = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=device)
    frequency = torch.zeros_like(presence)
    row_idx = _index(active, device)
    presence[row_idx, 0] = torch.tensor(
        [requests[i].sampling.presence_penalty for i in active], dtype=x.dtype, device=device
    )
    frequency[row_idx, 0] = torch.tensor(
        [requests[i].sampling.frequency_penalty for i in active], dtype=x.dtype, device=device
    )
    x -= presence * (counts > 0).to(x.dtype) + frequency * counts


def _random_probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p applied to rows that sample; returns probabilities."""
    device = x.device
    rows, vocab = x.shape
    raw = x
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=device)
    x = x / temps.unsqueeze(1)

    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if all(p >= 1.0 for p in top_ps) and any(k < vocab for k in top_ks):
        # top_k alone: a partial topk is far cheaper than a full sort of the vocab. Tokens
        # tied with the k-th value are kept (the draw among exact ties is immaterial).
        k_max = max(k for k in top_ks if k < vocab)
        kth_pos = torch.tensor([min(k, k_max) - 1 for k in top_ks], device=device).unsqueeze(1)
        kth = x.topk(k_max, dim=-1).values.gather(1, kth_pos)
        off = torch.tensor([k >= vocab for k in top_ks], device=device).unsqueeze(1)
        x = x.masked_fill((x < kth) & ~off, float("-inf"))
    elif any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
        # One descending sort serves both filters; masked values are scattered back.
        sorted_x, order = x.sort(dim=-1, descending=True)
        positions = torch.arange(vocab, device=device).unsqueeze(0)
        k_t = torch.tensor(top_ks, dtype=torch.long, device=device).unsqueeze(1)
        remove = positions >= k_t
        sorted_x = sorted_x.masked_fill(remove, float("-inf"))
        if any(p < 1.0 for p in top_ps):
            sorted_probs = torch.softmax(sorted_x, dim=-1)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            p_t = torch.tensor(top_ps, dtype=x.dtype, device=device).unsqueeze(1)
            # Keep the smallest prefix whose mass reaches top_p; position 0 has mass_before 0.
            remove = (mass_before >= p_t) & (positions > 0) & (p_t < 1.0)
            sorted_x = sorted_x.masked_fill(remove, float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, sorted_x)

    min_ps = [p.min_p for p in params]
    if any(m > 0.0 for m in min_ps):
        # prob_i < min_p * max_prob  <=>  logit_i - max_logit < log(min_p); normalisation cancels.
        m_t = torch.tensor(min_ps, dtype=x.dtype, device=device).unsqueeze(1)
        max_x = x.max(dim=-1, keepdim=True).values
        x = x.masked_fill(x - max_x < torch.log(m_t), float("-inf"))

    probs = torch.softmax(x, dim=-1)
    # A temperature or penalty so extreme that the row over/underflows (inf, NaN, all zero) must not
    # fail the whole batch: such a row degenerates to its most likely token, which is its limit anyway.
    totals = probs.sum(dim=-1)  # a NaN anywhere in a row makes its sum NaN
    bad = ~torch.isfinite(totals) | (totals <= 0)
    if bool(bad.any()):
        fallback = torch.zeros_like(probs).scatter_(1, raw.nan_to_num(nan=float("-inf")).argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(bad.unsqueeze(1), fallback, probs)
    return probs


Generators = Sequence[torch.Generator | None]


def _temperature_only(p: SamplingParams, vocab: int) -> bool:
    return not (0 < p.top_k < vocab) and p.top_p >= 1.0 and p.min_p <= 0.0


def _draw_plain(x: torch.Tensor, params: Sequence[SamplingParams], generators: Generators) -> torch.Tensor:
    return sampling.sample_temperature(x, [p.temperature for p in params], _uniforms(x, generators))


def _draw_filtered(x: torch.Tensor, params: Sequence[SamplingParams], generators: Generators) -> torch.Tensor:
    return _draw(_random_probs(x, params), generators)


def _uniforms(x: torch.Tensor, generators: Generators) -> torch.Tensor:
    """One uniform number per row, [rows, 1]: from the row's own generator where it has one."""
    u = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if all(g is None for g in generators):
        u.uniform_()
    else:
        for j, g in enumerate(generators):
            u[j] = torch.rand(1, dtype=torch.float32, device=x.device, generator=g)
    return u


def _draw(probs: torch.Tensor, generators: Generators) -> torch.Tensor:
    """One draw per row by inverting its CDF with one uniform number; seeded rows use their own generator.

    One random number per row instead of one per vocabulary entry (torch.multinomial's exponential race
    draws ~50k of them per row, which on a CPU cost more than the rest of a decode step at 64 rows).
    """
    cdf = probs.cumsum(dim=-1)
    totals = cdf[:, -1:].contiguous()
    u = _uniforms(cdf, generators)
    # The first token whose cumulative mass exceeds u * total: a token of probability 0 adds no width, so
    # it is never chosen. Should rounding put u * total at the total itself, the last token with mass wins.
    picked = torch.searchsorted(cdf, u * totals, right=True)
    last = torch.searchsorted(cdf, totals)
    return torch.minimum(picked, last).squeeze(1)
