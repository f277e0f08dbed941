"""Sparse paged decode attention (LServe section 3 "Decode"): one query token per head.

One launch covers both kinds of head. Each program owns one split of one head's keys
(flash-decoding split-K) and computes q k^T and p v as tensor-core products on a 16-row query
tile: a streaming program takes its KV head's whole GQA group, a retrieval program one query head.

* a streaming head reads its sink buffer and its ring buffer (``sink + local`` slots; which slots
  hold live tokens follows :func:`lserve_hf.streaming.streaming_decode_slots`);
* a retrieval head reads only its selected physical pages of the KV pool (a paged gather);
  empty slots (-1 or past the pool) and tokens past the row's length are skipped. A retrieval
  program loads its split's page numbers before its loop, so no page load waits on a
  page-number load.

Programs write an unnormalised partial output with its running max and sum; a second, tiny
kernel merges the splits (skipped when there is one split).

Reference: lserve_hf.reference.streaming_decode and lserve_hf.reference.paged_decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import (check_pdl_mode, check_positive, check_power_of_two, gdc_end, gdc_mode,
                     gdc_start, pdl_options, refuse_float64)


@dataclass(frozen=True)
class DecodePlan:
    """Launch plan of :func:`sparse_paged_decode`. Any plan gives the same result; they differ in
    speed. The defaults are the fastest of the sweep (``benchmarks/tune_kernels.py``) on an H200
    (2026-11-29, 128K, 50% streaming, graph replay): 128 programs of 8 pages with 3 stages 16.6 us
    (256 programs of 4 pages with 2 stages 17.6; the page numbers loaded first let a deeper
    pipeline pay). PDL (kernels/launch.py) for the decode and merge: True 16.6, "late" 17.4,
    off 17.7."""

    target_programs: int = 128    # retrieval programs to aim for (about 1 per multiprocessor of 132)
    min_split_tokens: int = 512   # a split reads at least this many keys
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool | str = True
    n_split: int | None = None    # splits per head; None: from the two fields above (tests, tuning)
    block_t: int | None = None    # keys per step; None: max(64, page size rounded up to 2^k)

    def __post_init__(self):
        check_pdl_mode(self.pdl, "DecodePlan")
        check_positive("DecodePlan", target_programs=self.target_programs,
                       min_split_tokens=self.min_split_tokens, num_stages=self.num_stages)
        check_power_of_two("DecodePlan", num_warps=self.num_warps)
        if self.n_split is not None:
            check_positive("DecodePlan", n_split=self.n_split)
        if self.block_t is not None:
            check_power_of_two("DecodePlan", block_t=self.block_t)
            if self.block_t < 16:
                raise ValueError(f"DecodePlan.block_t is {self.block_t}; tensor-core tiles need >= 16")


DEFAULT_DECODE_PLAN = DecodePlan()


# Arguments that change with the context length or the batch: runtime values, not specialised (Triton
# would otherwise compile a variant per value class, ==1 or %16, and stall a new prompt length).
# Strides stay specialised: the pool's are multiples of the head dim at any capacity, and Triton
# proves the 16-byte alignment of the page loads from them (without it the loads are not
# vectorised: measured 2x slower decode on an H200).
LENGTH_ARGS = {
    "_sparse_decode_kernel": ["B", "n_pool_pages"],
}


@triton.jit
def _sink_tile(sk, sv, slot, end, length, ssk_n, ssk_d, ssv_n, ssv_d, offs_d):
    """K and V rows of sink slots ``slot`` (live below ``end`` and the row's length), zero else."""
    valid = (slot < end) & (slot < length)
    k = tl.load(sk + slot[:, None] * ssk_n + offs_d[None, :] * ssk_d, mask=valid[:, None], other=0.0)
    v = tl.load(sv + slot[:, None] * ssv_n + offs_d[None, :] * ssv_d, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _ring_tile(rk, rv, idx, hi, sink, local, last, srk_n, srk_d, srv_n, srv_d, offs_d):
    """K and V rows of streaming slot numbers ``idx`` (>= sink) from the ring buffer: the token in
    ring slot j is last - ((last - j) mod local), floor modulo; slots of no live token are zero."""
    slot = idx - sink
    rem = (last - slot) % local
    rem = tl.where(rem < 0, rem + local, rem)
    tok = last - rem
    valid = (idx < hi) & (tok >= sink) & (tok >= 0)
    k = tl.load(rk + slot[:, None] * srk_n + offs_d[None, :] * srk_d, mask=valid[:, None], other=0.0)
    v = tl.load(rv + slot[:, None] * srv_n + offs_d[None, :] * srv_d, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _slot_pages(plist, slots, slot, hi):
    """The page numbers of page slots ``slot`` from ``plist``, the pages of slots ``slots`` already
    in registers (-1 past ``hi``): a select, no memory access."""
    page = tl.sum(tl.where(slots[None, :] == slot[:, None], plist[None, :], 0), 1)
    return tl.where(slot < hi, page, -1)


@triton.jit
def _page_rows(pk, pv, page, within, page_size, n_pool_pages, length,
               spk_t, spk_d, spv_t, spv_d, offs_d):
    """K and V rows of token ``within`` of pool page ``page`` (-1 or past the pool: empty)."""
    tok = page * page_size + within
    valid = (page >= 0) & (page < n_pool_pages) & (within < page_size) & (tok < length)
    tok = tok.to(tl.int64)
    k = tl.load(pk + tok[:, None] * spk_t + offs_d[None, :] * spk_d, mask=valid[:, None], other=0.0)
    v = tl.load(pv + tok[:, None] * spv_t + offs_d[None, :] * spv_d, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE: tl.constexpr):
    """Fold one block of keys into the running state of a [M, D] query tile, on tensor cores:
    s = q k^T and acc += p v as matrix products (few registers: k and v stay in their dtype)."""
    if IEEE:   # fp32 inputs, or CPU tensors: the interpreter's tl.dot mis-multiplies bf16
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, l_i, m_new


@triton.jit(do_not_specialize=LENGTH_ARGS["_sparse_decode_kernel"])
def _sparse_decode_kernel(
        QS, SK, SV, RK, RV, QR, PK, PV, PAGES, LENGTHS, OS, OR, OPART, MLPART,
        sqs_b, sqs_h, sqs_g, sqs_d,
        ssk_b, ssk_h, ssk_n, ssk_d,
        ssv_b, ssv_h, ssv_n, ssv_d,
        srk_b, srk_h, srk_n, srk_d,
        srv_b, srv_h, srv_n, srv_d,
        sqr_b, sqr_h, sqr_g, sqr_d,
        spk_b, spk_h, spk_t, spk_d,
        spv_b, spv_h, spv_t, spv_d,
        spg_b, spg_h, spg_g, spg_k,
        sos_b, sos_h, sos_g, sos_d,
        sor_b, sor_h, sor_g, sor_d,
        B, Hs, Hr, G, sink, local, page_size, n_pool_pages, n_slots, qk_scale,
        stream_per_split, slots_per_split, n_split_s, n_split_r,
        BLOCK_T: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, M: tl.constexpr,
        DIRECT: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr, SLOT_PAD: tl.constexpr,
        NEWEST: tl.constexpr, K_PAD: tl.constexpr):
    """Work items: retrieval (query head, split) pairs first (the long ones), then streaming (KV
    head, split) pairs; each kind has its own split count, so no program is launched for an empty
    split. A retrieval program's query sits in row 0 of its M-row tile (the other rows are zero);
    it loads its SLOT_PAD (>= its split's) page numbers before its loop. DIRECT: one split, the
    output is written normalised. GDC: launched with PDL (kernels/launch.py) in that mode.
    NEWEST: the page list holds n_slots - 1 pages and the last slot is the row's newest page,
    read unless the list already holds it (a reused selection made before that page began)."""
    gdc_start(GDC)
    pid = tl.program_id(0)
    n_rows = B * (Hs + Hr) * G
    n_retr = B * Hr * G * n_split_r
    offs_m = tl.arange(0, M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    l_i = tl.zeros([M], tl.float32)
    m_i = tl.full([M], float("-inf"), tl.float32)
    if pid < n_retr:
        r = pid // n_split_r
        split = pid % n_split_r
        b = r // (Hr * G)
        h = ((r % (Hr * G)) // G).to(tl.int64)
        g0 = r % G
        n_q = 1
        row0 = (b * (Hs + Hr) + Hs + h) * G + g0
    else:
        r = (pid - n_retr) // n_split_s
        split = (pid - n_retr) % n_split_s
        b = r // Hs
        h = (r % Hs).to(tl.int64)
        g0 = 0
        n_q = G
        row0 = (b * (Hs + Hr) + h) * G
    b64 = b.to(tl.int64)
    length = tl.load(LENGTHS + b).to(tl.int32)
    live = offs_m < n_q

    if pid >= n_retr:
        # Streaming head: slots [0, sink) of the sink buffer then [0, local) of the ring buffer,
        # numbered 0 .. sink + local - 1; this split reads [lo, hi) of them.
        q = tl.load(QS + b64 * sqs_b + h * sqs_h + offs_m[:, None] * sqs_g + offs_d[None, :] * sqs_d,
                    mask=live[:, None], other=0.0)
        lo = split * stream_per_split
        hi = tl.minimum(lo + stream_per_split, sink + local)
        sk = SK + b64 * ssk_b + h * ssk_h
        sv = SV + b64 * ssv_b + h * ssv_h
        for t0 in range(lo, tl.minimum(hi, sink), BLOCK_T):
            k, v, valid = _sink_tile(sk, sv, t0 + offs_t, tl.minimum(hi, sink), length,
                                     ssk_n, ssk_d, ssv_n, ssv_d, offs_d)
            acc, l_i, m_i = _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE)
        rk = RK + b64 * srk_b + h * srk_h
        rv = RV + b64 * srv_b + h * srv_h
        last = length - 1
        for t0 in range(tl.maximum(lo, sink), hi, BLOCK_T):
            k, v, valid = _ring_tile(rk, rv, t0 + offs_t, hi, sink, local, last,
                                     srk_n, srk_d, srv_n, srv_d, offs_d)
            acc, l_i, m_i = _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE)
    else:
        # Retrieval head: selected page slots [lo, hi) of this query head; BLOCK_T // PAGE_PAD
        # pages per step, each page a contiguous run of the pool.
        q = tl.load(QR + b64 * sqr_b + h * sqr_h + g0 * sqr_g + offs_m[:, None] * 0 + offs_d[None, :] * sqr_d,
                    mask=live[:, None], other=0.0)
        lo = split * slots_per_split
        hi = tl.minimum(lo + slots_per_split, n_slots)
        pg = PAGES + b64 * spg_b + h * spg_h + g0 * spg_g
        pk = PK + b64 * spk_b + h * spk_h
        pv = PV + b64 * spv_b + h * spv_h
        # The split's page numbers in registers first: a key load then never waits on a
        # page-number load, so the pipeliner can issue the next pages' loads early.
        slots = lo + tl.arange(0, SLOT_PAD)
        n_listed = n_slots - 1 if NEWEST else n_slots
        plist = tl.load(pg + slots * spg_k, mask=slots < tl.minimum(hi, n_listed), other=-1)
        if NEWEST:
            newest = (length - 1) // page_size
            offs_k = tl.arange(0, K_PAD)
            listed = tl.load(pg + offs_k * spg_k, mask=offs_k < n_listed, other=-1)
            held = tl.sum((listed == newest).to(tl.int32), 0) > 0
            plist = tl.where(slots == n_listed, tl.where(held, -1, newest), plist)
        within = offs_t % PAGE_PAD
        for s0 in range(lo, hi, BLOCK_T // PAGE_PAD):
            page = _slot_pages(plist, slots, s0 + offs_t // PAGE_PAD, hi)
            k, v, valid = _page_rows(pk, pv, page, within, page_size, n_pool_pages, length,
                                     spk_t, spk_d, spv_t, spv_d, offs_d)
            acc, l_i, m_i = _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE)

    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]   # a head that sees no key gets zeros
        if pid >= n_retr:
            tl.store(OS + b64 * sos_b + h * sos_h + offs_m[:, None] * sos_g + offs_d[None, :] * sos_d,
                     out.to(OS.dtype.element_ty), mask=live[:, None])
        else:
            tl.store(OR + b64 * sor_b + h * sor_h + (g0 + offs_m[:, None]) * sor_g + offs_d[None, :] * sor_d,
                     out.to(OR.dtype.element_ty), mask=live[:, None])
    else:
        part = split.to(tl.int64) * n_rows + row0 + offs_m
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=live[:, None])
        tl.store(MLPART + part * 2, m_i, mask=live)
        tl.store(MLPART + part * 2 + 1, l_i, mask=live)
    gdc_end(GDC)


@triton.jit
def _combine_kernel(OPART, MLPART, OS, OR,
                    sos_b, sos_h, sos_g, sos_d,
                    sor_b, sor_h, sor_g, sor_d,
                    Hs, Hr, G, n_split_s, n_split_r,
                    SPLIT_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, GDC: tl.constexpr):
    """Merge the splits of one query head: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,
    written to the streaming or the retrieval output by the head's kind."""
    gdc_start(GDC)
    row = tl.program_id(0)
    n_rows = tl.num_programs(0)
    per_b = (Hs + Hr) * G
    b = (row // per_b).to(tl.int64)
    hh = (row % per_b) // G
    g = row % G
    n_split = tl.where(hh < Hs, n_split_s, n_split_r)
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    part = offs_s.to(tl.int64) * n_rows + row
    ok = offs_s < n_split
    m = tl.load(MLPART + part * 2, mask=ok, other=float("-inf"))
    l = tl.load(MLPART + part * 2 + 1, mask=ok, other=0.0)
    o = tl.load(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(l * w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    if hh < Hs:
        tl.store(OS + b * sos_b + hh.to(tl.int64) * sos_h + g * sos_g + offs_d * sos_d,
                 out.to(OS.dtype.element_ty))
    else:
        tl.store(OR + b * sor_b + (hh - Hs).to(tl.int64) * sor_h + g * sor_g + offs_d * sor_d,
                 out.to(OR.dtype.element_ty))
    gdc_end(GDC)


def _split_plan(plan: DecodePlan, rows_r, stream_tokens, n_slots, page_size, block_t, page_pad):
    """(streaming splits, tokens per streaming split, retrieval splits, page slots per retrieval
    split): enough retrieval programs to fill the GPU, each split reading at least
    ``plan.min_split_tokens`` keys. Host integers only: no device sync."""
    pages_per_step = block_t // page_pad
    if plan.n_split is None:
        ns = triton.cdiv(max(stream_tokens, 1), plan.min_split_tokens)
        nr = max(1, min(triton.cdiv(plan.target_programs, max(rows_r, 1)),
                        triton.cdiv(max(n_slots * page_size, 1), plan.min_split_tokens)))
    else:
        ns = nr = plan.n_split
    sps = triton.cdiv(triton.cdiv(max(stream_tokens, 1), ns), block_t) * block_t
    slps = triton.cdiv(triton.cdiv(max(n_slots, 1), nr), pages_per_step) * pages_per_step
    ns = max(triton.cdiv(stream_tokens, sps), 1)
    nr = max(triton.cdiv(n_slots, slps), 1)
    return ns, sps, nr, slps


def sparse_paged_decode(q_stream, sink_k, sink_v, ring_k, ring_v, q_retr, pool_k, pool_v, pages,
                        lengths, sink, local, page_size, scale, out_stream=None, out_retr=None,
                        *, plan: DecodePlan | None = None, newest_page: bool = False):
    """Decode attention of streaming and retrieval heads in one launch (+ a merge launch).

    q_stream ``[B, Hs, G, D]``; sink_k/v ``[B, Hs, sink, D]``; ring_k/v ``[B, Hs, local, D]``;
    q_retr ``[B, Hr, G, D]``; pool_k/v ``[B, Hr, T, D]`` (T a multiple of page_size); pages int
    ``[B, Hr, G, K]`` (-1 or >= T // page_size: empty slot); lengths ``[B]`` (the current token
    counted). Hs or Hr may be 0; D a power of two >= 16; fp16, bf16 or fp32 tensors. Returns
    ``(out_stream, out_retr)`` in the queries' dtypes, written into ``out_stream`` /
    ``out_retr`` when given. ``plan``: launch parameters (:data:`DEFAULT_DECODE_PLAN`).
    ``newest_page``: each retrieval query head also reads its row's newest page unless ``pages``
    holds it (``reference.with_newest_page``), so the caller passes a selection as it is."""
    plan = DEFAULT_DECODE_PLAN if plan is None else plan
    refuse_float64("sparse_paged_decode",
                   "lserve_hf.reference.streaming_decode / lserve_hf.reference.paged_decode",
                   q_stream, sink_k, sink_v, ring_k, ring_v, q_retr, pool_k, pool_v)
    B, Hs, Gs, D = q_stream.shape
    _, Hr, Gr, Dr = q_retr.shape
    if out_stream is None:
        out_stream = torch.empty_like(q_stream)
    if out_retr is None:
        out_retr = torch.empty_like(q_retr)
    if Hs and Hr and (Gs != Gr or D != Dr):
        raise ValueError(f"q_stream {tuple(q_stream.shape)} and q_retr {tuple(q_retr.shape)} differ in "
                         "query heads per KV head or head dim")
    G, D = (Gs, D) if Hs else (Gr, Dr)
    if (Hs + Hr) * G * B == 0:
        return out_stream, out_retr
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} must be a power of two >= 16 (tensor-core tiles); use the "
                         "torch references lserve_hf.reference.streaming_decode / paged_decode")
    sink, local, page_size = int(sink), int(local), int(page_size)
    # Buffers may hold fewer slots than sink / local while no row can fill them (a short prompt):
    # the slots past a row's length are masked, so they are never read.
    if Hs and (sink_k.shape[2] > sink or ring_k.shape[2] > local):
        raise ValueError(f"sink/ring buffers hold {sink_k.shape[2]}/{ring_k.shape[2]} slots, "
                         f"more than sink={sink} and local={local}")
    T = pool_k.shape[2] if Hr else 0
    n_slots = pages.shape[3] + bool(newest_page) if Hr else 0
    stream_tokens = (sink + local) if Hs else 0

    page_pad = triton.next_power_of_2(page_size)
    block_t = max(plan.block_t or 64, page_pad)
    # Triton's pipeline buffers K and V tiles in shared memory: fp32 tiles of D=128 fit 2 stages
    num_stages = min(plan.num_stages, max(2, 131072 // (2 * block_t * D * q_stream.element_size())))
    rows = B * (Hs + Hr) * G
    ns, sps, nr, slps = _split_plan(plan, B * Hr * G, stream_tokens, n_slots, page_size, block_t,
                                    page_pad)
    n_split = max(ns if Hs else 1, nr if Hr else 1)

    # Stand-ins for absent tensors (a kind with no head, an empty sink): never read.
    any_q = q_stream if Hs else q_retr
    qs = q_stream if Hs else any_q
    qr = q_retr if Hr else any_q
    rk = ring_k if Hs else any_q
    rv = ring_v if Hs else any_q
    sk = sink_k if (Hs and sink) else rk
    sv = sink_v if (Hs and sink) else rv
    pk = pool_k if Hr else any_q
    pv = pool_v if Hr else any_q
    pg = pages if Hr else lengths
    pg_stride = pages.stride() if Hr else (0, 0, 0, 0)
    os_ = out_stream if Hs else out_retr
    or_ = out_retr if Hr else out_stream
    lengths = lengths.to(device=any_q.device)

    direct = n_split == 1
    if direct:
        opart = mlpart = os_  # unused
    else:
        opart = torch.empty(n_split, rows, D, dtype=torch.float32, device=any_q.device)
        mlpart = torch.empty(n_split, rows, 2, dtype=torch.float32, device=any_q.device)
    pdl = pdl_options(any_q.device, plan.pdl)
    gdc = gdc_mode(pdl, plan.pdl)
    _sparse_decode_kernel[(B * (Hs * ns + Hr * G * nr),)](
        qs, sk, sv, rk, rv, qr, pk, pv, pg, lengths, os_, or_, opart, mlpart,
        *qs.stride(), *sk.stride(), *sv.stride(), *rk.stride(), *rv.stride(), *qr.stride(),
        *pk.stride(), *pv.stride(), *pg_stride, *os_.stride(), *or_.stride(),
        B, Hs, Hr, G, sink, local, page_size, T // page_size, n_slots,
        float(scale) * 1.4426950408889634, sps, slps, ns, nr,
        BLOCK_T=block_t, PAGE_PAD=page_pad, HEAD_DIM=D, M=max(16, triton.next_power_of_2(G)),
        DIRECT=direct, IEEE=any_q.dtype == torch.float32 or any_q.device.type == "cpu",
        GDC=gdc, SLOT_PAD=triton.next_power_of_2(max(slps, 1)), NEWEST=bool(newest_page) and Hr > 0,
        K_PAD=triton.next_power_of_2(max(n_slots - bool(newest_page), 1)),
        num_warps=plan.num_warps, num_stages=num_stages, **pdl)
    if not direct:
        _combine_kernel[(rows,)](
            opart, mlpart, os_, or_, *os_.stride(), *or_.stride(), Hs, Hr, G, ns, nr,
            SPLIT_PAD=triton.next_power_of_2(n_split), HEAD_DIM=D, GDC=gdc,
            num_warps=4 if n_split >= 16 else 1, **pdl)
    return out_stream, out_retr
