"""Verifying speculative draft tokens with the logits of one forward.

A request that drafted k tokens (prompt_lookup.py) gets k + 1 rows of logits in its step: row j is the
model's distribution for the position of draft j (row 0 follows its last real token), row k the one
after the last draft. The tokens it keeps are the drafts up to the first one the model rejects, then
one token from the model at that position, so every step yields at least one token, as without drafts.

- Greedy: draft j is accepted when it is the argmax of row j; the token after is row a's argmax. The
  output is exactly plain greedy decoding's, only fewer steps.
- Sampling: the proposal is deterministic (a point mass q on draft d), so speculative sampling's rule
  (accept with probability min(1, p(d) / q(d)), else draw from the normalised max(p - q, 0)) becomes:
  accept d with probability p(d), else draw from p with d removed. Each kept token is then distributed
  exactly as a plain draw from p would be (Leviathan et al., 2023; Chen et al., 2023).

Which requests may draft at all (no history-dependent logits processors) is Request.max_drafts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmserve.engine.request import Request
from lmserve.engine.sampler import SampledToken, draw_from, processed_probs, sample

Generator = torch.Generator | None


def verify(
    logits: torch.Tensor, items: Sequence[tuple[Request, list[int]]], generators: Sequence[Generator]
) -> list[list[SampledToken]]:
    """The tokens each request keeps; `logits` holds 1 + len(drafts) consecutive rows per item, in order.

    Requests without drafts and greedy ones are sampled in one batched call (a greedy request's rows all
    belong to it, so it is repeated once per row); sampled requests with drafts go through rejection."""
    starts: list[int] = []
    row = 0
    batched_rows: list[int] = []
    batched_reqs: list[Request] = []
    batched_gens: list[Generator] = []
    for (req, drafts), generator in zip(items, generators, strict=True):
        starts.append(row)
        num_rows = 1 + len(drafts)
        if not drafts or req.sampling.is_greedy:
            batched_rows.extend(range(row, row + num_rows))
            batched_reqs.extend([req] * num_rows)
            batched_gens.extend([generator] * num_rows)  # a greedy row never reads its generator
        row += num_rows
    assert row == logits.shape[0], f"{logits.shape[0]} logits rows for {row} verified positions"
    if len(batched_rows) == row:
        batched = sample(logits, batched_reqs, batched_gens)
    else:
        index = torch.tensor(batched_rows, dtype=torch.long, device=logits.device)
        batched = sample(logits[index], batched_reqs, batched_gens) if batched_rows else []
    position = {logits_row: i for i, logits_row in enumerate(batched_rows)}

    out: list[list[SampledToken]] = []
    for (req, drafts), generator, start in zip(items, generators, starts, strict=True):
        if start in position:
            first = position[start]
            targets = batched[first : first + 1 + len(drafts)]
            num_accepted = 0
            while num_accepted < len(drafts) and targets[num_accepted].token_id == drafts[num_accepted]:
                num_accepted += 1
            out.append(list(targets[: num_accepted + 1]))
        else:
            rows = logits[start : start + 1 + len(drafts)]
            out.append([SampledToken(t, None) for t in reject_sample(rows, req, drafts, generator)])
    return out


def reject_sample(logits: torch.Tensor, req: Request, drafts: list[int], generator: Generator) -> list[int]:
    """Speculative sampling with a point-mass proposal: the drafts kept, then one token drawn by the model
    (see the module doc). `logits`: [len(drafts) + 1, vocab], the request's rows."""
    probs = processed_probs(logits, req)
    out: list[int] = []
    for j, draft in enumerate(drafts):
        p_draft = float(probs[j, draft])
        u = float(torch.rand(1, generator=generator, device=probs.device))
        if u < p_draft:
            out.append(draft)
            continue
        residual = probs[j].clone()
        residual[draft] = 0.0
        if float(residual.sum()) <= 0.0:  # p(draft) rounds to 1: it could only have been accepted
            out.append(draft)
            continue
        out.append(int(draw_from(residual.unsqueeze(0), [generator])[0]))
        return out
    out.append(int(draw_from(probs[len(drafts) :], [generator])[0]))
    return out
