"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token scored by the model given the tokens before it.

The runner keeps, for a request that asks for them, the final hidden states of the prompt positions each
step computes (every prefill chunk), applies the LM head to them and hands the rows here:

    rows = score_prompt(logits, next_token_ids, k)     # logits at positions p -> token p + 1's entry

A position whose KV the prefix cache supplied has no hidden state, so such a request skips the prefix cache
until its prompt is scored (BlockManager; vLLM does the same). Only ids and floats here: the engine's
output step (output.py) turns them into token strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows the runner scores at once: bounds the float32 [rows, vocab_size] logits of a long prefill chunk
# (~50 MB at a 49k vocabulary).
SCORE_ROWS = 256


@dataclass(frozen=True)
class PromptLogprobRow:
    """One prompt token's score: its logprob, its rank in the vocabulary (the number of tokens at least as
    likely, itself included, as vLLM counts), and the top k (token id, logprob) at its position, best first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


def score_prompt(logits: torch.Tensor, next_token_ids: Sequence[int], k: int) -> list[PromptLogprobRow]:
    """`logits` [num_rows, vocab_size] (any float dtype; scored in float32), row i the model's logits after
    some prompt position; `next_token_ids[i]` the prompt token that followed it."""
    assert logits.shape[0] == len(next_token_ids)
    lp = torch.log_softmax(logits.float(), dim=-1)  # [num_rows, vocab_size]
    ids = torch.tensor(list(next_token_ids), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids.unsqueeze(1))  # [num_rows, 1]
    ranks = (lp >= chosen).sum(dim=1)  # itself and every token as likely or more: vLLM's rank
    if k > 0:
        top_lp, top_ids = torch.topk(lp, k, dim=-1)  # sorted, best first
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_lp.tolist(), strict=True)]
    else:
        tops = [()] * len(next_token_ids)
    return [
        PromptLogprobRow(token_id, float(logprob), int(rank), top)
        for token_id, logprob, rank, top in zip(ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), tops, strict=True)
    ]
