"""Query-aware page selection (Quest scoring, LServe hierarchical paging, section 2).

Two or three small launches, none of which waits on the host:

1. ``_score_kernel``: logical page j scores ``sum_c max(q_c Kmax[j, c], q_c Kmin[j, c])``; a
   physical page takes the max over its logical pages; pages holding no token score -inf and
   the row's last page +inf (it is always chosen). Each score is packed with its page index
   into one int64 sort key (order-preserving float bits in the high half, ``2^31 - 1 - page``
   in the low half), so every key is distinct and "higher score first, then lower page first"
   is plain descending order: the reference's stable-sort tie rule, exactly. By default
   (``SELECT_PLAN["score"] == "dot"``) ``_score_dot_kernel`` computes the same bound for all G
   query heads of a KV head at once as ``q+ . Kmax + q- . Kmin`` (two tensor-core products).
2. top-k, by default (``SELECT_PLAN["topk"] == "sort"``) ``_topk_kernel``: each chunk of
   keys is sorted and keeps its best ``n_select``, then one more launch sorts the survivors
   (skipped when there is a single chunk); with ``SELECT_PLAN["partial_sort"]`` (default) both
   rounds sort through ``tl.topk``, which stops merging past the kept keys. The alternative
   (``"auto"``) is
   ``_threshold_topk_kernel``, one program per query head: binary search for the
   ``n_select``-th largest key (a few dozen reductions over the row held in registers), then
   only the chosen keys are sorted; used when there are more pages than slots and at most
   ``_MAX_THRESHOLD_ROW`` pages. Both give the same result.

Reference: :func:`lserve_hf.reference.select_pages` (and ``page_scores``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import gdc_end, gdc_mode, gdc_start, pdl_options

_MIN_CHUNK = 0  # lower bound of SELECT_PLAN["chunk"] (tests set a small chunk through it)
_MAX_THRESHOLD_ROW = 32768  # pages a threshold top-k program holds in registers
# Launch knobs, the fastest of benchmarks/bench_kernels.py --sweep on an H200 (2026-11-29, 4
# retrieval heads x 4 queries, graph replay; 128K / 512K): elementwise scores with 1024-key sort
# chunks 31.0 / 59.1 us, with 512-key chunks 22.7 / 61.1; tensor-core scores ("dot") with
# 512-key chunks 16.8 / 42.7 (scores alone 41.0 -> 22.5 us at 512K); the rounds through tl.topk
# ("partial_sort") 15.5 / 33.5, 15.0 / 32.8 with PDL triggered at each program's end
# (kernels/launch.py), 14.7 / 31.6 with 8 warps per sorting program. The threshold search
# ("auto") 23.5 / 49.4 after the dot scores; "radix" 33.0 / 120.1 (tl.histogram over 8K keys per
# program is slow there).
SELECT_PLAN = {
    "score_rows": 32,   # logical pages scored per program
    "score_warps": 4,
    "topk": "sort",     # "auto": threshold search when fewer slots than pages; "sort": sorting
    "chunk": 512,       # keys sorted per program in the first top-k round ("sort")
    "sort_warps": 8,    # warps of a "sort" top-k program (4: 15.0 / 32.8 us with partial sorting)
    # "sort" rounds through tl.topk (a bitonic sort that stops merging past k) when Triton has it
    "partial_sort": True,
    # "dot": all G queries of a KV head at once on tensor cores, sum_c max(q_c Kmax_c, q_c Kmin_c)
    # = q+ . Kmax + q- . Kmin (q+ = max(q, 0), q- = min(q, 0)); "fma": elementwise, query by query.
    "score": "dot",
    "score_dot_rows": 64,   # logical pages per program of the "dot" scorer
    "score_dot_warps": 8,
}


@triton.jit
def _sort_key(score, page):
    """One int64 per page: the score's order-preserving bits high, 2^31 - 1 - page low."""
    score = tl.where(score == 0.0, 0.0, score)                    # -0.0 ties +0.0
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)        # float order as int order
    return (ordered.to(tl.int64) << 32) | (2147483647 - page).to(tl.int64)


@triton.jit
def _page_counts(LENGTHS, b, page_size, logical_page_size):
    """(logical pages, physical pages) that hold a token of row b."""
    length = tl.load(LENGTHS + b).to(tl.int32)
    return ((length + logical_page_size - 1) // logical_page_size,
            (length + page_size - 1) // page_size)


@triton.jit
def _score_kernel(Q, KMAX, KMIN, LENGTHS, OUT,
                  stride_qb, stride_qh, stride_qg, stride_qd,
                  stride_sb, stride_sh, stride_sl, stride_sd,
                  stride_ob, stride_oh, stride_og, stride_op,
                  Hkv, G, P, NL, page_size, logical_page_size,
                  LPP: tl.constexpr, LPP_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PACK: tl.constexpr, LAST_INF: tl.constexpr,
                  ACC: tl.constexpr):
    """Scores of BLOCK_P physical pages of one (row, KV head), for each of its G query heads."""
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    n_logical, n_pages = _page_counts(LENGTHS, b, page_size, logical_page_size)

    offs_r = tl.arange(0, BLOCK_P * LPP_PAD)                 # one row per logical page
    sub = offs_r % LPP_PAD
    lpage = (tl.program_id(0) * BLOCK_P + offs_r // LPP_PAD) * LPP + sub
    row_ok = (sub < LPP) & (lpage < NL)
    offs_d = tl.arange(0, HEAD_DIM)
    s_off = (b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
             + lpage.to(tl.int64)[:, None] * stride_sl + offs_d[None, :] * stride_sd)
    has_tok = row_ok & (lpage < n_logical)              # empty pages (-inf/+inf) are not read
    kmax = tl.load(KMAX + s_off, mask=has_tok[:, None], other=0.0)
    kmin = tl.load(KMIN + s_off, mask=has_tok[:, None], other=0.0)

    page = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    for g in range(G):
        q = tl.load(q_base + g * stride_qg + offs_d * stride_qd).to(ACC)
        bound = tl.maximum(q[None, :] * kmax.to(ACC), q[None, :] * kmin.to(ACC))
        logical = tl.sum(bound, 1)                                        # [BLOCK_P * LPP_PAD]
        logical = tl.where(has_tok, logical, float("-inf"))
        score = tl.max(tl.reshape(logical, [BLOCK_P, LPP_PAD]), 1)        # [BLOCK_P]
        if LAST_INF:
            score = tl.where(page == n_pages - 1, float("inf"), score)
        if PACK:
            tl.store(o_base + g * stride_og + page * stride_op, _sort_key(score, page), mask=page < P)
        else:
            tl.store(o_base + g * stride_og + page * stride_op, score, mask=page < P)


@triton.jit
def _score_dot_kernel(Q, KMAX, KMIN, LENGTHS, OUT,
                      stride_qb, stride_qh, stride_qg, stride_qd,
                      stride_sb, stride_sh, stride_sl, stride_sd,
                      stride_ob, stride_oh, stride_og, stride_op,
                      Hkv, G, P, NL, page_size, logical_page_size,
                      LPP: tl.constexpr, BLOCK_L: tl.constexpr, M: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PACK: tl.constexpr, LAST_INF: tl.constexpr,
                      IEEE: tl.constexpr, GDC: tl.constexpr):
    """_score_kernel's scores for BLOCK_L logical pages (BLOCK_L // LPP physical ones) of one
    (row, KV head) and all its G query heads at once: two [M, D] x [D, BLOCK_L] tensor-core
    products, the summaries read once per KV head instead of once per query head. GDC: launched
    with PDL (kernels/launch.py)."""
    gdc_start(GDC)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    n_logical, n_pages = _page_counts(LENGTHS, b, page_size, logical_page_size)
    BLOCK_P: tl.constexpr = BLOCK_L // LPP
    lpage = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    has_tok = (lpage < NL) & (lpage < n_logical)              # empty pages are not read
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, M)
    s_off = (b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
             + lpage.to(tl.int64)[None, :] * stride_sl + offs_d[:, None] * stride_sd)   # [D, L]
    kmax = tl.load(KMAX + s_off, mask=has_tok[None, :], other=0.0)
    kmin = tl.load(KMIN + s_off, mask=has_tok[None, :], other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qg + offs_d[None, :] * stride_qd,
                mask=offs_m[:, None] < G, other=0.0)
    if IEEE:   # fp32 inputs, or CPU tensors: the interpreter's tl.dot mis-multiplies bf16
        q = q.to(tl.float32)
        logical = tl.dot(tl.maximum(q, 0.0), kmax.to(tl.float32), input_precision="ieee")
        logical += tl.dot(tl.minimum(q, 0.0), kmin.to(tl.float32), input_precision="ieee")
    else:
        logical = tl.dot(tl.where(q > 0, q, 0.0), kmax) + tl.dot(tl.where(q < 0, q, 0.0), kmin)
    logical = tl.where(has_tok[None, :], logical, float("-inf"))             # [M, BLOCK_L]
    score = tl.max(tl.reshape(logical, [M, BLOCK_P, LPP]), 2)                # [M, BLOCK_P]
    page = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    if LAST_INF:
        score = tl.where(page[None, :] == n_pages - 1, float("inf"), score)
    o_off = offs_m[:, None] * stride_og + page[None, :] * stride_op
    ok = (offs_m[:, None] < G) & (page[None, :] < P)
    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if PACK:
        tl.store(o_base + o_off, _sort_key(score, page[None, :]), mask=ok)
    else:
        tl.store(o_base + o_off, score, mask=ok)
    gdc_end(GDC)


@triton.jit
def _topk_kernel(KEYS, OUT, n_keys, n_out, P, stride_row_in, stride_row_out,
                 CHUNK: tl.constexpr, K_KEEP: tl.constexpr, FINAL: tl.constexpr, GDC: tl.constexpr,
                 PARTIAL: tl.constexpr):
    """Sort one chunk of CHUNK keys of one row, descending, and keep the first K_KEEP: as keys
    into the next round, or (FINAL) as page indices; ranks past the P pages get the rank itself.
    PARTIAL: ``tl.topk`` (a bitonic sort that stops merging past K_KEEP) instead of a full sort;
    the keys are distinct, so both keep the same keys in the same order."""
    gdc_start(GDC)
    row = tl.program_id(1)
    chunk = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    idx = chunk * CHUNK + offs
    keys = tl.load(KEYS + row.to(tl.int64) * stride_row_in + idx, mask=idx < n_keys,
                   other=-9223372036854775807)
    if PARTIAL:
        keys = tl.topk(keys, K_KEEP)
        offs = tl.arange(0, K_KEEP)
    else:
        keys = tl.sort(keys, 0, descending=True)
    if FINAL:
        page = 2147483647 - (keys & 4294967295)
        page = tl.where(offs < P, page, offs)
        tl.store(OUT + row.to(tl.int64) * stride_row_out + offs, page, mask=offs < n_out)
    else:
        tl.store(OUT + row.to(tl.int64) * stride_row_out + chunk * K_KEEP + offs, keys,
                 mask=offs < K_KEEP)
    gdc_end(GDC)


@triton.jit
def _count(x):
    return tl.sum(x.to(tl.int32), 0)


@triton.jit
def _emit_chosen(keys, chosen, SCRATCH, OUT, row, n_select, stride_row_out, K_PAD: tl.constexpr):
    """Compact the n_select chosen keys of a row through SCRATCH, sort only those (best first),
    and write their page indices (the packed key's low word) to OUT."""
    pos = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(SCRATCH + row * K_PAD + pos, keys, mask=chosen)
    tl.debug_barrier()
    offs = tl.arange(0, K_PAD)
    best = tl.load(SCRATCH + row * K_PAD + offs, mask=offs < n_select, other=-9223372036854775807)
    best = tl.sort(best, 0, descending=True)
    page = 2147483647 - (best & 4294967295)
    tl.store(OUT + row * stride_row_out + offs, page, mask=offs < n_select)


@triton.jit
def _threshold_topk_kernel(KEYS, SCRATCH, OUT, P, n_select, stride_row_in, stride_row_out,
                           P_PAD: tl.constexpr, K_PAD: tl.constexpr, IDX_BITS: tl.constexpr):
    """Top n_select (< P) keys of one row without sorting the row: binary-search the n-th largest
    score (32 steps over its order-preserving bits), then the page index that completes the ties
    (lower pages first), compact the chosen keys through SCRATCH and sort only those."""
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, P_PAD)
    ok = idx < P
    keys = tl.load(KEYS + row * stride_row_in + idx, mask=ok, other=0)
    ordered = (keys >> 32).to(tl.int32)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):   # largest t with #{ordered >= t} >= n_select
        mid = lo + (hi - lo + 1) // 2
        enough = _count(ok & (ordered.to(tl.int64) >= mid)) >= n_select
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    t = lo.to(tl.int32)
    need = n_select - _count(ok & (ordered > t))          # >= 1 pages still to take at score t
    tie = ok & (ordered == t)
    jlo = tl.full([], 0, tl.int32)
    jhi = P - 1
    for _ in range(IDX_BITS):  # smallest j with #{tie, idx <= j} >= need
        mid = (jlo + jhi) // 2
        enough = _count(tie & (idx <= mid)) >= need
        jhi = tl.where(enough, mid, jhi)
        jlo = tl.where(enough, jlo, mid + 1)
    chosen = ok & ((ordered > t) | (tie & (idx <= jhi)))
    _emit_chosen(keys, chosen, SCRATCH, OUT, row, n_select, stride_row_out, K_PAD)


@triton.jit
def _radix_topk_kernel(KEYS, SCRATCH, OUT, P, n_select, stride_row_in, stride_row_out,
                       P_PAD: tl.constexpr, K_PAD: tl.constexpr):
    """Top n_select (< P) keys of one row by radix select: four passes, each a 256-bin histogram
    of the next 8 bits of the score (as an unsigned order-preserving integer) among the keys that
    still tie with the threshold found so far; then the lowest page indices complete the ties,
    the chosen keys are compacted through SCRATCH and only those are sorted. Same result as
    _threshold_topk_kernel, with 4 histograms instead of ~45 row-wide reductions."""
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, P_PAD)
    ok = idx < P
    keys = tl.load(KEYS + row * stride_row_in + idx, mask=ok, other=0)
    u = (keys >> 32) + 2147483648                      # [0, 2^32), same order as the score
    bins = tl.arange(0, 512)
    cand = ok
    need = n_select + tl.zeros([], tl.int32)          # keys still to take among the candidates
    prefix = tl.zeros([], tl.int64)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        digit = ((u >> shift) & 255).to(tl.int32)
        digit = tl.where(cand, digit, 256)             # non-candidates: a bin of their own
        hist = tl.histogram(digit, 512)
        n_out = tl.sum(tl.where(bins == 256, hist, 0), 0)
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist - n_out   # candidates with digit >= b
        ok_b = (bins < 256) & (ge >= need)
        d = tl.max(tl.where(ok_b, bins, -1), 0)        # the threshold's digit
        gt = tl.sum(tl.where(bins == d, ge - hist, 0), 0)
        need = need - gt
        cand = cand & (digit == d)
        prefix = prefix | (d.to(tl.int64) << shift)
    tie = ok & (u == prefix)
    rank = tl.cumsum(tie.to(tl.int32), 0)
    chosen = ok & ((u > prefix) | (tie & (rank <= need)))
    _emit_chosen(keys, chosen, SCRATCH, OUT, row, n_select, stride_row_out, K_PAD)


def _scores(q, kmax, kmin, lengths, page_size, logical_page_size, pack, last_inf=True):
    B, Hkv, G, D = q.shape
    NL = kmax.shape[2]
    lpp = page_size // logical_page_size
    P = triton.cdiv(NL, lpp)
    if page_size % logical_page_size or NL % lpp:
        raise ValueError(f"page_size={page_size} must be a multiple of logical_page_size="
                         f"{logical_page_size}, and the summaries hold whole physical pages")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, Hkv, G, P, device=q.device, dtype=torch.int64 if pack else acc)
    lpp_pad = triton.next_power_of_2(lpp)
    block_p = max(1, SELECT_PLAN["score_rows"] // lpp_pad)
    pdl = pdl_options(q.device, "select")
    use_dot = (SELECT_PLAN["score"] == "dot" and acc == torch.float32 and lpp == lpp_pad
               and D >= 16 and q.dtype in (torch.float16, torch.bfloat16, torch.float32))
    if out.numel() and use_dot:
        block_l = max(SELECT_PLAN["score_dot_rows"], 16, lpp)
        _score_dot_kernel[(triton.cdiv(NL, block_l), B * Hkv)](
            q, kmax, kmin, lengths.to(device=q.device), out,
            *q.stride(), *kmax.stride(), *out.stride(),
            Hkv, G, P, NL, page_size, logical_page_size,
            LPP=lpp, BLOCK_L=block_l, M=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, PACK=pack,
            LAST_INF=last_inf, IEEE=q.dtype == torch.float32 or q.device.type == "cpu",
            GDC=gdc_mode(pdl, "select"), num_warps=SELECT_PLAN["score_dot_warps"], **pdl)
    elif out.numel():
        _score_kernel[(triton.cdiv(P, block_p), B * Hkv)](
            q, kmax, kmin, lengths.to(device=q.device), out,
            *q.stride(), *kmax.stride(), *out.stride(),
            Hkv, G, P, NL, page_size, logical_page_size,
            LPP=lpp, LPP_PAD=lpp_pad, BLOCK_P=block_p, HEAD_DIM=D, PACK=pack, LAST_INF=last_inf,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=SELECT_PLAN["score_warps"])
    return out


def page_scores(q, kmax, kmin, lengths, page_size, logical_page_size) -> torch.Tensor:
    """Physical page scores ``[B, Hkv, G, P]``, as ``reference.page_scores`` computes them (fp32,
    or fp64 for fp64 queries); the selection's own scores, exposed for tests and inspection."""
    return _scores(q, kmax, kmin, lengths, page_size, logical_page_size, pack=False, last_inf=False)


def select_pages(q, kmax, kmin, lengths, page_size, logical_page_size, n_select, *,
                 topk=None) -> torch.Tensor:
    """Selected physical pages, int64 ``[B, Hkv, G, n_select]``, equal to
    ``reference.select_pages``: the row's last page first, then the best-scoring pages (ties to
    the lower index), padded with indices past the pool when it has fewer than ``n_select``.

    q ``[B, Hkv, G, D]`` (after RoPE); kmax, kmin ``[B, Hkv, NL, D]``; lengths ``[B]``.
    ``topk``: "sort" (chunked sorting), "auto" (threshold search when fewer slots than pages,
    else sorting) or "radix" (radix select when fewer slots than pages, else sorting); all give
    the same result. None: ``SELECT_PLAN["topk"]``."""
    B, Hkv, G, D = q.shape
    n_select = int(n_select)
    if q.dtype == torch.float64:
        # Test precision: float64 scores cannot be packed with an index into 64 bits, so rank
        # them with the reference's stable sort (the same order the packed keys give).
        scores = _scores(q, kmax, kmin, lengths, page_size, logical_page_size, pack=False)
        P = scores.shape[-1]
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        if P < n_select:
            pad = torch.arange(P, n_select, device=q.device).expand(*order.shape[:-1], -1)
            order = torch.cat([order, pad], dim=-1)
        return order[..., :n_select]
    keys = _scores(q, kmax, kmin, lengths, page_size, logical_page_size, pack=True)
    P = keys.shape[-1]
    rows = B * Hkv * G
    out = torch.empty(B, Hkv, G, n_select, dtype=torch.int64, device=q.device)
    if rows == 0 or n_select == 0:
        return out
    keys = keys.view(rows, P)
    topk = topk or SELECT_PLAN["topk"]
    if n_select < P and P <= _MAX_THRESHOLD_ROW and topk != "sort":
        p_pad = triton.next_power_of_2(P)
        k_pad = triton.next_power_of_2(n_select)
        scratch = torch.empty(rows, k_pad, dtype=torch.int64, device=q.device)
        warps = SELECT_PLAN.get("topk_warps") or (8 if p_pad >= 4096 else 4)
        if topk == "radix":
            _radix_topk_kernel[(rows,)](keys, scratch, out, P, n_select, P, n_select,
                                        P_PAD=p_pad, K_PAD=k_pad, num_warps=warps)
        else:
            _threshold_topk_kernel[(rows,)](keys, scratch, out, P, n_select, P, n_select,
                                            P_PAD=p_pad, K_PAD=k_pad,
                                            IDX_BITS=max(1, p_pad.bit_length()), num_warps=warps)
        return out
    pdl = pdl_options(q.device, "select")
    gdc = gdc_mode(pdl, "select")
    partial = bool(SELECT_PLAN.get("partial_sort")) and hasattr(tl, "topk")
    # tl.topk of Triton 3.6 cannot keep a single key (its last reduction leaves a scalar)
    k_keep = triton.next_power_of_2(max(n_select, 2 if partial else 1))
    # the same for every round: keys kept per chunk, PDL mode, partial sorting, launch shape
    kw = dict(K_KEEP=k_keep, GDC=gdc, PARTIAL=partial, num_warps=SELECT_PLAN["sort_warps"], **pdl)
    chunk = max(_MIN_CHUNK or SELECT_PLAN["chunk"], 2 * k_keep)
    n_chunks = triton.cdiv(P, chunk)
    if n_chunks <= 1:
        size = triton.next_power_of_2(max(P, n_select, 2))
        _topk_kernel[(1, rows)](keys, out, P, n_select, P, P, n_select, CHUNK=size, FINAL=True, **kw)
        return out
    cand = torch.empty(rows, n_chunks * k_keep, dtype=torch.int64, device=q.device)
    _topk_kernel[(n_chunks, rows)](keys, cand, P, 0, P, P, n_chunks * k_keep, CHUNK=chunk, FINAL=False,
                                   **kw)
    size = triton.next_power_of_2(n_chunks * k_keep)
    _topk_kernel[(1, rows)](cand, out, n_chunks * k_keep, n_select, P, n_chunks * k_keep, n_select,
                            CHUNK=size, FINAL=True, **kw)
    return out
