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


def _put(out, heads, lo, hi, o, s0=None, s1=None):
    """``out[:, heads, :, s0:s1] = o``, as a view's copy when the heads sit side by side."""
    rows = slice(s0, s1)
    if hi - lo == heads.numel():
        out[:, lo:hi, :, rows] = o
    else:
        out[:, heads.to(out.device), :, rows] = o


def _block_mask(memo, keys, q_lo, q_hi, n_keys, streams, sink, local, kv_start, sliding_window, G,
                dtype, device):
    """The attention mask of queries at positions ``[q_lo, q_hi)`` against key positions ``keys``
    (a slice or a tensor), the G query heads of a KV head stacked along the queries,
    ``[B|1, 1, G * block, keys]``, and which queries see any key (``True`` when all do: no zeroing
    needed). Kept in ``memo`` (one forward; the same for every layer). A streaming block past the
    sink, with no padding or window, only depends on its length: query i sees the sink and the
    band keys j with i <= j < i + local, so all such blocks share one mask. Streaming masks are
    kept additive in the queries' dtype (SDPA would otherwise convert a bool mask at every call,
    in every layer); a dense head's mask spans the context, so it stays bool (a quarter of the
    memory)."""
    band = (streams and not isinstance(keys, slice) and kv_start is None and sliding_window is None)
    key = (("band", q_hi - q_lo, sink, local, len(keys)) if band
           else (streams, q_lo, q_hi, n_keys, sink, local, sliding_window))
    if memo is not None and key in memo:
        return memo[key]
    k_pos = (torch.arange(keys.start, keys.stop, device=device) if isinstance(keys, slice)
             else keys.to(device))
    q_pos = torch.arange(q_lo, q_hi, device=device)
    mask = prefill_mask(q_pos, k_pos, streams, sink, local, kv_start, sliding_window)
    seen = mask.any(-1, keepdim=True)
    # rows that see nothing attend to everything (finite softmax) and are zeroed after
    allowed = (mask | ~seen).repeat(1, 1, G, 1)
    if streams:   # small (sink, window and block keys) and few (one per shape past the sink): additive
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    all_seen = True if device.type == "cpu" and bool(seen.all()) else seen.repeat(1, 1, G, 1)
    entry = (allowed, all_seen)
    if memo is not None:
        memo[key] = entry
    return entry


def _listed_attention(q, k, v, index, count, block, q_offset, kv_start, scale, sliding_window, query_block):
    """Dense heads over their listed key blocks only: q ``[B, H, G, S, D]``, k, v ``[B, H, N, D]``,
    ``index`` / ``count`` the heads' lists (``dynamic_prefill.KeyBlocks``). Query blocks go a few at
    a time (``query_block`` rows); each gathers its heads' listed blocks (as many as the longest
    list among them) and attends with the exact token mask. Returns ``[B, H, G, S, D]``."""
    B, H, G, S, D = q.shape
    N = k.shape[2]
    dev = q.device
    out = torch.empty_like(q)
    index, count = index.to(dev).long(), count.to(dev).long()
    per = max(1, query_block // block)
    bi, hi = torch.arange(B, device=dev).view(B, 1, 1), torch.arange(H, device=dev).view(1, H, 1)
    start = kv_start.view(B, 1, 1, 1, 1) if kv_start is not None else 0
    for i0 in range(0, index.shape[2], per):
        i1 = min(index.shape[2], i0 + per)
        s0, s1, m = i0 * block, min(S, i1 * block), i1 - i0
        L = int(count[:, :, i0:i1].max()) if count.numel() else 0   # the CPU path: a host sync is fine
        if L == 0:
            out[:, :, :, s0:s1] = 0
            continue
        listed = torch.arange(L, device=dev) < count[:, :, i0:i1, None]                # [B, H, m, L]
        tok = index[:, :, i0:i1, :L].clamp_min(0).unsqueeze(-1) * block + torch.arange(block, device=dev)
        ok = (listed.unsqueeze(-1) & (tok < N)).flatten(3)                              # [B, H, m, L*block]
        tok = tok.clamp(max=N - 1).flatten(2)
        kb, vb = k[bi, hi, tok].view(B * H * m, 1, -1, D), v[bi, hi, tok].view(B * H * m, 1, -1, D)
        kp = tok.view(B, H, m, 1, -1)
        qp = (q_offset + s0 + torch.arange(m * block, device=dev)).view(1, 1, m, block, 1)
        mask = ok.unsqueeze(3) & (kp <= qp) & (kp >= start)                             # [B, H, m, block, keys]
        if sliding_window is not None:
            mask = mask & (qp - kp < sliding_window)
        qb = F.pad(q[:, :, :, s0:s1], (0, 0, 0, m * block - (s1 - s0)))
        qb = qb.view(B, H, G, m, block, D).transpose(2, 3).reshape(B * H * m, G, block, D)
        mask = mask.view(B * H * m, 1, block, -1)
        seen = mask.any(-1, keepdim=True)
        o = torch.where(seen, sdpa(qb, kb, vb, mask | ~seen, scale), 0.0)
        o = o.view(B, H, m, G, block, D).transpose(2, 3).reshape(B, H, G, m * block, D)
        out[:, :, :, s0:s1] = o[:, :, :, :s1 - s0]
    return out


def prefill_attention(q, k, v, streaming, sink, local, q_offset=0, kv_start=None, scale=None,
                      sliding_window=None, query_block=1024, memo: dict | None = None,
                      blocks=None) -> torch.Tensor:
    """Block-sparse prefill attention.

    q ``[B, Hq, Sq, D]``; k, v ``[B, Hkv, Skv, D]``; ``streaming`` bool ``[Hkv]``; query i sits at
    position ``q_offset + i``. Returns ``[B, Hq, Sq, D]`` in q's dtype; a query that sees no key
    (padding) gets zeros. Dense heads with no padding, offset or window are one causal SDPA call;
    otherwise queries go in blocks of ``query_block``, each against the keys it can reach, the G
    query heads of a KV head stacked along the queries (one mask, no repeated keys). ``memo``:
    a dict kept for one forward, in which the block masks (the same for every layer) are made
    once. ``blocks`` (``dynamic_prefill.KeyBlocks``, lists per KV head of k): each dense head's
    query block reads only its listed key blocks, under the same token mask."""
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
        heads = (kinds == streams).nonzero().flatten()
        if not heads.numel():
            continue
        n = heads.numel()
        # heads of one kind that sit side by side (the usual case) are a view, not a gathered copy
        lo, hi = int(heads[0]), int(heads[-1]) + 1
        pick = ((lambda t: t[:, lo:hi]) if hi - lo == n
                else (lambda t, i=heads.to(q.device): t.index_select(1, i)))
        qk, kh, vh = pick(qg), pick(k), pick(v)                             # [B, n, G, S, D], [B, n, N, D]
        if not streams and blocks is not None:
            idx = heads.to(q.device)
            o = _listed_attention(qk, kh, vh, blocks.index.index_select(1, idx),
                                  blocks.count.index_select(1, idx), blocks.block, q_offset, kv_start,
                                  scale, sliding_window, query_block)
            _put(out, heads, lo, hi, o)
            continue
        if not streams and kv_start is None and sliding_window is None and q_offset == 0 and S == N:
            o = sdpa(qk.flatten(1, 2), kh, vh, scale=scale, is_causal=True).view(B, n, G, S, D)
            _put(out, heads, lo, hi, o)
            continue
        for s0 in range(0, S, query_block):
            s1 = min(S, s0 + query_block)
            keys = _reachable_keys(q_offset + s0, q_offset + s1 - 1, N, streams, sink, local, start_max,
                                   sliding_window)
            if isinstance(keys, slice):
                kb, vb = kh[:, :, keys], vh[:, :, keys]
            else:
                kb, vb = kh.index_select(2, keys.to(q.device)), vh.index_select(2, keys.to(q.device))
            mask_g, all_seen = _block_mask(memo, keys, q_offset + s0, q_offset + s1, N, streams, sink, local,
                                           kv_start, sliding_window, G, q.dtype, q.device)
            qb = qk[:, :, :, s0:s1].reshape(B, n, G * (s1 - s0), D)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask_g, scale=scale)
            if all_seen is not True:
                o = torch.where(all_seen, o, 0.0)
            _put(out, heads, lo, hi, o.view(B, n, G, s1 - s0, D), s0, s1)
    return out.view(B, Hq, S, D)


# -- page summaries and selection ---------------------------------------------------------------

def page_summaries(keys: torch.Tensor, lengths: torch.Tensor, logical_page_size: int):
    """Per-logical-page, per-channel key max and min over the stored tokens.

    keys ``[B, H, T, D]`` (T a multiple of the logical page size), lengths ``[B]``. Tokens at
    ``t >= lengths[b]`` do not count; a logical page with no token has max -inf and min +inf.
    Returns (kmax, kmin), each ``[B, H, T // logical_page_size, D]`` in keys' dtype."""
    B, H, T, D = keys.shape
    valid = (torch.arange(T, device=keys.device).view(1, T) < lengths.view(B, 1)).view(B, 1, T, 1)
    # Python scalars, not 0-d tensors: no host-to-device copy (these run inside decode graphs too)
    kmax = torch.where(valid, keys, float("-inf")).view(B, H, T // logical_page_size, logical_page_size, D).amax(3)
    kmin = torch.where(valid, keys, float("inf")).view(B, H, T // logical_page_size, logical_page_size, D).amin(3)
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
    # Python scalars, not 0-d tensors: no host-to-device copy inside a captured decode graph
    kmax.scatter_reduce_(2, idx, torch.where(ok, new, float("-inf")), reduce="amax")
    kmin.scatter_reduce_(2, idx, torch.where(ok, new, float("inf")), reduce="amin")


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


def rope_rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``[B, 1, 1, D]`` of RoPE's angles at ``positions`` ``[B]`` (rotate-half layout)."""
    B = positions.shape[0]
    angle = positions.float().view(B, 1) * inv_freq.view(1, -1)
    angle = torch.cat([angle, angle], -1).view(B, 1, 1, -1)
    return angle.cos(), angle.sin()


def unrope(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotation=None) -> torch.Tensor:
    """Queries ``[B, H, G, D]`` rotated back from RoPE at ``positions`` ``[B]`` (Llama's
    rotate-half convention; ``inv_freq`` ``[D / 2]`` the model's frequencies), in float32.
    ``rotation``: ``rope_rotation(positions, inv_freq)``, when the caller has it."""
    cos, sin = rope_rotation(positions, inv_freq) if rotation is None else rotation
    q = q.float()
    half = q.shape[-1] // 2
    rotated = torch.cat([-q[..., half:], q[..., :half]], -1)
    return q * cos - rotated * sin


def query_drift(q, q_ref, lengths, inv_freq, tau, refresh, rotation=None) -> torch.Tensor:
    """Which query heads of q ``[B, H, G, D]`` drifted, bool ``[B, H, G]``: the cosine of their
    query before RoPE (at the row's position ``lengths - 1``) with ``q_ref`` (unit vectors,
    fp32) is under ``tau``; every head with ``refresh``. The flagged heads' queries (unit
    length) replace theirs in ``q_ref``, in place. ``rotation``: ``rope_rotation(lengths - 1,
    inv_freq)``, when the caller has it."""
    now = unrope(q, lengths - 1, inv_freq, rotation)
    now = now * torch.rsqrt((now * now).sum(-1, keepdim=True).clamp_min(1e-30))
    need = torch.ones(q.shape[:3], dtype=torch.bool, device=q.device) if refresh else \
        (now * q_ref).sum(-1) < tau
    q_ref.copy_(torch.where(need.unsqueeze(-1), now, q_ref))
    return need


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

def _one_query_attention(q, keys, values, valid, scale, finite=False) -> torch.Tensor:
    """One query per (row, KV head, query head) against its own keys: q ``[B, H, G, D]``, keys and
    values ``[B, H, G or 1, N, D]``, valid ``[B, H, G or 1, N]``. Keys and values outside
    ``valid`` may hold anything (even NaN): they are zeroed first (in place: keys and values must
    be the caller's own copies), then masked; with ``finite`` they are known to be finite (the
    serving stores: zero-initialised, written only with the model's keys and values), so the mask
    alone gives them weight exactly 0. A query with no valid key gets zeros. One fused SDPA call
    (float32, or float64 for float64 inputs)."""
    acc, dtype = _acc_dtype(q), q.dtype
    B, H, G, D = q.shape
    keys, values = keys.to(acc), values.to(acc)
    # keys shared by a KV head's G query heads stay one copy (SDPA's GQA); per-query-head keys
    # (page selections) are one head each
    shared = keys.shape[2] == 1 and G > 1
    q = q.to(acc).flatten(1, 2).unsqueeze(2)
    if keys.device.type == "cpu" and bool(valid.all()):
        # every key counts (a full streaming window, say): no zeroing, no mask. Asked on the CPU
        # only, where the answer costs nothing; on a GPU it would be a host sync
        keys, values = (t.squeeze(2) if shared else t.flatten(1, 2) for t in (keys, values))
        out = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=shared)
        return out.view(B, H, G, D).to(dtype)
    # the callers pass fresh copies (gathered pages, sink + ring), zeroed in place: no third copy
    if not finite:
        hidden = ~valid.unsqueeze(-1)
        keys, values = keys.masked_fill_(hidden, 0.0), values.masked_fill_(hidden, 0.0)
    keys, values = (t.squeeze(2) if shared else t.flatten(1, 2) for t in (keys, values))
    mask = valid.expand(B, H, G, -1).flatten(1, 2).unsqueeze(2)          # [B, H*G, 1, N]
    seen = mask.any(-1, keepdim=True)
    if keys.device.type == "cpu" and bool(seen.all()):    # every query sees a key (as at decode)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=shared)
        return out.view(B, H, G, D).to(dtype)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask | ~seen, scale=scale,
                                         enable_gqa=shared)
    return torch.where(seen, out, 0.0).view(B, H, G, D).to(dtype)


def with_newest_page(pages: torch.Tensor, lengths: torch.Tensor, page_size: int) -> torch.Tensor:
    """``pages`` ``[B, H, G, K]`` plus each row's newest page ``[B, H, G, K + 1]`` (-1 where the
    list already holds it): a reused selection made before that page began still reads it."""
    B, H, G, _ = pages.shape
    newest = ((lengths - 1) // page_size).view(B, 1, 1, 1).expand(B, H, G, 1)
    held = (pages == newest).any(-1, keepdim=True)
    return torch.cat([pages, torch.where(held, -1, newest)], dim=-1)


def paged_decode(q, pool_k, pool_v, pages, lengths, page_size, scale, window=None,
                 token_pages=None, finite=False) -> torch.Tensor:
    """Attention of one query per head over selected pages only.

    q ``[B, Hkv, G, D]``; pools ``[B, Hkv, T, D]``; pages int ``[B, Hkv, G, K]`` (-1 or an index
    past the row's pages means an empty slot). Reads only the gathered pages. Returns
    ``[B, Hkv, G, D]`` in q's dtype. ``window`` (Mistral's sliding window) hides tokens older than
    the newest ``window``. ``token_pages``: the page of the sequence each entry of ``pages`` holds,
    when ``pages`` index a page cache (offload) rather than the pool. ``finite``: every pool slot
    holds a finite value (``_one_query_attention``)."""
    B, Hkv, T, D = pool_k.shape
    P = T // page_size
    G, K = pages.shape[2], pages.shape[3]
    empty = (pages < 0) | (pages >= P)                                    # [B, Hkv, G, K]
    within = torch.arange(page_size, device=q.device)
    end = lengths.view(B, 1, 1, 1, 1)
    tok = (pages if token_pages is None else token_pages).unsqueeze(-1) * page_size + within   # its position
    valid = ~empty.unsqueeze(-1) & (tok < end)                            # [B, Hkv, G, K, page]
    if window is not None:
        valid = valid & (tok >= end - window)
    # whole pages copied as rows of page_size * D values (one index_select), not key by key
    if T != P * page_size:
        pool_k, pool_v = pool_k[:, :, :P * page_size], pool_v[:, :, :P * page_size]
    # an empty slot copies some page of its row, masked all the same: in a pool the newest, which
    # the step reads anyway, so nothing outside the selection is touched
    newest = ((lengths - 1).clamp(min=0) // page_size).clamp(max=P - 1).view(B, 1, 1, 1)
    rows = torch.where(empty, newest, pages) + P * torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1, 1)
    keys = pool_k.reshape(B * Hkv * P, page_size * D).index_select(0, rows.flatten())
    values = pool_v.reshape(B * Hkv * P, page_size * D).index_select(0, rows.flatten())
    keys, values = (t.view(B, Hkv, G, K * page_size, D) for t in (keys, values))
    return _one_query_attention(q, keys, values, valid.flatten(3), scale, finite)


def streaming_decode(q, sink_k, sink_v, ring_k, ring_v, lengths, sink, local, scale, window=None,
                     finite=False, valid=None) -> torch.Tensor:
    """Attention of one query per streaming head over its sink buffer and ring buffer.

    q ``[B, Hkv, G, D]``; sink buffers ``[B, Hkv, <= sink, D]``; ring buffers ``[B, Hkv, <= local,
    D]`` (fewer slots while no row can fill them); lengths ``[B]`` counts the current token.
    ``finite``: every slot holds a finite value (``_one_query_attention``). ``valid``: the
    slots' ``streaming_decode_slots``, when the caller has them. Returns ``[B, Hkv, G, D]``."""
    B = q.shape[0]
    keys = torch.cat([sink_k, ring_k], dim=2).unsqueeze(2)
    vals = torch.cat([sink_v, ring_v], dim=2).unsqueeze(2)
    if valid is None:
        valid = streaming_decode_slots(lengths, sink, local, window, (sink_k.shape[2], ring_k.shape[2]))
    valid = valid.view(B, 1, 1, -1)
    return _one_query_attention(q, keys, vals, valid.expand(B, q.shape[1], 1, -1), scale, finite)


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
