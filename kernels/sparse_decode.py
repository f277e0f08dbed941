"""Sparse paged decode attention (LServe section 3 "Decode"): one query token per head.

One launch covers both kinds of head. Each program owns one query head of one row and one split
of that head's keys (flash-decoding split-K):

* a streaming head reads its sink buffer and its ring buffer (``sink + local`` slots; which slots
  hold live tokens follows :func:`lserve_hf.streaming.streaming_decode_slots`);
* a retrieval head reads only its selected physical pages of the KV pool (a paged gather);
  empty slots (-1 or past the pool) and tokens past the row's length are skipped.

Programs write an unnormalised partial output with its running max and sum; a second, tiny
kernel merges the splits (skipped when there is one split). References:
:func:`lserve_hf.reference.streaming_decode` and :func:`lserve_hf.reference.paged_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch plan, the fastest of benchmarks/bench_kernels.py --sweep on an H200 (2026-11-29, 128K,
# 50% streaming: 26.4 us; 2048/64 tied, 528/256 with 3 stages 32.4 us). At batch 1 a split is a
# page or two, so no program walks a long chain of page-table-then-page loads.
DECODE_PLAN = {
    "target_programs": 1024,   # programs to aim for (about 8 per multiprocessor of 132)
    "min_split_tokens": 128,   # a split reads at least this many keys
    "block_t": None,           # keys per step; None: max(64, page size rounded up to 2^k)
    "num_warps": 4,
    "num_stages": 1,
    # Merge the splits in the decode launch itself (the last program of each head to finish
    # merges, through a per-head counter) instead of a second launch. The counters live in a
    # per-device buffer kept between calls, so calls must not run concurrently on two streams.
    # Off: slower on an H200 (2026-11-29, 128K 50%: 28.6 us against 26.4 with the merge launch).
    "fused_combine": False,
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
            slot = t0 + offs_t
            valid = (slot < tl.minimum(hi, sink)) & (slot < length)
            k = tl.load(sk + slot[:, None] * ssk_n + offs_d[None, :] * ssk_d, mask=valid[:, None], other=0.0)
            v = tl.load(sv + slot[:, None] * ssv_n + offs_d[None, :] * ssv_d, mask=valid[:, None], other=0.0)
            acc, l_i, m_i = _online_update(acc, l_i, m_i, q, k, v, valid, qk_scale)
        rk = RK + b64 * srk_b + h * srk_h
        rv = RV + b64 * srv_b + h * srv_h
        last = length - 1
        for t0 in range(tl.maximum(lo, sink), hi, BLOCK_T):
            slot = t0 + offs_t - sink
            # Token held by ring slot j: last - ((last - j) mod local), floor modulo.
            rem = (last - slot) % local
            rem = tl.where(rem < 0, rem + local, rem)
            tok = last - rem
            valid = (t0 + offs_t < hi) & (tok >= sink) & (tok >= 0)
            k = tl.load(rk + slot[:, None] * srk_n + offs_d[None, :] * srk_d, mask=valid[:, None], other=0.0)
            v = tl.load(rv + slot[:, None] * srv_n + offs_d[None, :] * srv_d, mask=valid[:, None], other=0.0)
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
            slot = s0 + offs_t // PAGE_PAD
            page = tl.load(pg + slot * spg_k, mask=slot < hi, other=-1)
            tok = page * page_size + within
            valid = (page >= 0) & (page < n_pool_pages) & (within < page_size) & (tok < length)
            tok = tok.to(tl.int64)
            k = tl.load(pk + tok[:, None] * spk_t + offs_d[None, :] * spk_d, mask=valid[:, None], other=0.0)
            v = tl.load(pv + tok[:, None] * spv_t + offs_d[None, :] * spv_d, mask=valid[:, None], other=0.0)
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
def _combine_kernel(OPART, MLPART, OS, OR,
                    sos_b, sos_h, sos_g, sos_d,
                    sor_b, sor_h, sor_g, sor_d,
                    Hs, Hr, G, n_split_s, n_split_r,
                    SPLIT_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the splits of one query head: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s."""
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
                        fused_combine=None):
    """Decode attention of streaming and retrieval heads in one launch (+ a merge launch).

    q_stream ``[B, Hs, G, D]``; sink_k/v ``[B, Hs, sink, D]``; ring_k/v ``[B, Hs, local, D]``;
    q_retr ``[B, Hr, G, D]``; pool_k/v ``[B, Hr, T, D]`` (T a multiple of page_size); pages int
    ``[B, Hr, G, K]`` (-1 or >= T // page_size: empty slot); lengths ``[B]`` (the current token
    counted). Hs or Hr may be 0. Returns ``(out_stream, out_retr)`` in the queries' dtypes,
    written into ``out_stream`` / ``out_retr`` when given. ``n_split``, ``block_t`` and
    ``num_warps``, ``num_stages`` override ``DECODE_PLAN`` (tuning only)."""
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
    counters = None
    if direct:
        opart = mlpart = os_  # unused
    else:
        opart = torch.empty(n_split, rows, D, dtype=torch.float32, device=any_q.device)
        mlpart = torch.empty(n_split, rows, 2, dtype=torch.float32, device=any_q.device)
        if DECODE_PLAN.get("fused_combine") if fused_combine is None else fused_combine:
            counters = _counters(any_q.device, rows)
    fused = counters is not None
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
        _combine_kernel[(rows,)](
            opart, mlpart, os_, or_, *os_.stride(), *or_.stride(), Hs, Hr, G, ns, nr,
            SPLIT_PAD=triton.next_power_of_2(n_split), HEAD_DIM=D, num_warps=4 if n_split >= 16 else 1)
    return out_stream, out_retr
