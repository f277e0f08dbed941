"""Torch reference of LServe attention: the semantics every kernel is checked against.

Simple on purpose: dense masked math, float32 accumulation (float64 stays float64). GQA never
materialises repeated KV: query heads are viewed as ``[B, Hkv, G, ...]`` and broadcast against
their KV head.
"""

from __future__ import annotations

import torch

from .streaming import streaming_decode_slots


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys; a row with none gets zeros. NaN in an allowed key stays NaN (so
    reading poisoned memory shows), NaN in a masked one is dropped."""
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.where(mask.any(-1, keepdim=True), probs, 0.0)


def prefill_mask(q_len: int, kv_len: int, streaming: torch.Tensor, sink: int, local: int,
                 q_offset: int = 0, kv_start: torch.Tensor | None = None,
                 sliding_window: int | None = None, device=None) -> torch.Tensor:
    """Bool ``[B or 1, Hkv, q_len, kv_len]``: may query i (at position ``q_offset + i``) see key j.

    Causal everywhere; keys before ``kv_start[b]`` (left padding) are never seen; streaming heads
    see only the first ``sink`` real keys and the ``local`` most recent ones (the query's own
    position included); ``sliding_window`` (Mistral) bounds every head."""
    device = device if device is not None else streaming.device
    qpos = torch.arange(q_len, device=device).view(-1, 1) + q_offset
    kpos = torch.arange(kv_len, device=device).view(1, -1)
    start = (kv_start.to(device).view(-1, 1, 1, 1) if kv_start is not None
             else torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device))
    causal = (kpos <= qpos) & (kpos >= start)                       # [B|1, 1, q, kv]
    if sliding_window is not None:
        causal = causal & (qpos - kpos < sliding_window)
    window = ((kpos - start) < sink) | ((qpos - kpos) < local)       # [B|1, 1, q, kv]
    stream = streaming.to(device).view(1, -1, 1, 1)
    return causal & (~stream | window)


def prefill_attention(q, k, v, streaming, sink, local, q_offset=0, kv_start=None, scale=None,
                      sliding_window=None, query_block=1024) -> torch.Tensor:
    """Block-sparse prefill semantics, computed densely.

    q ``[B, Hq, Sq, D]``; k, v ``[B, Hkv, Skv, D]``; ``streaming`` bool ``[Hkv]``. Returns
    ``[B, Hq, Sq, D]`` in q's dtype; a query that sees no key (padding) gets zeros."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    acc = _acc_dtype(q)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)          # [B, Hkv, 1, Skv, D]
    out = torch.empty(B, Hkv, G, Sq, D, dtype=acc, device=q.device)
    qg = q.view(B, Hkv, G, Sq, D)
    # Query blocks bound the score matrix; this loop is over prefill blocks, never on decode.
    for s0 in range(0, Sq, query_block):
        s1 = min(Sq, s0 + query_block)
        mask = prefill_mask(s1 - s0, Skv, streaming, sink, local, q_offset + s0, kv_start,
                            sliding_window, device=q.device).unsqueeze(2)   # [B|1, Hkv, 1, q, kv]
        scores = torch.matmul(qg[:, :, :, s0:s1].to(acc), kf.transpose(-1, -2)) * scale
        probs = _masked_softmax(scores, mask)
        out[:, :, :, s0:s1] = torch.matmul(probs, vf)
    return out.view(B, Hq, Sq, D).to(q.dtype)


def page_summaries(keys: torch.Tensor, lengths: torch.Tensor, logical_page_size: int):
    """Per-logical-page, per-channel key max and min over the stored tokens.

    keys ``[B, H, T, D]`` (T a multiple of the logical page size), lengths ``[B]``. Tokens at
    ``t >= lengths[b]`` do not count; a logical page with no token has max -inf and min +inf.
    Returns (kmax, kmin), each ``[B, H, T // logical_page_size, D]`` in keys' dtype."""
    B, H, T, D = keys.shape
    valid = (torch.arange(T, device=keys.device).view(1, T) < lengths.view(B, 1)).view(B, 1, T, 1)
    neg = torch.tensor(float("-inf"), dtype=keys.dtype, device=keys.device)
    kmax = torch.where(valid, keys, neg).view(B, H, T // logical_page_size, logical_page_size, D).amax(3)
    kmin = torch.where(valid, keys, -neg).view(B, H, T // logical_page_size, logical_page_size, D).amin(3)
    return kmax, kmin


def page_scores(q: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor, lengths: torch.Tensor,
                page_size: int, logical_page_size: int) -> torch.Tensor:
    """Physical page scores ``[B, Hkv, G, P]`` for queries q ``[B, Hkv, G, D]``.

    Logical page j scores ``sum_c max(q_c Kmax[j, c], q_c Kmin[j, c])`` (an upper bound of q.k
    over the page); a physical page takes the max of its logical pages. Pages holding no token
    score -inf."""
    acc = _acc_dtype(q)
    B, Hkv, NL, D = kmax.shape
    lpp = page_size // logical_page_size
    qf = q.to(acc).unsqueeze(3)                                          # [B, Hkv, G, 1, D]
    hi = qf * kmax.to(acc).unsqueeze(2)
    lo = qf * kmin.to(acc).unsqueeze(2)
    logical = torch.maximum(hi, lo).sum(-1)                              # [B, Hkv, G, NL]
    n_logical = (lengths + logical_page_size - 1) // logical_page_size
    empty = torch.arange(NL, device=q.device).view(1, NL) >= n_logical.view(B, 1)
    logical = logical.masked_fill(empty.view(B, 1, 1, NL), float("-inf"))
    return logical.view(B, Hkv, -1, NL // lpp, lpp).amax(-1)


def select_pages(q, kmax, kmin, lengths, page_size, logical_page_size, n_select) -> torch.Tensor:
    """Page selection per query head: int64 ``[B, Hkv, G, n_select]``.

    The last (newest, maybe partial) page is always chosen; the other ``n_select - 1`` are the
    top-scoring pages among the rest. Ties go to the lower page index. A row with fewer pages than
    ``n_select`` gets all its pages (dense attention), padded with indices past its last page,
    which hold no valid token."""
    scores = page_scores(q, kmax, kmin, lengths, page_size, logical_page_size)
    P = scores.shape[-1]
    n_pages = (lengths + page_size - 1) // page_size
    last = (torch.arange(P, device=q.device).view(1, P) == (n_pages - 1).view(-1, 1))
    scores = scores.masked_fill(last.view(-1, 1, 1, P), float("inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if order.shape[-1] < n_select:  # fewer pages in the pool than selection slots
        pad = torch.arange(order.shape[-1], n_select, device=q.device).expand(*order.shape[:-1], -1)
        order = torch.cat([order, pad], dim=-1)
    return order[..., :n_select]


def paged_decode(q, pool_k, pool_v, pages, lengths, page_size, scale, window=None) -> torch.Tensor:
    """Attention of one query per head over selected pages only.

    q ``[B, Hkv, G, D]``; pools ``[B, Hkv, T, D]``; pages int ``[B, Hkv, G, K]`` (-1 or an index
    past the row's pages means an empty slot). Reads only the gathered pages. Returns
    ``[B, Hkv, G, D]`` in q's dtype. ``window`` (Mistral's sliding window) hides tokens older than
    the newest ``window``."""
    acc = _acc_dtype(q)
    B, Hkv, T, D = pool_k.shape
    P = T // page_size
    slot_ok = (pages >= 0) & (pages < P)
    idx = pages.clamp(0, P - 1)
    flat = idx.flatten(2)                                                 # [B, Hkv, G*K]
    kp = pool_k.view(B, Hkv, P, page_size, D)
    vp = pool_v.view(B, Hkv, P, page_size, D)
    gidx = flat.view(B, Hkv, -1, 1, 1).expand(-1, -1, -1, page_size, D)
    ksel = torch.gather(kp, 2, gidx).view(*pages.shape, page_size, D)     # [B, Hkv, G, K, page, D]
    vsel = torch.gather(vp, 2, gidx).view(*pages.shape, page_size, D)
    tok = idx.unsqueeze(-1) * page_size + torch.arange(page_size, device=q.device)
    valid = slot_ok.unsqueeze(-1) & (tok < lengths.view(B, 1, 1, 1, 1))   # [B, Hkv, G, K, page]
    if window is not None:
        valid = valid & (tok >= lengths.view(B, 1, 1, 1, 1) - window)
    scores = torch.einsum("bhgd,bhgkpd->bhgkp", q.to(acc), ksel.to(acc)) * scale
    probs = _masked_softmax(scores.flatten(3), valid.flatten(3))
    # Unselected slots may hold anything (even NaN); zero their values so 0 * NaN cannot leak.
    vsel = torch.where(valid.unsqueeze(-1), vsel.to(acc), 0.0).flatten(3, 4)
    return torch.einsum("bhgn,bhgnd->bhgd", probs, vsel).to(q.dtype)


def streaming_decode(q, sink_k, sink_v, ring_k, ring_v, lengths, sink, local, scale, window=None) -> torch.Tensor:
    """Attention of one query per streaming head over its sink buffer and ring buffer.

    q ``[B, Hkv, G, D]``; sink buffers ``[B, Hkv, sink, D]``; ring buffers ``[B, Hkv, local, D]``;
    lengths ``[B]`` counts the current token. Returns ``[B, Hkv, G, D]``."""
    acc = _acc_dtype(q)
    B = q.shape[0]
    keys = torch.cat([sink_k, ring_k], dim=2).to(acc)
    vals = torch.cat([sink_v, ring_v], dim=2).to(acc)
    valid = streaming_decode_slots(lengths, sink, local, window).view(B, 1, 1, -1)
    scores = torch.einsum("bhgd,bhnd->bhgn", q.to(acc), keys) * scale
    probs = _masked_softmax(scores, valid.expand_as(scores))
    vals = torch.where(valid.view(B, 1, -1, 1), vals, 0.0)
    return torch.einsum("bhgn,bhnd->bhgd", probs, vals).to(q.dtype)


def positional_attention(q, k, v, q_pos, k_pos, sink=None, local=None, scale=None, window=None) -> torch.Tensor:
    """Masked attention with explicit token positions, for chunks appended to a cache.

    q ``[B, Hkv, G, S, D]``; k, v ``[B, Hkv, N, D]``; q_pos ``[B, S]``; k_pos ``[B, N]`` (negative:
    no key). Causal on positions; with ``sink``/``local`` given, a key is seen only if among the
    first ``sink`` tokens or within ``local`` of the query. Returns ``[B, Hkv, G, S, D]``."""
    acc = _acc_dtype(q)
    B, Hkv, G, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    qp, kp = q_pos.view(B, 1, 1, S, 1), k_pos.view(B, 1, 1, 1, -1)
    mask = (kp >= 0) & (kp <= qp)
    if sink is not None:
        mask = mask & ((kp < sink) | (qp - kp < local))
    if window is not None:
        mask = mask & (qp - kp < window)
    scores = torch.matmul(q.to(acc), k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale
    probs = _masked_softmax(scores, mask.expand_as(scores))
    vals = torch.where((k_pos >= 0).view(B, 1, -1, 1), v.to(acc), 0.0).unsqueeze(2)
    return torch.matmul(probs, vals).to(q.dtype)


def update_page_summaries(kmax: torch.Tensor, kmin: torch.Tensor, new_keys: torch.Tensor,
                          positions: torch.Tensor, logical_page_size: int) -> None:
    """Fold one new key per row into the page summaries, in place.

    kmax, kmin ``[B, H, NL, D]``; new_keys ``[B, H, D]``, the token at index ``positions[b]`` of
    row b; it joins logical page ``positions[b] // logical_page_size`` by max / min (an empty page
    holds -inf / +inf, so no branch is needed). A position outside the pages changes nothing."""
    B, H, NL, D = kmax.shape
    page = positions.to(kmax.device).long() // logical_page_size                # [B]
    ok = (positions.to(kmax.device) >= 0) & (page < NL)
    rows = torch.arange(B, device=kmax.device)[ok]
    page = page[ok]
    new = new_keys[ok].to(kmax.dtype)                                             # [b, H, D]
    kmax[rows, :, page] = torch.maximum(kmax[rows, :, page], new)
    kmin[rows, :, page] = torch.minimum(kmin[rows, :, page], new)
