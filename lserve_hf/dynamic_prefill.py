"""Dynamic block-sparse prefill: which key blocks each query block of a retrieval head reads.

In a long prompt most key blocks carry almost no attention mass for most heads (MInference,
FlexPrefill, XAttention exploit this). Before attention, a cheap estimate scores every (query
block, key block) pair of each retrieval KV head; the blocks holding ``dynamic_mass`` of the
estimated mass are kept, and the prefill kernel (and the torch reference) attend only to them.

The estimate: the mean of a query block's queries against the mean of a key block's keys, times
the softmax scale, plus the log of the block's real key count (a block's mass is about its count
times ``exp(mean q . mean k)``), softmax over the causal key blocks; per KV head the mean over its
GQA query heads. ``benchmarks/dynamic_prefill_study.md`` compares it with XAttention's
antidiagonal scoring and the max over query heads on the embedded model's real attention.

Kept always: the first key block a query block can see (attention sinks) and the diagonal band
(the key blocks of the query block's own positions, and the one before). The count is then
clamped to ``[dynamic_min_density, dynamic_max_density]`` of the causal key blocks. The query
blocks holding a prompt's last ``dynamic_dense_tail`` queries keep every causal key block: the
question of a prompt usually sits there, and its first answer token is read from the last one, so
an estimate that misses the block it needs costs the answer itself; at long prompts those are one
or two block rows of hundreds. So do the query blocks whose queries each see at most the token
budget's keys, as decode attends densely within the budget: a prompt within the budget is
prefilled exactly as without the estimate. Blocks hold
``dynamic_block`` tokens: query block i is rows ``i*block ..`` of the (chunk's) queries, key block
j is key positions ``j*block ..``. All of it is tensor work on the inputs' device (no host sync).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Below this many key blocks the sink and diagonal band are most of them: the estimate cannot pay.
MIN_KEY_BLOCKS = 4


class KeyBlocks(NamedTuple):
    """Key-block lists of a prefill call, the ``blocks`` argument of ``reference.prefill_attention``
    and ``kernels.block_sparse_prefill``.

    index: int32 ``[B, Hkv, n_query_blocks, L]``, per (row, KV head of k, query block) the key
        blocks to attend, ascending and distinct; entries past ``count`` are -1.
    count: int32 ``[B, Hkv, n_query_blocks]``, listed blocks (0: the block's queries see nothing).
    block: tokens per query block and per key block.
    Entries of streaming heads are not read: those keep their sink + local band."""

    index: torch.Tensor
    count: torch.Tensor
    block: int


def block_ranges(S: int, N: int, q_offset: int, kv_start, block: int, window=None, device=None):
    """Per row and query block, (lo, hi, diag_lo) ``[B or 1, n_query_blocks]`` int64: the first
    and last key block some of its queries may see (causal, after ``kv_start``, within
    ``window``), and the first block of its diagonal band. ``hi < lo`` when no query sees a key."""
    rows = torch.arange(0, S, block, device=device)
    p0 = q_offset + rows                                                # first query position
    p1 = q_offset + torch.clamp(rows + block, max=S) - 1                # last one
    start = (kv_start.to(device).long().view(-1, 1) if kv_start is not None
             else torch.zeros(1, 1, dtype=torch.long, device=device))
    key_lo = torch.maximum(start, (p0 - window + 1).clamp_min(0).view(1, -1)) if window is not None \
        else start.expand(-1, rows.numel())
    key_hi = torch.clamp(p1, max=N - 1).view(1, -1)
    lo, hi = key_lo // block, key_hi // block
    hi = torch.where(key_lo > key_hi, lo - 1, hi)
    diag_lo = torch.maximum(lo, (p0 // block - 1).view(1, -1))
    return lo, hi, diag_lo


def _block_means(x, first_pos, kv_start, block):
    """Mean over each block of ``block`` rows of x ``[B, H, L, D]`` (float32), counting only the
    rows at positions ``first_pos + row >= kv_start`` and ``row < L``; also the counts
    ``[B, 1, n_blocks]``."""
    B, H, L, D = x.shape
    n = -(-L // block)
    x = F.pad(x, (0, 0, 0, n * block - L)) if n * block != L else x
    pos = first_pos + torch.arange(n * block, device=x.device)
    valid = (torch.arange(n * block, device=x.device) < L).view(1, -1)
    if kv_start is not None:
        valid = valid & (pos.view(1, -1) >= kv_start.to(x.device).view(-1, 1))
        x = torch.where(valid.view(-1, 1, n * block, 1), x, 0)
    sums = x.view(B, H, n, block, D).sum(3, dtype=torch.float32)
    counts = valid.view(-1, 1, n, block).sum(-1)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts


def head_mass(q, k, q_offset=0, kv_start=None, scale=None, block=128, window=None):
    """Estimated attention mass of every key block per query block and query head, float32
    ``[B, Hkv, G, n_query_blocks, n_key_blocks]`` (each row sums to 1 over its causal key blocks,
    0 elsewhere; a query block that sees no key is all 0). q ``[B, Hkv * G, S, D]``, k
    ``[B, Hkv, N, D]``; query i at position ``q_offset + i``."""
    B, Hq, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q_mean, _ = _block_means(q, q_offset, kv_start, block)                  # [B, Hq, nQ, D]
    k_mean, k_count = _block_means(k, 0, kv_start, block)                  # [B, Hkv, nK, D]
    nQ, nK = q_mean.shape[2], k_mean.shape[2]
    scores = torch.matmul(q_mean.view(B, Hkv, G * nQ, D), k_mean.transpose(-1, -2)) * scale
    scores = scores.view(B, Hkv, G, nQ, nK) + k_count.clamp_min(1).log().view(-1, 1, 1, 1, nK)
    lo, hi, _ = block_ranges(S, N, q_offset, kv_start, block, window, q.device)
    j = torch.arange(nK, device=q.device).view(1, 1, nK)
    causal = ((j >= lo.unsqueeze(-1)) & (j <= hi.unsqueeze(-1))).view(-1, 1, 1, nQ, nK)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.where(causal.any(-1, keepdim=True), probs, 0.0)


def estimate_mass(q, k, q_offset=0, kv_start=None, scale=None, block=128, window=None):
    """:func:`head_mass` for each KV head ``[B, Hkv, nQ, nK]``: its list serves its G query heads,
    so a block gets their mean share (in the study the max ranked blocks no better: it only kept
    more of them at the same ``dynamic_mass``)."""
    return head_mass(q, k, q_offset, kv_start, scale, block, window).mean(2)


def select_blocks(mass, lo, hi, diag_lo, target, min_density=0.0, max_density=1.0, block=128,
                  dense=None) -> KeyBlocks:
    """Key-block lists from estimated masses ``[B, H, nQ, nK]`` and the ranges of
    :func:`block_ranges`: per query block the blocks of highest mass until their cumulative mass
    reaches ``target`` (1.0: every causal block), the sink and diagonal blocks always, the count
    clamped to ``[min_density, max_density]`` of the causal blocks (the sink and diagonal blocks
    are kept above the maximum). Query blocks where ``dense`` (bool ``[B or 1, nQ]``) holds keep
    every causal block."""
    B, H, nQ, nK = mass.shape
    j = torch.arange(nK, device=mass.device).view(1, 1, 1, nK)
    lo, hi, diag_lo = (t.view(-1, 1, nQ, 1) for t in (lo, hi, diag_lo))
    causal = (j >= lo) & (j <= hi)
    n_causal = (hi - lo + 1).clamp_min(0).squeeze(-1)                     # [B|1, 1, nQ]
    forced = causal & ((j == lo) | (j >= diag_lo))
    if dense is not None:
        forced = forced | (causal & dense.view(-1, 1, nQ, 1))
    if target >= 1.0 and max_density >= 1.0:
        keep = causal.expand(B, H, nQ, nK)
    else:
        # forced blocks first (priority 2 > any mass), then by decreasing mass, ties to the lower block
        priority = torch.where(forced, 2.0, torch.where(causal, mass, -1.0))
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
        if target >= 1.0:
            n_mass = n_causal
        else:
            n_mass = (torch.cumsum(torch.gather(mass, -1, order), dim=-1) < target).sum(-1) + 1
        eps = 1e-6  # densities like 0.3 * 10 must give 3, not 2 or 4
        k_min = torch.ceil(min_density * n_causal - eps).long()
        k_max = torch.floor(max_density * n_causal + eps).long().clamp_min(1)
        n_keep = torch.maximum(torch.minimum(torch.maximum(n_mass, k_min), k_max),
                               forced.sum(-1)).clamp(max=n_causal)
        ranked = torch.arange(nK, device=mass.device).view(1, 1, 1, nK) < n_keep.unsqueeze(-1)
        keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, ranked.expand_as(order))
    idx = torch.sort(torch.where(keep, j, nK), dim=-1).values
    # a count never exceeds max density or the (<= 4) forced blocks, bar the dense rows
    width = nK if max_density >= 1.0 or dense is not None else min(nK, math.floor(max_density * nK + 1e-6) + 4)
    idx = idx[..., :width]
    return KeyBlocks(torch.where(idx < nK, idx, -1).to(torch.int32), keep.sum(-1).to(torch.int32), block)


def key_blocks(q, k, q_offset=0, kv_start=None, scale=None, *, mass=0.95, min_density=0.05,
               max_density=1.0, block=128, window=None, dense_tail=0, prompt_end=None,
               dense_keys=0) -> KeyBlocks:
    """Key-block lists for q ``[B, Hkv * G, S, D]`` against k ``[B, Hkv, N, D]`` (every KV head of
    k); query i at position ``q_offset + i``, keys before ``kv_start[b]`` are left padding. Every
    causal key block is kept for the query blocks holding one of the last ``dense_tail`` positions
    before ``prompt_end`` (None: q's end; a chunk before the last of a prompt may hold some) and
    for those whose queries each see at most ``dense_keys`` keys (decode's token budget)."""
    S = q.shape[2]
    est = estimate_mass(q, k, q_offset, kv_start, scale, block, window)
    lo, hi, diag_lo = block_ranges(S, k.shape[2], q_offset, kv_start, block, window, q.device)
    rows = torch.arange(0, S, block, device=q.device)
    dense = None
    if dense_tail > 0:
        tail_start = (q_offset + S if prompt_end is None else prompt_end) - dense_tail
        dense = (q_offset + rows + block > tail_start).view(1, -1)
    if dense_keys > 0:
        last_pos = q_offset + torch.clamp(rows + block, max=S) - 1
        start = kv_start.to(q.device).long().view(-1, 1) if kv_start is not None else 0
        seen = last_pos.view(1, -1) + 1 - start
        if window is not None:
            seen = seen.clamp(max=window)
        within = seen <= dense_keys
        dense = within if dense is None else dense | within
    return select_blocks(est, lo, hi, diag_lo, mass, min_density, max_density, block, dense)


def prefill_blocks(q, k, cfg, plan, q_offset, kv_start, scale, window=None, q_heads=None, prompt_end=None):
    """The ``blocks`` of a patched model's prefill call (``attention._prefill`` and
    ``_chunk_prefill``), or None: ``cfg.prefill_dynamic`` off, a dense layer (``plan``, the
    layer's ``LayerPlan``), no retrieval head, or keys spanning fewer than ``MIN_KEY_BLOCKS``
    blocks (the sink and diagonal band would be most of them).

    q ``[B, Hq, S, D]`` (``q_heads``: only those query heads of it are attended, G per KV head of
    k); k ``[B, Hkv, N, D]`` holds either every KV head of the layer (then the retrieval heads
    are estimated alone and the others' lists left empty) or its retrieval heads only (the page
    pool). ``prompt_end``: where the prompt ends (None: with q), for its last
    ``cfg.dynamic_dense_tail`` positions, which read every causal block."""
    N = k.shape[2]
    if not cfg.prefill_dynamic or plan.dense or not plan.n_retrieval or N < MIN_KEY_BLOCKS * cfg.dynamic_block:
        return None
    if q_heads is not None:
        q = q.index_select(1, q_heads)
    kw = dict(mass=cfg.dynamic_mass, min_density=cfg.dynamic_min_density,
              max_density=cfg.dynamic_max_density, block=cfg.dynamic_block, window=window,
              dense_tail=cfg.dynamic_dense_tail, prompt_end=prompt_end, dense_keys=cfg.token_budget or 0)
    if k.shape[1] == plan.n_retrieval:
        return key_blocks(q, k, q_offset, kv_start, scale, **kw)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    heads = plan.heads(q.device)[1]
    qr = q.view(B, Hkv, Hq // Hkv, S, D).index_select(1, heads).flatten(1, 2)
    part = key_blocks(qr, k.index_select(1, heads), q_offset, kv_start, scale, **kw)
    index = part.index.new_full((B, Hkv, *part.index.shape[2:]), -1).index_copy_(1, heads, part.index)
    count = part.count.new_zeros((B, Hkv, part.count.shape[2])).index_copy_(1, heads, part.count)
    return KeyBlocks(index, count, part.block)
