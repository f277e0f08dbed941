"""Torch reference of LServe attention: one implementation of each operation, the semantics every
Triton kernel is checked against, and the path that runs wherever the kernels do not (CPU).

Each function reads only what its operation needs: a streaming head's prefill attends to the
slice of keys its sink and local band can reach, a decode step gathers only the selected pages.
Accumulation is float32 (float64 stays float64). GQA never materialises repeated KV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .streaming import streaming_decode_slots


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys; a row with none gets zeros. NaN in an allowed key stays NaN (so
    reading poisoned memory shows), NaN in a masked one is dropped."""
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.where(mask.any(-1, keepdim=True), probs, 0.0)


# -- prefill ------------------------------------------------------------------------------------

def sdpa(q, k, v, mask=None, scale=None, dropout: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with GQA (q ``[B, Hkv*G, S, D]``, k, v ``[B, Hkv, N, D]``).
    Without a mask SDPA groups the query heads itself; with one its fused kernels do not take
    grouped heads (it would fall back to the math kernel), so the KV heads are repeated first, as
    Transformers does."""
    G = q.shape[1] // k.shape[1]
    if mask is not None and G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                          is_causal=is_causal, enable_gqa=G > 1)


def prefill_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, streams: bool, sink: int, local: int,
                 kv_start: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """Bool ``[B or 1, 1, len(q_pos), len(k_pos)]``: may a query at position ``q_pos[i]`` see the
    key at position ``k_pos[j]``.

    Causal; keys before ``kv_start[b]`` (left padding) are never seen; a streaming head sees only
    the first ``sink`` real keys and the ``local`` most recent ones (the query's own position
    included); ``sliding_window`` (Mistral) bounds every head."""
    qp, kp = q_pos.view(-1, 1), k_pos.view(1, -1)
    start = (kv_start.view(-1, 1, 1, 1) if kv_start is not None
             else torch.zeros(1, 1, 1, 1, dtype=torch.long, device=q_pos.device))
    ok = (kp <= qp) & (kp >= start)                                   # [B|1, 1, q, k]
    if sliding_window is not None:
        ok = ok & (qp - kp < sliding_window)
    if streams:
        ok = ok & (((kp - start) < sink) | ((qp - kp) < local))
    return ok


def _reachable_keys(q_lo: int, q_hi: int, n_keys: int, streams: bool, sink: int, local: int,
                    start_max: int, sliding_window: int | None):
    """Key positions some query in [q_lo, q_hi] may see: a slice (lo, hi) for a dense head, the
    sink slice plus the local band for a streaming head (as a slice when they touch)."""
    hi = min(n_keys, q_hi + 1)
    lo = 0 if sliding_window is None else max(0, q_lo - sliding_window + 1)
    if not streams:
        return slice(lo, hi)
    band_lo = max(lo, q_lo - local + 1)
    sink_hi = min(hi, start_max + sink)
    if sink_hi >= band_lo:
        return slice(lo, hi)
    return torch.cat([torch.arange(lo, max(lo, sink_hi)), torch.arange(band_lo, hi)])


def prefill_attention(q, k, v, streaming, sink, local, q_offset=0, kv_start=None, scale=None,
                      sliding_window=None, query_block=1024) -> torch.Tensor:
    """Block-sparse prefill attention.

    q ``[B, Hq, Sq, D]``; k, v ``[B, Hkv, Skv, D]``; ``streaming`` bool ``[Hkv]``; query i sits at
    position ``q_offset + i``. Returns ``[B, Hq, Sq, D]`` in q's dtype; a query that sees no key
    (padding) gets zeros. Dense heads with no padding, offset or window are one causal SDPA call;
    otherwise queries go in blocks of ``query_block``, each against the keys it can reach."""
    B, Hq, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty(B, Hkv, G, S, D, dtype=q.dtype, device=q.device)
    qg = q.view(B, Hkv, G, S, D)
    kinds = streaming.detach().to("cpu", torch.bool)
    start_max = int(kv_start.max()) if kv_start is not None and kv_start.numel() else 0
    if kv_start is not None:
        kv_start = kv_start.to(q.device)
    for streams in (False, True):
        heads = (kinds == streams).nonzero().flatten().to(q.device)
        if not heads.numel():
            continue
        qh = qg.index_select(1, heads).flatten(1, 2)
        kh, vh = k.index_select(1, heads), v.index_select(1, heads)
        if not streams and kv_start is None and sliding_window is None and q_offset == 0 and S == N:
            o = sdpa(qh, kh, vh, scale=scale, is_causal=True)
            out[:, heads] = o.view(B, heads.numel(), G, S, D)
            continue
        for s0 in range(0, S, query_block):
            s1 = min(S, s0 + query_block)
            keys = _reachable_keys(q_offset + s0, q_offset + s1 - 1, N, streams, sink, local, start_max,
                                   sliding_window)
            if isinstance(keys, slice):
                k_pos = torch.arange(keys.start, keys.stop, device=q.device)
                kb, vb = kh[:, :, keys], vh[:, :, keys]
            else:
                k_pos = keys.to(q.device)
                kb, vb = kh.index_select(2, k_pos), vh.index_select(2, k_pos)
            q_pos = torch.arange(q_offset + s0, q_offset + s1, device=q.device)
            mask = prefill_mask(q_pos, k_pos, streams, sink, local, kv_start, sliding_window)
            seen = mask.any(-1, keepdim=True)
            o = sdpa(qh[:, :, s0:s1], kb, vb, mask | ~seen, scale)
            o = torch.where(seen, o, 0.0)
            out[:, heads, :, s0:s1] = o.view(B, heads.numel(), G, s1 - s0, D)
    return out.view(B, Hq, S, D)


# -- page summaries and selection ---------------------------------------------------------------

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


def update_page_summaries(kmax: torch.Tensor, kmin: torch.Tensor, new_keys: torch.Tensor,
                          positions: torch.Tensor, logical_page_size: int) -> None:
    """Fold new keys into the page summaries, in place.

    kmax, kmin ``[B, H, NL, D]``; new_keys ``[B, H, S, D]`` (or ``[B, H, D]``), the tokens at
    indices ``positions`` ``[B, S]`` (or ``[B]``); each joins logical page ``position //
    logical_page_size`` by max / min. An empty page holds -inf / +inf, so no branch is needed. A
    position outside the pages changes nothing."""
    if new_keys.dim() == 3:
        new_keys, positions = new_keys.unsqueeze(2), positions.view(-1, 1)
    B, H, NL, D = kmax.shape
    S = new_keys.shape[2]
    page = positions.to(kmax.device).long() // logical_page_size                  # [B, S]
    ok = ((positions.to(kmax.device) >= 0) & (page < NL)).view(B, 1, S, 1)
    idx = page.clamp(0, max(NL - 1, 0)).view(B, 1, S, 1).expand(B, H, S, D)
    new = new_keys.to(kmax.dtype)
    inf = torch.tensor(float("inf"), dtype=kmax.dtype, device=kmax.device)
    kmax.scatter_reduce_(2, idx, torch.where(ok, new, -inf), reduce="amax")
    kmin.scatter_reduce_(2, idx, torch.where(ok, new, inf), reduce="amin")


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


# -- decode -------------------------------------------------------------------------------------

def paged_decode(q, pool_k, pool_v, pages, lengths, page_size, scale, window=None,
                 token_pages=None) -> torch.Tensor:
    """Attention of one query per head over selected pages only.

    q ``[B, Hkv, G, D]``; pools ``[B, Hkv, T, D]``; pages int ``[B, Hkv, G, K]`` (-1 or an index
    past the row's pages means an empty slot). Reads only the gathered pages. Returns
    ``[B, Hkv, G, D]`` in q's dtype. ``window`` (Mistral's sliding window) hides tokens older than
    the newest ``window``. ``token_pages``: the page of the sequence each entry of ``pages`` holds,
    when ``pages`` index a page cache (offload) rather than the pool."""
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
    at = idx if token_pages is None else token_pages
    tok = at.unsqueeze(-1) * page_size + torch.arange(page_size, device=q.device)
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

    q ``[B, Hkv, G, D]``; sink buffers ``[B, Hkv, <= sink, D]``; ring buffers ``[B, Hkv, <= local,
    D]`` (fewer slots while no row can fill them); lengths ``[B]`` counts the current token.
    Returns ``[B, Hkv, G, D]``."""
    acc = _acc_dtype(q)
    B = q.shape[0]
    keys = torch.cat([sink_k, ring_k], dim=2).to(acc)
    vals = torch.cat([sink_v, ring_v], dim=2).to(acc)
    valid = streaming_decode_slots(lengths, sink, local, window,
                                   (sink_k.shape[2], ring_k.shape[2])).view(B, 1, 1, -1)
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
