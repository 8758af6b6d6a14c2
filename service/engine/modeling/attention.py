"""Attention over the paged KV cache, batched per step.

A step's tokens are laid out flat ([num_tokens, ...]); each sequence owns a contiguous run of rows.
Two kinds of sequences need different attention:
- a fresh prefill (nothing cached before its first token) attends only over its own new tokens:
  plain causal SDPA, which is also exactly what transformers does for a single prompt;
- everything else (decodes, later prefill chunks, prefix-cache hits) attends over its cached context:
  one batched SDPA per group over blocks gathered from the cache, with a padding/causal mask.
Decodes (one query each) form one group, chunk continuations another, so a big chunk never pads
dozens of one-token decodes up to its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PagedGroup:
    """Sequences that attend over cached context, padded to a common query and context length."""

    num_seqs: int
    max_query_len: int
    q_index: torch.Tensor  # [num_seqs * max_query_len] token row per padded query slot (padding -> row 0)
    out_rows: torch.Tensor  # [num_valid] token rows that receive output
    valid_index: torch.Tensor | None  # [num_valid] padded slots holding real queries; None when all are
    block_table: torch.Tensor  # [num_seqs, max_blocks]
    mask: torch.Tensor  # [num_seqs, 1, max_query_len, max_blocks * block_size] bool, True = attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot for each new token's K/V
    fresh_prefills: list[tuple[int, int]] = field(default_factory=list)  # (start_row, end_row)
    groups: list[PagedGroup] = field(default_factory=list)


@dataclass(frozen=True)
class SeqLayout:
    """Where one scheduled sequence's new tokens sit, as the runner builds the step."""

    start_row: int
    num_new_tokens: int
    num_computed_tokens: int  # context already in the cache before this step
    block_ids: list[int]


def build_metadata(seqs: list[SeqLayout], block_size: int, device: torch.device) -> AttentionMetadata:
    slots: list[int] = []
    for s in seqs:
        for pos in range(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens):
            slots.append(s.block_ids[pos // block_size] * block_size + pos % block_size)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
    decodes = [s for s in seqs if s.num_new_tokens == 1 and s.num_computed_tokens > 0]
    chunks = [s for s in seqs if s.num_new_tokens > 1 and s.num_computed_tokens > 0]
    for s in seqs:
        if s.num_computed_tokens == 0:
            meta.fresh_prefills.append((s.start_row, s.start_row + s.num_new_tokens))
    for group in (decodes, chunks):
        if group:
            meta.groups.append(_build_group(group, block_size, device))
    return meta


def _build_group(seqs: list[SeqLayout], block_size: int, device: torch.device) -> PagedGroup:
    num_seqs = len(seqs)
    max_query_len = max(s.num_new_tokens for s in seqs)
    ctx_lens = [s.num_computed_tokens + s.num_new_tokens for s in seqs]
    max_blocks = max((n + block_size - 1) // block_size for n in ctx_lens)
    block_table = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
    q_index = torch.zeros(num_seqs, max_query_len, dtype=torch.long)
    query_lens = torch.tensor([s.num_new_tokens for s in seqs])
    starts = torch.tensor([s.num_computed_tokens for s in seqs])
    for b, s in enumerate(seqs):
        n_blocks = (ctx_lens[b] + block_size - 1) // block_size
        block_table[b, :n_blocks] = torch.tensor(s.block_ids[:n_blocks])
        q_index[b, : s.num_new_tokens] = torch.arange(s.start_row, s.start_row + s.num_new_tokens)
    q_pos = torch.arange(max_query_len)
    is_real_query = q_pos[None, :] < query_lens[:, None]  # [num_seqs, max_query_len]
    key_pos = torch.arange(max_blocks * block_size)
    # Query i of a sequence sits at position start + i and sees keys 0..start+i (causal, within context).
    causal = key_pos[None, None, :] <= (starts[:, None, None] + q_pos[None, :, None])
    # Padded query slots look at key 0 only, so their softmax stays finite; their output is dropped.
    mask = torch.where(is_real_query[:, :, None], causal, key_pos[None, None, :] == 0)
    flat_real = is_real_query.reshape(-1)
    all_real = bool(flat_real.all())
    return PagedGroup(
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        q_index=q_index.reshape(-1).to(device),
        out_rows=q_index.reshape(-1)[flat_real].to(device),
        valid_index=None if all_real else flat_real.nonzero().squeeze(1).to(device),
        block_table=block_table.to(device),
        mask=mask[:, None, :, :].to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], RoPE applied
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], RoPE applied
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    out = torch.empty_like(q)
    for start, end in meta.fresh_prefills:
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None],  # [1, num_heads, len, head_dim]
            k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = o[0].transpose(0, 1)
    for g in meta.groups:
        ctx_len = g.block_table.shape[1] * k_cache.shape[1]
        qg = q[g.q_index].view(g.num_seqs, g.max_query_len, num_heads, head_dim).transpose(1, 2)
        kg = k_cache[g.block_table].view(g.num_seqs, ctx_len, num_kv_heads, head_dim).transpose(1, 2)
        vg = v_cache[g.block_table].view(g.num_seqs, ctx_len, num_kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2).reshape(g.num_seqs * g.max_query_len, num_heads, head_dim)
        out[g.out_rows] = o if g.valid_index is None else o[g.valid_index]
    return out.view(num_tokens, num_heads * head_dim)
