"""Sparse paged decode attention (LServe section 3 "Decode"): one query token per head.

One launch covers both kinds of head. Each program owns one split of one head's keys
(flash-decoding split-K). Two kernels do it: by default ``_sparse_decode_dot_kernel``, which
computes q k^T and p v as tensor-core products on a 16-row query tile (a streaming program takes
its KV head's whole GQA group, a retrieval program one query head); and ``_sparse_decode_kernel``,
one query head per program with per-thread multiply-adds in fp32 (float64 inputs, and a measured
baseline). Both read:

* a streaming head reads its sink buffer and its ring buffer (``sink + local`` slots; which slots
  hold live tokens follows :func:`lserve_hf.streaming.streaming_decode_slots`);
* a retrieval head reads only its selected physical pages of the KV pool (a paged gather);
  empty slots (-1 or past the pool) and tokens past the row's length are skipped. By default a
  retrieval program of the tensor-core kernel loads its split's page numbers before its loop, so
  no page load waits on a page-number load.

Programs write an unnormalised partial output with its running max and sum; a second, tiny
kernel merges the splits (skipped when there is one split). References:
:func:`lserve_hf.reference.streaming_decode` and :func:`lserve_hf.reference.paged_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_prefill import _descriptor, _tma_ok
from .launch import gdc_end, gdc_mode, gdc_start, pdl_options

# Launch plan, the fastest of benchmarks/bench_kernels.py --sweep on an H200 (2026-11-29, 128K,
# 50% streaming, graph replay, PDL on): the per-thread FMA kernel 27.2 us at its best (1024
# programs); the tensor-core kernel ("mma") 18.0 us at 256 programs of 4 pages with 2 stages; with
# each retrieval program's page numbers loaded before its loop ("prefetch_pages") 17.6 us there,
# and 16.6 us at 128 programs of 8 pages with 3 stages (the key loads no longer wait on a
# page-number load, so a deeper pipeline pays). Pages through the copy engine ("tma") 18.0.
DECODE_PLAN = {
    "target_programs": 128,    # programs to aim for (about 1 per multiprocessor of 132)
    "min_split_tokens": 512,   # a split reads at least this many keys
    "block_t": None,           # keys per step; None: max(64, page size rounded up to 2^k)
    "num_warps": 4,
    "num_stages": 3,
    # Merge the splits in the decode launch itself (the last program of each head to finish
    # merges, through a per-head counter) instead of a second launch. The counters live in a
    # per-device buffer kept between calls, so calls must not run concurrently on two streams.
    # Off: slower on an H200 (2026-11-29, 128K 50%: 28.6 us against 26.4 with the merge launch).
    "fused_combine": False,
    # q k^T and p v on tensor cores (_sparse_decode_dot_kernel); fp16 / bf16 / fp32 queries
    # (float64 ones take the per-thread kernel).
    "mma": True,
    # retrieval pages through the tensor copy engine (sm90+, 2-byte pool, power-of-two page):
    # None = when possible, False = never.
    "tma": False,
    # a retrieval program of the tensor-core decode loads its split's page numbers before its loop
    "prefetch_pages": True,
    # PDL mode of the decode and merge launches (kernels/launch.py): True 16.6 us, "late" 17.4,
    # off 17.7 (decode + merge, same sweep)
    "pdl": True,
}

_COUNTERS: dict = {}   # device -> int32 zeros, one counter per query head (reset by the kernel)


def _counters(device, n):
    """The zeroed split counters of ``device`` (at least n), or None while a CUDA graph is being
    captured and no buffer large enough exists yet (an allocation there would belong to the
    graph's pool)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


@triton.jit
def _ring_slots(idx, hi, sink, local, last):
    """Ring slots of streaming slot numbers idx (>= sink) and whether each holds a live token:
    the token in ring slot j is last - ((last - j) mod local), floor modulo."""
    slot = idx - sink
    rem = (last - slot) % local
    rem = tl.where(rem < 0, rem + local, rem)
    tok = last - rem
    return slot, (idx < hi) & (tok >= sink) & (tok >= 0)


@triton.jit
def _sink_tile(sk, sv, slot, end, length, ssk_n, ssk_d, ssv_n, ssv_d, offs_d):
    """K and V rows of sink slots ``slot`` (live below ``end`` and the row's length), zero else."""
    valid = (slot < end) & (slot < length)
    k = tl.load(sk + slot[:, None] * ssk_n + offs_d[None, :] * ssk_d, mask=valid[:, None], other=0.0)
    v = tl.load(sv + slot[:, None] * ssv_n + offs_d[None, :] * ssv_d, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _ring_tile(rk, rv, idx, hi, sink, local, last, srk_n, srk_d, srv_n, srv_d, offs_d):
    """K and V rows of streaming slot numbers ``idx`` (>= sink) from the ring buffer."""
    slot, valid = _ring_slots(idx, hi, sink, local, last)
    k = tl.load(rk + slot[:, None] * srk_n + offs_d[None, :] * srk_d, mask=valid[:, None], other=0.0)
    v = tl.load(rv + slot[:, None] * srv_n + offs_d[None, :] * srv_d, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _page_tile(pg, pk, pv, slot, hi, within, page_size, n_pool_pages, length,
               spg_k, spk_t, spk_d, spv_t, spv_d, offs_d):
    """K and V rows of the selected pages in page slots ``slot`` (a page per PAGE_PAD rows,
    ``within`` the row's token in its page); empty slots and tokens past the length are zero."""
    page = tl.load(pg + slot * spg_k, mask=slot < hi, other=-1)
    return _page_rows(pk, pv, page, within, page_size, n_pool_pages, length,
                      spk_t, spk_d, spv_t, spv_d, offs_d)


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
def _online_update(acc, l_i, m_i, q, k, v, valid, qk_scale):
    """Fold one block of keys (rows of k, v; invalid rows already zeroed) into the running state."""
    s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
    return acc, l_i, m_new


@triton.jit
def _merge_splits(OPART, MLPART, row, n_rows, n_split, SPLIT_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, CG: tl.constexpr):
    """out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the splits of one query head.
    CG: read around L1 (the partials were written by other programs of the same launch)."""
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    part = offs_s.to(tl.int64) * n_rows + row
    ok = offs_s < n_split
    if CG:
        m = tl.load(MLPART + part * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(MLPART + part * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        o = tl.load(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0,
                    cache_modifier=".cg")
    else:
        m = tl.load(MLPART + part * 2, mask=ok, other=float("-inf"))
        l = tl.load(MLPART + part * 2 + 1, mask=ok, other=0.0)
        o = tl.load(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(l * w, 0)
    return tl.sum(o * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)


@triton.jit
def _store_head(out, OS, OR, b, hh, g, Hs, sos_b, sos_h, sos_g, sos_d, sor_b, sor_h, sor_g, sor_d, offs_d):
    """Write one query head's output to the streaming or the retrieval output, by its kind."""
    if hh < Hs:
        tl.store(OS + b * sos_b + hh.to(tl.int64) * sos_h + g * sos_g + offs_d * sos_d,
                 out.to(OS.dtype.element_ty))
    else:
        tl.store(OR + b * sor_b + (hh - Hs).to(tl.int64) * sor_h + g * sor_g + offs_d * sor_d,
                 out.to(OR.dtype.element_ty))


@triton.jit
def _sparse_decode_kernel(
        QS, SK, SV, RK, RV, QR, PK, PV, PAGES, LENGTHS, OS, OR, OPART, MLPART, COUNTER,
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
        BLOCK_T: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        DIRECT: tl.constexpr, FUSED: tl.constexpr, SPLIT_PAD: tl.constexpr):
    # Work items: retrieval (row, split) pairs first (the long ones), then streaming ones; each
    # kind has its own split count, so no program is launched for an empty split.
    pid = tl.program_id(0)
    n_rows = B * (Hs + Hr) * G
    n_retr = B * Hr * G * n_split_r
    if pid < n_retr:
        r = pid // n_split_r
        split = pid % n_split_r
        b = r // (Hr * G)
        hh = Hs + (r % (Hr * G)) // G
        n_split_row = n_split_r
    else:
        r = (pid - n_retr) // n_split_s
        split = (pid - n_retr) % n_split_s
        b = r // (Hs * G)
        hh = (r % (Hs * G)) // G
        n_split_row = n_split_s
    g = r % G
    row = (b * (Hs + Hr) + hh) * G + g
    length = tl.load(LENGTHS + b).to(tl.int32)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    l_i = tl.zeros([1], tl.float32)
    m_i = tl.full([1], float("-inf"), tl.float32)
    b64 = b.to(tl.int64)

    if hh < Hs:
        # Streaming head: slots [0, sink) of the sink buffer then [0, local) of the ring buffer,
        # numbered 0 .. sink + local - 1; this split reads [lo, hi) of them.
        h = hh.to(tl.int64)
        q = tl.load(QS + b64 * sqs_b + h * sqs_h + g * sqs_g + offs_d * sqs_d).to(tl.float32)
        lo = split * stream_per_split
        hi = tl.minimum(lo + stream_per_split, sink + local)
        sk = SK + b64 * ssk_b + h * ssk_h
        sv = SV + b64 * ssv_b + h * ssv_h
        for t0 in range(lo, tl.minimum(hi, sink), BLOCK_T):
            k, v, valid = _sink_tile(sk, sv, t0 + offs_t, tl.minimum(hi, sink), length,
                                     ssk_n, ssk_d, ssv_n, ssv_d, offs_d)
            acc, l_i, m_i = _online_update(acc, l_i, m_i, q, k, v, valid, qk_scale)
        rk = RK + b64 * srk_b + h * srk_h
        rv = RV + b64 * srv_b + h * srv_h
        last = length - 1
        for t0 in range(tl.maximum(lo, sink), hi, BLOCK_T):
            k, v, valid = _ring_tile(rk, rv, t0 + offs_t, hi, sink, local, last,
                                     srk_n, srk_d, srv_n, srv_d, offs_d)
            acc, l_i, m_i = _online_update(acc, l_i, m_i, q, k, v, valid, qk_scale)
    else:
        # Retrieval head: selected page slots [lo, hi) of this query head; BLOCK_T // PAGE_PAD
        # pages per step, each page a contiguous run of the pool.
        h = (hh - Hs).to(tl.int64)
        q = tl.load(QR + b64 * sqr_b + h * sqr_h + g * sqr_g + offs_d * sqr_d).to(tl.float32)
        lo = split * slots_per_split
        hi = tl.minimum(lo + slots_per_split, n_slots)
        pg = PAGES + b64 * spg_b + h * spg_h + g * spg_g
        pk = PK + b64 * spk_b + h * spk_h
        pv = PV + b64 * spv_b + h * spv_h
        within = offs_t % PAGE_PAD
        for s0 in range(lo, hi, BLOCK_T // PAGE_PAD):
            k, v, valid = _page_tile(pg, pk, pv, s0 + offs_t // PAGE_PAD, hi, within, page_size,
                                     n_pool_pages, length, spg_k, spk_t, spk_d, spv_t, spv_d, offs_d)
            acc, l_i, m_i = _online_update(acc, l_i, m_i, q, k, v, valid, qk_scale)

    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)   # a head that sees no key gets zeros
        _store_head(out, OS, OR, b64, hh, g, Hs, sos_b, sos_h, sos_g, sos_d, sor_b, sor_h, sor_g, sor_d, offs_d)
    else:
        part = split.to(tl.int64) * n_rows + row
        tl.store(OPART + part * HEAD_DIM + offs_d, acc)
        tl.store(MLPART + part * 2 + tl.arange(0, 1), m_i)
        tl.store(MLPART + part * 2 + 1 + tl.arange(0, 1), l_i)
        if FUSED:
            # The last split of this head to finish merges them all (no second launch): the
            # barrier orders every thread's partial stores before the releasing counter bump.
            tl.debug_barrier()
            done = tl.atomic_add(COUNTER + row, 1, sem="acq_rel")
            if done == n_split_row - 1:
                out = _merge_splits(OPART, MLPART, row, n_rows, n_split_row, SPLIT_PAD,
                                    HEAD_DIM, True)
                _store_head(out, OS, OR, b64, hh, g, Hs, sos_b, sos_h, sos_g, sos_d,
                            sor_b, sor_h, sor_g, sor_d, offs_d)
                tl.atomic_xchg(COUNTER + row, 0)   # ready for the next call (or graph replay)


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


@triton.jit
def _sparse_decode_dot_kernel(
        QS, SK, SV, RK, RV, QR, PK, PV, PKD, PVD, PAGES, LENGTHS, OS, OR, OPART, MLPART, COUNTER,
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
        DIRECT: tl.constexpr, IEEE: tl.constexpr, FUSED: tl.constexpr, SPLIT_PAD: tl.constexpr,
        TMA: tl.constexpr, GDC: tl.constexpr, PREFETCH: tl.constexpr, SLOT_PAD: tl.constexpr):
    """The decode of _sparse_decode_kernel with q k^T and p v as tensor-core products.

    A streaming program owns one KV head's whole group (its G query heads share the sink and ring
    buffers, so the keys are read once for all of them); a retrieval program owns one query head
    (each selects its own pages), its query in row 0 of an M-row tile whose other rows are zero.
    Work items: retrieval (query head, split) pairs first, then streaming (KV head, split) pairs.
    TMA: a retrieval page (BLOCK_T == page size, a power of two) is one contiguous tile of the
    pool, so the copy engine fetches it through the descriptors PKD, PVD ([B, Hr, T, D], block
    [1, 1, page, D]) asynchronously, without a register or an address per element.
    PREFETCH: a retrieval program loads its SLOT_PAD (>= its split's) page numbers before its loop.
    GDC: launched with PDL (kernels/launch.py) in that mode."""
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
        hh = Hs + h
        n_split_row = n_split_r
        row0 = (b * (Hs + Hr) + Hs + h) * G + g0
    else:
        r = (pid - n_retr) // n_split_s
        split = (pid - n_retr) % n_split_s
        b = r // Hs
        h = (r % Hs).to(tl.int64)
        g0 = 0
        n_q = G
        hh = h
        n_split_row = n_split_s
        row0 = (b * (Hs + Hr) + h) * G
    b64 = b.to(tl.int64)
    length = tl.load(LENGTHS + b).to(tl.int32)
    live = offs_m < n_q

    if pid >= n_retr:
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
        q = tl.load(QR + b64 * sqr_b + h * sqr_h + g0 * sqr_g + offs_m[:, None] * 0 + offs_d[None, :] * sqr_d,
                    mask=live[:, None], other=0.0)
        lo = split * slots_per_split
        hi = tl.minimum(lo + slots_per_split, n_slots)
        pg = PAGES + b64 * spg_b + h * spg_h + g0 * spg_g
        pk = PK + b64 * spk_b + h * spk_h
        pv = PV + b64 * spv_b + h * spv_h
        if PREFETCH:
            # The split's page numbers in registers first: a key load then never waits on a
            # page-number load, so the pipeliner can issue the next pages' loads early.
            slots = lo + tl.arange(0, SLOT_PAD)
            plist = tl.load(pg + slots * spg_k, mask=slots < hi, other=-1)
        if TMA:
            for s0 in range(lo, hi):
                if PREFETCH:
                    page = tl.sum(tl.where(slots == s0, plist, 0), 0)
                else:
                    page = tl.load(pg + s0 * spg_k)
                ok_page = (page >= 0) & (page < n_pool_pages)
                first = (tl.where(ok_page, page, 0) * page_size).to(tl.int32)
                valid = ok_page & (first + offs_t < length)
                k = PKD.load([b.to(tl.int32), h.to(tl.int32), first, 0]).reshape(BLOCK_T, HEAD_DIM)
                v = PVD.load([b.to(tl.int32), h.to(tl.int32), first, 0]).reshape(BLOCK_T, HEAD_DIM)
                v = tl.where(valid[:, None], v, 0.0)   # tokens past the length may hold NaN
                acc, l_i, m_i = _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE)
        elif PREFETCH:
            within = offs_t % PAGE_PAD
            for s0 in range(lo, hi, BLOCK_T // PAGE_PAD):
                page = _slot_pages(plist, slots, s0 + offs_t // PAGE_PAD, hi)
                k, v, valid = _page_rows(pk, pv, page, within, page_size, n_pool_pages, length,
                                         spk_t, spk_d, spv_t, spv_d, offs_d)
                acc, l_i, m_i = _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE)
        else:
            within = offs_t % PAGE_PAD
            for s0 in range(lo, hi, BLOCK_T // PAGE_PAD):
                k, v, valid = _page_tile(pg, pk, pv, s0 + offs_t // PAGE_PAD, hi, within, page_size,
                                         n_pool_pages, length, spg_k, spk_t, spk_d, spv_t, spv_d, offs_d)
                acc, l_i, m_i = _dot_update(acc, l_i, m_i, q, k, v, valid, qk_scale, IEEE)

    rows = row0 + offs_m
    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]   # a head that sees no key gets zeros
        if pid >= n_retr:
            tl.store(OS + b64 * sos_b + h * sos_h + offs_m[:, None] * sos_g + offs_d[None, :] * sos_d,
                     out.to(OS.dtype.element_ty), mask=live[:, None])
        else:
            tl.store(OR + b64 * sor_b + h * sor_h + (g0 + offs_m[:, None]) * sor_g + offs_d[None, :] * sor_d,
                     out.to(OR.dtype.element_ty), mask=live[:, None])
    else:
        part = split.to(tl.int64) * n_rows + rows
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=live[:, None])
        tl.store(MLPART + part * 2, m_i, mask=live)
        tl.store(MLPART + part * 2 + 1, l_i, mask=live)
        if FUSED:
            # The last split of this row group to finish merges its rows (see _sparse_decode_kernel).
            tl.debug_barrier()
            done = tl.atomic_add(COUNTER + row0, 1, sem="acq_rel")
            if done == n_split_row - 1:
                for j in range(n_q):
                    out = _merge_splits(OPART, MLPART, row0 + j, n_rows, n_split_row, SPLIT_PAD,
                                        HEAD_DIM, True)
                    _store_head(out, OS, OR, b64, hh, g0 + j, Hs, sos_b, sos_h, sos_g, sos_d,
                                sor_b, sor_h, sor_g, sor_d, offs_d)
                tl.atomic_xchg(COUNTER + row0, 0)
    gdc_end(GDC)


@triton.jit
def _combine_kernel(OPART, MLPART, OS, OR,
                    sos_b, sos_h, sos_g, sos_d,
                    sor_b, sor_h, sor_g, sor_d,
                    Hs, Hr, G, n_split_s, n_split_r,
                    SPLIT_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, GDC: tl.constexpr):
    """Merge the splits of one query head: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s."""
    gdc_start(GDC)
    row = tl.program_id(0)
    n_rows = tl.num_programs(0)
    per_b = (Hs + Hr) * G
    b = (row // per_b).to(tl.int64)
    hh = (row % per_b) // G
    g = row % G
    offs_d = tl.arange(0, HEAD_DIM)
    n_split = tl.where(hh < Hs, n_split_s, n_split_r)
    out = _merge_splits(OPART, MLPART, row, n_rows, n_split, SPLIT_PAD, HEAD_DIM, False)
    _store_head(out, OS, OR, b, hh, g, Hs, sos_b, sos_h, sos_g, sos_d, sor_b, sor_h, sor_g, sor_d, offs_d)
    gdc_end(GDC)


def _tma_pages_ok(pool_k, pool_v, page_size) -> bool:
    return (page_size & (page_size - 1) == 0 and 16 <= page_size <= 256
            and _tma_ok(pool_k, pool_v))


def _split_plan(rows_s, rows_r, stream_tokens, n_slots, page_size, block_t, page_pad, n_split=None):
    """(streaming splits, tokens per streaming split, retrieval splits, page slots per retrieval
    split): enough retrieval programs to fill the GPU, each split reading at least
    min_split_tokens keys. Host integers only: no device sync."""
    pages_per_step = block_t // page_pad
    min_tokens = DECODE_PLAN["min_split_tokens"]
    if n_split is None:
        ns = triton.cdiv(max(stream_tokens, 1), min_tokens)
        nr = max(1, min(triton.cdiv(DECODE_PLAN["target_programs"], max(rows_r, 1)),
                        triton.cdiv(max(n_slots * page_size, 1), min_tokens)))
    else:
        ns = nr = max(1, int(n_split))
    sps = triton.cdiv(triton.cdiv(max(stream_tokens, 1), ns), block_t) * block_t
    slps = triton.cdiv(triton.cdiv(max(n_slots, 1), nr), pages_per_step) * pages_per_step
    ns = max(triton.cdiv(stream_tokens, sps), 1)
    nr = max(triton.cdiv(n_slots, slps), 1)
    return ns, sps, nr, slps


def sparse_paged_decode(q_stream, sink_k, sink_v, ring_k, ring_v, q_retr, pool_k, pool_v, pages,
                        lengths, sink, local, page_size, scale, out_stream=None, out_retr=None,
                        *, n_split=None, block_t=None, num_warps=None, num_stages=None,
                        fused_combine=None, mma=None, tma=None, prefetch=None):
    """Decode attention of streaming and retrieval heads in one launch (+ a merge launch).

    q_stream ``[B, Hs, G, D]``; sink_k/v ``[B, Hs, sink, D]``; ring_k/v ``[B, Hs, local, D]``;
    q_retr ``[B, Hr, G, D]``; pool_k/v ``[B, Hr, T, D]`` (T a multiple of page_size); pages int
    ``[B, Hr, G, K]`` (-1 or >= T // page_size: empty slot); lengths ``[B]`` (the current token
    counted). Hs or Hr may be 0. Returns ``(out_stream, out_retr)`` in the queries' dtypes,
    written into ``out_stream`` / ``out_retr`` when given. ``n_split``, ``block_t`` and
    ``num_warps``, ``num_stages``, ``fused_combine``, ``mma``, ``tma``, ``prefetch`` override
    ``DECODE_PLAN`` (tuning only; ``tma=True`` raises where the copy engine cannot load the pool's
    pages)."""
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
    if D & (D - 1):
        raise ValueError(f"head dim {D} must be a power of two")
    sink, local, page_size = int(sink), int(local), int(page_size)
    if Hs and (sink_k.shape[2] != sink or ring_k.shape[2] != local):
        raise ValueError(f"sink/ring buffers hold {sink_k.shape[2]}/{ring_k.shape[2]} slots, "
                         f"expected sink={sink} and local={local}")
    T = pool_k.shape[2] if Hr else 0
    n_slots = pages.shape[3] if Hr else 0
    stream_tokens = (sink + local) if Hs else 0

    page_pad = triton.next_power_of_2(page_size)
    block_t = block_t or DECODE_PLAN["block_t"] or max(64, page_pad)
    num_warps = num_warps or DECODE_PLAN["num_warps"]
    num_stages = num_stages or DECODE_PLAN["num_stages"]
    block_t = max(int(block_t), page_pad)
    # Triton's pipeline buffers K and V tiles in shared memory: fp32 tiles of D=128 fit 2 stages
    num_stages = min(num_stages, max(2, 131072 // (2 * block_t * D * q_stream.element_size())))
    rows = B * (Hs + Hr) * G
    ns, sps, nr, slps = _split_plan(B * Hs * G, B * Hr * G, stream_tokens, n_slots, page_size,
                                    block_t, page_pad, n_split)
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
    mma_ok = any_q.dtype in (torch.float16, torch.bfloat16, torch.float32) and D >= 16
    use_mma = DECODE_PLAN["mma"] and mma_ok if mma is None else mma
    if use_mma and not mma_ok:
        raise ValueError(f"the tensor-core decode takes fp16/bf16/fp32 queries and head dim >= 16, "
                         f"got {any_q.dtype} and {D}; pass mma=False")
    for name, on in (("tma", tma), ("prefetch", prefetch)):
        if on and not use_mma:
            raise ValueError(f"{name}=True loads pages for the tensor-core decode; pass mma=True as well")
    prefetch = DECODE_PLAN["prefetch_pages"] if prefetch is None else prefetch
    counters = None
    if direct:
        opart = mlpart = os_  # unused
    else:
        opart = torch.empty(n_split, rows, D, dtype=torch.float32, device=any_q.device)
        mlpart = torch.empty(n_split, rows, 2, dtype=torch.float32, device=any_q.device)
        if DECODE_PLAN.get("fused_combine") if fused_combine is None else fused_combine:
            counters = _counters(any_q.device, rows)
    fused = counters is not None
    pdl = pdl_options(any_q.device, DECODE_PLAN["pdl"])
    if use_mma:
        tma = DECODE_PLAN.get("tma") if tma is None else tma
        tma_ok = bool(Hr) and _tma_pages_ok(pool_k, pool_v, page_size)
        if tma and not tma_ok:
            raise ValueError("tma=True needs 2-byte pool tensors with 16-byte aligned bases and "
                             "strides, unit head-dim stride, and a power-of-two page of 16-256 tokens")
        if tma is None:
            tma = tma_ok and any_q.device.type == "cuda" and \
                torch.cuda.get_device_capability(any_q.device)[0] >= 9
        if tma:
            pkd, pvd = _descriptor(pool_k, page_size), _descriptor(pool_v, page_size)
            block_t = page_size
        else:
            pkd, pvd = pk, pv   # unused
        _sparse_decode_dot_kernel[(B * (Hs * ns + Hr * G * nr),)](
            qs, sk, sv, rk, rv, qr, pk, pv, pkd, pvd, pg, lengths, os_, or_, opart, mlpart,
            counters if fused else lengths,
            *qs.stride(), *sk.stride(), *sv.stride(), *rk.stride(), *rv.stride(), *qr.stride(),
            *pk.stride(), *pv.stride(), *pg_stride, *os_.stride(), *or_.stride(),
            B, Hs, Hr, G, sink, local, page_size, T // page_size, n_slots,
            float(scale) * 1.4426950408889634, sps, slps, ns, nr,
            BLOCK_T=block_t, PAGE_PAD=page_pad, HEAD_DIM=D, M=max(16, triton.next_power_of_2(G)),
            DIRECT=direct, IEEE=any_q.dtype == torch.float32 or any_q.device.type == "cpu",
            FUSED=fused, SPLIT_PAD=triton.next_power_of_2(n_split), TMA=bool(tma),
            GDC=gdc_mode(pdl, DECODE_PLAN["pdl"]), PREFETCH=bool(prefetch),
            SLOT_PAD=triton.next_power_of_2(max(slps, 1)),
            num_warps=num_warps, num_stages=num_stages, **pdl)
    else:
        _sparse_decode_kernel[(B * (Hs * G * ns + Hr * G * nr),)](
            qs, sk, sv, rk, rv, qr, pk, pv, pg, lengths, os_, or_, opart, mlpart,
            counters if fused else lengths,
            *qs.stride(), *sk.stride(), *sv.stride(), *rk.stride(), *rv.stride(), *qr.stride(),
            *pk.stride(), *pv.stride(), *pg_stride, *os_.stride(), *or_.stride(),
            B, Hs, Hr, G, sink, local, page_size, T // page_size, n_slots,
            float(scale) * 1.4426950408889634, sps, slps, ns, nr,
            BLOCK_T=block_t, PAGE_PAD=page_pad, HEAD_DIM=D, DIRECT=direct, FUSED=fused,
            SPLIT_PAD=triton.next_power_of_2(n_split), num_warps=num_warps, num_stages=num_stages)
    if not direct and not fused:
        merge_pdl = pdl if use_mma else {}
        _combine_kernel[(rows,)](
            opart, mlpart, os_, or_, *os_.stride(), *or_.stride(), Hs, Hr, G, ns, nr,
            SPLIT_PAD=triton.next_power_of_2(n_split), HEAD_DIM=D, GDC=gdc_mode(merge_pdl, DECODE_PLAN["pdl"]),
            num_warps=4 if n_split >= 16 else 1, **merge_pdl)
    return out_stream, out_retr
