"""Query-aware page selection (Quest scoring, LServe hierarchical paging, section 2).

Two or three small launches, none of which waits on the host:

1. ``_score_dot_kernel``: logical page j scores ``sum_c max(q_c Kmax[j, c], q_c Kmin[j, c])``,
   computed for all G query heads of a KV head at once as ``q+ . Kmax + q- . Kmin`` (q+ =
   max(q, 0), q- = min(q, 0): two tensor-core products); a physical page takes the max over its
   logical pages; pages holding no token score -inf and the row's last page +inf (it is always
   chosen). Each score is packed with its page index into one int64 sort key (order-preserving
   float bits in the high half, ``2^31 - 1 - page`` in the low half), so every key is distinct
   and "higher score first, then lower page first" is plain descending order: the reference's
   stable-sort tie rule, exactly.
2. ``_topk_kernel``: each chunk of keys is sorted (through ``tl.topk``, which stops merging past
   the kept keys, when the plan asks and Triton has it) and keeps its best ``n_select``; rounds
   repeat on the survivors until one chunk holds them all, and a last launch of the same kernel
   ranks those. Every round at every context length is the one compiled kernel (the chunk size
   fixed, the final round's flag a runtime value), so a longer prompt compiles nothing.

Reference: lserve_hf.reference.select_pages (and lserve_hf.reference.page_scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import (check_pdl_mode, check_power_of_two, gdc_end, gdc_mode, gdc_start,
                     pdl_options, refuse_float64)

_REFERENCE = "lserve_hf.reference.select_pages"


@dataclass(frozen=True)
class SelectPlan:
    """Launch plan of :func:`select_pages` (and :func:`page_scores`). Any plan gives the same
    result; they differ in speed. The defaults are the fastest of the sweep
    (``benchmarks/tune_kernels.py``) on an H200 (2026-11-29, 4 retrieval heads x 4 queries,
    graph replay, 128K / 512K): tensor-core scores with 512-key sort chunks 16.8 / 42.7 us; the
    rounds through tl.topk 15.5 / 33.5; PDL "late" 15.0 / 32.8 (off 15.1, True 18.5 at 128K: the
    waiting top-k programs hold multiprocessors the score programs need); 8 warps per sorting
    program 14.7 / 31.6. Chunks of 256 keys 14.8 / 36.8, 1024 16.6 / 30.5."""

    score_dot_rows: int = 64   # logical pages per score program (32-64, 2-8 warps: within 0.5 us)
    score_dot_warps: int = 8
    chunk: int = 512           # keys sorted per program in the first top-k round
    sort_warps: int = 8
    pdl: bool | str = "late"
    partial_sort: bool = True  # rounds through tl.topk (a bitonic sort that stops merging past k)

    def __post_init__(self):
        check_pdl_mode(self.pdl, "SelectPlan")
        check_power_of_two("SelectPlan", score_dot_rows=self.score_dot_rows,
                           score_dot_warps=self.score_dot_warps, chunk=self.chunk,
                           sort_warps=self.sort_warps)
        if not isinstance(self.partial_sort, bool):
            raise ValueError(f"SelectPlan.partial_sort is {self.partial_sort!r}; use True or False")


DEFAULT_SELECT_PLAN = SelectPlan()


# Arguments that change with the context length or the batch: runtime values, not specialised (Triton
# would otherwise compile a variant per value class, ==1 or %16, and stall a new prompt length).
# Strides stay specialised (Triton proves alignment from them): the summaries' are multiples of
# the head dim, the score rows are padded to 16.
LENGTH_ARGS = {
    "_score_dot_kernel": ["P", "NL"],
    "_topk_kernel": ["n_keys", "n_out", "P", "stride_row_in", "stride_row_out"],
}


@triton.jit
def _sort_key(score, page):
    """One int64 per page: the score's order-preserving bits high, 2^31 - 1 - page low."""
    score = tl.where(score == 0.0, 0.0, score)                    # -0.0 ties +0.0
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)        # float order as int order
    return (ordered.to(tl.int64) << 32) | (2147483647 - page).to(tl.int64)


@triton.jit(do_not_specialize=LENGTH_ARGS["_score_dot_kernel"])
def _score_dot_kernel(Q, KMAX, KMIN, LENGTHS, OUT, NEED,
                      stride_qb, stride_qh, stride_qg, stride_qd,
                      stride_sb, stride_sh, stride_sl, stride_sd,
                      stride_ob, stride_oh, stride_og, stride_op,
                      Hkv, G, P, NL, page_size, logical_page_size,
                      LPP: tl.constexpr, BLOCK_L: tl.constexpr, M: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PACK: tl.constexpr, LAST_INF: tl.constexpr,
                      IEEE: tl.constexpr, GDC: tl.constexpr, HAS_NEED: tl.constexpr):
    """Scores of BLOCK_L logical pages (BLOCK_L // LPP physical ones) of one (row, KV head) for
    all its G query heads at once: two [M, D] x [D, BLOCK_L] tensor-core products, the summaries
    read once per KV head instead of once per query head. PACK: store sort keys, not scores.
    GDC: launched with PDL (kernels/launch.py). HAS_NEED: a KV head none of whose query heads is
    flagged in NEED (int8 ``[B, Hkv, G]``) is skipped: its summaries are not even read."""
    gdc_start(GDC)
    pid_bh = tl.program_id(1)
    if HAS_NEED:
        flags = tl.load(NEED + pid_bh * G + tl.arange(0, M), mask=tl.arange(0, M) < G, other=0)
        if tl.max(flags, 0) != 0:
            _score_block(Q, KMAX, KMIN, LENGTHS, OUT, pid_bh, stride_qb, stride_qh, stride_qg, stride_qd,
                         stride_sb, stride_sh, stride_sl, stride_sd, stride_ob, stride_oh, stride_og,
                         stride_op, Hkv, G, P, NL, page_size, logical_page_size, LPP, BLOCK_L, M,
                         HEAD_DIM, PACK, LAST_INF, IEEE)
    else:
        _score_block(Q, KMAX, KMIN, LENGTHS, OUT, pid_bh, stride_qb, stride_qh, stride_qg, stride_qd,
                     stride_sb, stride_sh, stride_sl, stride_sd, stride_ob, stride_oh, stride_og, stride_op,
                     Hkv, G, P, NL, page_size, logical_page_size, LPP, BLOCK_L, M, HEAD_DIM, PACK,
                     LAST_INF, IEEE)
    gdc_end(GDC)


@triton.jit
def _score_block(Q, KMAX, KMIN, LENGTHS, OUT, pid_bh,
                 stride_qb, stride_qh, stride_qg, stride_qd,
                 stride_sb, stride_sh, stride_sl, stride_sd,
                 stride_ob, stride_oh, stride_og, stride_op,
                 Hkv, G, P, NL, page_size, logical_page_size,
                 LPP: tl.constexpr, BLOCK_L: tl.constexpr, M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PACK: tl.constexpr, LAST_INF: tl.constexpr,
                 IEEE: tl.constexpr):
    """The scores of one (program's) block of logical pages, see _score_dot_kernel."""
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    length = tl.load(LENGTHS + b).to(tl.int32)
    n_logical = (length + logical_page_size - 1) // logical_page_size
    n_pages = (length + page_size - 1) // page_size
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


@triton.jit(do_not_specialize=LENGTH_ARGS["_topk_kernel"] + ["final"])
def _topk_kernel(KEYS, OUT, NEED, n_keys, n_out, P, stride_row_in, stride_row_out, final,
                 CHUNK: tl.constexpr, K_KEEP: tl.constexpr, GDC: tl.constexpr,
                 PARTIAL: tl.constexpr, HAS_NEED: tl.constexpr):
    """Sort one chunk of CHUNK keys of one row, descending, and keep the first K_KEEP: as keys
    into the next round, or (``final`` nonzero) as page indices; ranks past the P pages get the
    rank itself. ``final`` is a runtime value, so every round of every context length runs one
    compiled kernel.
    PARTIAL: ``tl.topk`` (a bitonic sort that stops merging past K_KEEP) instead of a full sort;
    the keys are distinct, so both keep the same keys in the same order. HAS_NEED: a row not
    flagged in NEED is skipped (its OUT keeps what it held)."""
    gdc_start(GDC)
    row = tl.program_id(1)
    if HAS_NEED:
        if tl.load(NEED + row) != 0:
            _topk_chunk(KEYS, OUT, row, n_keys, n_out, P, stride_row_in, stride_row_out, final, CHUNK,
                        K_KEEP, PARTIAL)
    else:
        _topk_chunk(KEYS, OUT, row, n_keys, n_out, P, stride_row_in, stride_row_out, final, CHUNK,
                    K_KEEP, PARTIAL)
    gdc_end(GDC)


@triton.jit
def _topk_chunk(KEYS, OUT, row, n_keys, n_out, P, stride_row_in, stride_row_out, final,
                CHUNK: tl.constexpr, K_KEEP: tl.constexpr, PARTIAL: tl.constexpr):
    """One program's chunk of _topk_kernel."""
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
    if final != 0:
        page = 2147483647 - (keys & 4294967295)
        page = tl.where(offs < P, page, offs)
        tl.store(OUT + row.to(tl.int64) * stride_row_out + offs, page, mask=offs < n_out)
    else:
        tl.store(OUT + row.to(tl.int64) * stride_row_out + chunk * K_KEEP + offs, keys,
                 mask=offs < K_KEEP)


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles of any size: the angle (the fp32 product RoPE itself uses) is
    reduced to [-pi, pi] in fp64 first. Angles reach the context length (1.3e5 rad at 128K),
    where fp32 sine and cosine leave their fast path (or, approximated, their accuracy)."""
    a = angle.to(tl.float64)
    r = (a - 6.283185307179586 * tl.floor(a * 0.15915494309189535 + 0.5)).to(tl.float32)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _drift_kernel(Q, QREF, LENGTHS, INV_FREQ, NEED, tau, Hkv, G,
                  stride_qb, stride_qh, stride_qg, stride_qd,
                  HEAD_DIM: tl.constexpr, REFRESH: tl.constexpr, GDC: tl.constexpr):
    """One program per query head: its query rotated back from RoPE at its row's position
    (``lengths - 1``: positions from the row's first real token, an offset both queries of a
    comparison share) and of unit length; flags the head in NEED when its cosine with QREF
    (``[rows, D]`` fp32) is under ``tau`` (every head with REFRESH), and keeps the flagged heads'
    queries in QREF. Rotate-half RoPE: the pairs are (j, j + D/2)."""
    gdc_start(GDC)
    row = tl.program_id(0)
    b = row // (Hkv * G)
    h = (row // G) % Hkv
    g = row % G
    HALF: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, HALF)
    base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + g * stride_qg
    q1 = tl.load(base + offs * stride_qd).to(tl.float32)
    q2 = tl.load(base + (offs + HALF) * stride_qd).to(tl.float32)
    angle = (tl.load(LENGTHS + b) - 1).to(tl.float32) * tl.load(INV_FREQ + offs)
    c, s = _cos_sin(angle)
    p1 = q1 * c + q2 * s
    p2 = q2 * c - q1 * s
    inv = 1.0 / tl.sqrt(tl.maximum(tl.sum(p1 * p1, 0) + tl.sum(p2 * p2, 0), 1e-30))
    p1, p2 = p1 * inv, p2 * inv
    ref = QREF + row.to(tl.int64) * HEAD_DIM
    if REFRESH:
        need = True
    else:
        need = tl.sum(p1 * tl.load(ref + offs), 0) + tl.sum(p2 * tl.load(ref + HALF + offs), 0) < tau
    tl.store(NEED + row, need.to(tl.int8))
    if need:
        tl.store(ref + offs, p1)
        tl.store(ref + HALF + offs, p2)
    gdc_end(GDC)


def query_drift(q, q_ref, lengths, inv_freq, tau, refresh, need=None, *,
                plan: SelectPlan | None = None) -> torch.Tensor:
    """Which query heads of q ``[B, Hkv, G, D]`` drifted: int8 ``[B, Hkv, G]`` (into ``need``),
    the cosine of their query before RoPE with ``q_ref`` (fp32 ``[B, Hkv, G, D]``, unit
    vectors, updated in place for the flagged heads) under ``tau``; every head with
    ``refresh``. Reference: lserve_hf.reference.query_drift."""
    plan = DEFAULT_SELECT_PLAN if plan is None else plan
    refuse_float64("query_drift", "lserve_hf.reference.query_drift", q)
    B, Hkv, G, D = q.shape
    if need is None:
        need = torch.empty(B, Hkv, G, dtype=torch.int8, device=q.device)
    if not q_ref.is_contiguous() or q_ref.dtype != torch.float32 or D % 2:
        raise ValueError("query_drift takes a contiguous fp32 q_ref and an even head dim")
    if B * Hkv * G:
        pdl = pdl_options(q.device, plan.pdl)
        _drift_kernel[(B * Hkv * G,)](q, q_ref, lengths, inv_freq, need, float(tau), Hkv, G, *q.stride(),
                                      HEAD_DIM=D, REFRESH=bool(refresh), GDC=gdc_mode(pdl, plan.pdl),
                                      num_warps=1, **pdl)
    return need


def unsupported(q, page_size, logical_page_size) -> str | None:
    """Why the kernels cannot select pages for queries ``q`` (``[B, Hkv, G, D]``) and this paging,
    or None when they can. The serving dispatch (lserve_hf.pages.select) sends those cases to
    the torch reference."""
    D = q.shape[-1]
    lpp = page_size // logical_page_size
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the tensor-core scores take fp16, bf16 or fp32 queries, not {q.dtype}"
    if D < 16 or D & (D - 1):
        return f"the tensor-core scores need a head dim that is a power of two >= 16, not {D}"
    if lpp & (lpp - 1):
        return (f"the tensor-core scores need a power-of-two number of logical pages per physical "
                f"page, not {page_size} // {logical_page_size} = {lpp}")
    return None


def _scores(q, kmax, kmin, lengths, page_size, logical_page_size, pack, last_inf, plan, need=None):
    refuse_float64("select_pages", _REFERENCE, q, kmax, kmin)
    B, Hkv, G, D = q.shape
    NL = kmax.shape[2]
    lpp = page_size // logical_page_size
    if page_size % logical_page_size or NL % lpp:
        raise ValueError(f"page_size={page_size} must be a multiple of logical_page_size="
                         f"{logical_page_size}, and the summaries hold whole physical pages")
    reason = unsupported(q, page_size, logical_page_size)
    if reason:
        raise ValueError(f"{reason}; use the torch reference {_REFERENCE}")
    P = NL // lpp
    # rows padded to 16 entries: the row stride stays a multiple of 16 at every context length,
    # so Triton specialises it the same way (aligned, vectorised accesses) and never recompiles
    padded = torch.empty(B, Hkv, G, -(-P // 16) * 16, device=q.device,
                         dtype=torch.int64 if pack else torch.float32)
    out = padded[..., :P]
    if out.numel():
        pdl = pdl_options(q.device, plan.pdl)
        block_l = max(plan.score_dot_rows, 16, lpp)
        _score_dot_kernel[(triton.cdiv(NL, block_l), B * Hkv)](
            q, kmax, kmin, lengths.to(device=q.device), out, need if need is not None else out,
            *q.stride(), *kmax.stride(), *out.stride(),
            Hkv, G, P, NL, page_size, logical_page_size,
            LPP=lpp, BLOCK_L=block_l, M=max(16, triton.next_power_of_2(G)), HEAD_DIM=D, PACK=pack,
            LAST_INF=last_inf, IEEE=q.dtype == torch.float32 or q.device.type == "cpu",
            GDC=gdc_mode(pdl, plan.pdl), HAS_NEED=need is not None, num_warps=plan.score_dot_warps, **pdl)
    return out


def page_scores(q, kmax, kmin, lengths, page_size, logical_page_size, *,
                plan: SelectPlan | None = None) -> torch.Tensor:
    """Physical page scores ``[B, Hkv, G, P]`` in fp32, as ``reference.page_scores`` computes
    them; the selection's own scores, exposed for tests and inspection."""
    plan = DEFAULT_SELECT_PLAN if plan is None else plan
    return _scores(q, kmax, kmin, lengths, page_size, logical_page_size, False, False, plan)


def select_pages(q, kmax, kmin, lengths, page_size, logical_page_size, n_select, *,
                 plan: SelectPlan | None = None, need=None, out=None) -> torch.Tensor:
    """Selected physical pages, int64 ``[B, Hkv, G, n_select]``, equal to
    ``reference.select_pages``: the row's last page first, then the best-scoring pages (ties to
    the lower index), padded with indices past the pool when it has fewer than ``n_select``.

    q ``[B, Hkv, G, D]`` (after RoPE; fp16, bf16 or fp32, D a power of two >= 16); kmax, kmin
    ``[B, Hkv, NL, D]``; lengths ``[B]``; a power-of-two number of logical pages per physical
    page (:func:`unsupported` says why not otherwise). ``plan``: launch parameters
    (:data:`DEFAULT_SELECT_PLAN`). ``need`` (bool ``[B, Hkv, G]``) with ``out`` (contiguous
    int64 ``[B, Hkv, G, n_select]``): only the flagged query heads choose, into ``out``; the
    others keep what it holds, and KV heads with no flagged query head are not scored at all."""
    plan = DEFAULT_SELECT_PLAN if plan is None else plan
    B, Hkv, G, D = q.shape
    n_select = int(n_select)
    if need is not None:
        if out is None or not out.is_contiguous() or tuple(out.shape) != (B, Hkv, G, n_select):
            raise ValueError("select_pages(need=...) writes into out, a contiguous [B, Hkv, G, n_select] tensor")
        need = need.to(device=q.device, dtype=torch.int8).contiguous()
    keys = _scores(q, kmax, kmin, lengths, page_size, logical_page_size, True, True, plan, need)
    P = keys.shape[-1]
    rows = B * Hkv * G
    if out is None:
        out = torch.empty(B, Hkv, G, n_select, dtype=torch.int64, device=q.device)
    if rows == 0 or n_select == 0:
        return out
    row = keys.stride(2)                      # the padded row of each query head's keys
    keys = keys.as_strided((rows, P), (row, 1))
    pdl = pdl_options(q.device, plan.pdl)
    partial = plan.partial_sort and hasattr(tl, "topk")
    # tl.topk of Triton 3.6 cannot keep a single key (its last reduction leaves a scalar)
    k_keep = triton.next_power_of_2(max(n_select, 2 if partial else 1))
    # one compiled kernel for every round at every length: keys kept per chunk, chunk size (the
    # final round's too: a final round over fewer keys masks the rest), PDL mode, partial sorting
    chunk = max(plan.chunk, 2 * k_keep)
    kw = dict(CHUNK=chunk, K_KEEP=k_keep, GDC=gdc_mode(pdl, plan.pdl), PARTIAL=partial,
              HAS_NEED=need is not None, num_warps=plan.sort_warps, **pdl)
    flags = need if need is not None else keys
    # rounds of chunk-wise top-k until one chunk holds every candidate: the top n_select of all
    # keys are among each chunk's top k_keep >= n_select
    src, n, stride = keys, P, row
    while n > chunk:
        n_chunks = triton.cdiv(n, chunk)
        cand = torch.empty(rows, n_chunks * k_keep, dtype=torch.int64, device=q.device)
        _topk_kernel[(n_chunks, rows)](src, cand, flags, n, 0, P, stride, n_chunks * k_keep, 0, **kw)
        src, n, stride = cand, n_chunks * k_keep, n_chunks * k_keep
    _topk_kernel[(1, rows)](src, out, flags, n, n_select, P, stride, n_select, 1, **kw)
    return out
