"""Block-sparse prefill attention (LServe, arXiv 2502.14866, section 3 "Prefill").

One launch covers every head. A program owns one query block of one query head and walks only
the key blocks its KV head can see:

* a dense (retrieval) head: the causal range, bounded by ``kv_start`` (left padding) and by an
  optional ``sliding_window``;
* a streaming head: the blocks holding its ``sink`` first real keys, then the blocks of its
  ``local`` band; every other key block is skipped without being loaded;
* with ``blocks`` (dynamic sparsity, ``kernels/prefill_blocks.py``): a dense head walks only the
  key blocks listed for its query block; streaming heads keep their sink and band.

Each visited range is split into boundary blocks, where every token is masked exactly, and inner
blocks, which need no mask. The online softmax is the flash-attention one (base-2 exponentials,
fp32 accumulation). Tiles move through per-thread pointer loads (any GPU) or, on Hopper and
newer, through the tensor copy engine (TMA).

Reference: lserve_hf.reference.prefill_attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from .launch import check_positive, check_power_of_two, refuse_float64
from .prefill_blocks import attend_listed, check_blocks, softmax_step

_BIG = tl.constexpr(1 << 30)  # "no limit" for sink / local / sliding_window: larger than any position difference


@dataclass(frozen=True)
class PrefillPlan:
    """Launch plan of :func:`block_sparse_prefill`: query and key block sizes, warps, pipeline
    stages, and ``tma``: move tiles with Hopper's tensor copy engine (True), with per-thread
    pointer loads (False, the portable path), or None: TMA on sm90+ when the layouts allow it.
    Any plan gives the same result; they differ in speed (:func:`default_prefill_plan`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool | None = None

    def __post_init__(self):
        check_power_of_two("PrefillPlan", block_m=self.block_m, block_n=self.block_n,
                           num_warps=self.num_warps)
        check_positive("PrefillPlan", num_stages=self.num_stages)
        if min(self.block_m, self.block_n) < 16:
            raise ValueError(f"PrefillPlan blocks {self.block_m} x {self.block_n}: tensor-core "
                             "tiles need >= 16")
        if self.tma not in (None, True, False):
            raise ValueError(f"PrefillPlan.tma is {self.tma!r}; use True, False or None")


# Per (head dim, TMA). D=128: the fastest of the sweep (benchmarks/tune_kernels.py) on an H200
# (2026-11-29, 32K, dense + 50% streaming): pointer loads (128, 64, 8, 3) 27.17 ms ((128, 64, 8,
# 4) 27.35, (128, 128, 8, 3) 28.72); TMA (128, 128, 8, 3) 25.03 ms (the 128-key block fits only
# with TMA's smaller register footprint; (128, 64, 8, 3) 27.37). D=64: not swept.
_DEFAULT_PREFILL_PLANS = MappingProxyType({
    (64, False): PrefillPlan(128, 64, 4, 3, tma=False),
    (64, True): PrefillPlan(128, 64, 4, 3, tma=True),
    (128, False): PrefillPlan(128, 64, 8, 3, tma=False),
    (128, True): PrefillPlan(128, 128, 8, 3, tma=True),
})
PREFILL_HEAD_DIMS = (64, 128)


def default_prefill_plan(head_dim: int, tma: bool) -> PrefillPlan:
    """The measured default plan for this head dim with (``tma=True``) or without TMA."""
    plan = _DEFAULT_PREFILL_PLANS.get((int(head_dim), bool(tma)))
    if plan is None:
        raise ValueError(f"head dim {head_dim} is not supported (supported: {PREFILL_HEAD_DIMS}); "
                         "use the torch reference lserve_hf.reference.prefill_attention")
    return plan


def _tma_ok(*tensors) -> bool:
    """The copy engine needs 16-byte aligned bases and strides, unit stride in the head dim, and
    2-byte elements (what the descriptors below are built for)."""
    for t in tensors:
        if t.element_size() != 2 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((st * 2) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _use_tma(q, k, v, out) -> bool:
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (triton >= 3.4)
    except ImportError:
        return False
    return _tma_ok(q, k, v, out)


def _descriptor(t, rows):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            KD, VD, b, hk,
            lo, hi, qpos, start, Skv, sink_e, local_e, window, qk_scale,
            MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi) (multiples of BLOCK_N).

    MASKED blocks apply the exact token mask; the others are known to be fully visible and in
    bounds, so they load without masks. TMA: K and V come through tensor descriptors KD, VD
    ([B, Hkv, Skv, D], block [1, 1, BLOCK_N, D]), whose copy engine zero-fills keys past Skv."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        kpos = start_n + offs_n
        if TMA:
            kt = KD.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM).T
            v = VD.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            kt_ptrs = k_base + kpos[None, :] * stride_kn + offs_d[:, None] * stride_kd   # [D, N]
            v_ptrs = v_base + kpos[:, None] * stride_vn + offs_d[None, :] * stride_vd    # [N, D]
            if MASKED:
                inb = kpos < Skv
                kt = tl.load(kt_ptrs, mask=inb[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=inb[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
        if UPCAST:  # CPU tensors mean the interpreter, whose tl.dot mis-multiplies bf16
            qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt, input_precision=PREC)                                 # [M, N]
        if MASKED:
            qk = qk * qk_scale
            diff = qpos[:, None] - kpos[None, :]
            rel = kpos[None, :] - start
            ok = (rel >= 0) & (diff >= 0) & (kpos[None, :] < Skv) & (diff < window)
            ok = ok & ((rel < sink_e) | (diff < local_e))
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing seen yet
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            # Full block: the scale folds into one FMA per score (qk * scale - m), and the row
            # max is taken on the raw products (scale > 0), as in the Triton flash tutorial.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, m_new, m_use, p, v, PREC, UPCAST)
    return acc, l_i, m_i


# Arguments that change with the prompt length or the batch: runtime values, not specialised (Triton
# would otherwise compile a variant per value class, ==1 or %16, and stall a new prompt length).
# (strides stay specialised: multiples of the head dim at any length, they prove alignment; not
# the key-block lists' strides, which follow the number of blocks and address scalar loads only)
LENGTH_ARGS = {
    "_block_sparse_prefill_kernel": ["B", "Sq", "Skv", "q_offset",
                                     "stride_lb", "stride_lh", "stride_lq", "stride_cb", "stride_ch"],
}


@triton.jit(do_not_specialize=LENGTH_ARGS["_block_sparse_prefill_kernel"])
def _block_sparse_prefill_kernel(
        Q, K, V, O, QD, KD, VD, OD, STREAM, KV_START, ORDER, LISTS, COUNTS,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_lb, stride_lh, stride_lq, stride_cb, stride_ch,
        B, G, Sq, Skv, q_offset, sink, local, window, qk_scale, list_block,
        LISTED: tl.constexpr, HAS_START: tl.constexpr, HAS_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
        TMA: tl.constexpr):
    # Head-major: one head's query blocks after another (heaviest, latest, first), heads in ORDER
    # (dense heads first): the programs running together walk the same keys, and the short
    # streaming programs fill the tail. On an H200 (2026-11-29, 128K, TMA (128, 128, 8, 3)):
    # 249.9 ms dense, 126.3 ms 50% streaming; all heads of one query block after another 256.7
    # and 138.4.
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    idx = pid // n_m
    pid_m = n_m - 1 - pid % n_m
    b = idx % B
    h = tl.load(ORDER + idx // B)
    # LISTED: ORDER is the caller's q_heads, G per KV head of K in K's order
    hk = (idx // B) // G if LISTED else h // G

    start = 0
    if HAS_START:
        start = tl.load(KV_START + b).to(tl.int32)
    is_stream = tl.load(STREAM + hk) != 0
    sink_e = tl.where(is_stream, sink, 0)
    local_e = tl.where(is_stream, local, _BIG)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qpos = q_offset + offs_m
    if TMA:
        q = QD.load([b, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=(offs_m < Sq)[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    # Query positions of this block's real rows.
    q_lo = q_offset + pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, q_offset + Sq) - 1

    # Keys some row may see (lo_key..hi_key) and keys every row sees (full_lo..full_hi), ignoring
    # the streaming window; both bounded by kv_start, causality, the KV length, the window.
    lo_key = tl.maximum(start, q_lo - window + 1)
    hi_key = tl.minimum(Skv, q_hi + 1)
    full_lo = tl.maximum(start, q_hi - window + 1)
    full_hi = tl.minimum(Skv, q_lo + 1)

    # Range 1 (streaming only): the sink keys [start, start + sink).
    s_lo_key = lo_key
    s_hi_key = tl.minimum(hi_key, start + sink_e)
    s_nonempty = s_hi_key > s_lo_key
    s_lo = tl.where(s_nonempty, (s_lo_key // BLOCK_N) * BLOCK_N, 0)
    s_hi = tl.where(s_nonempty, tl.cdiv(s_hi_key, BLOCK_N) * BLOCK_N, 0)
    s_ilo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, s_lo), s_hi)
    s_ihi = tl.maximum(tl.minimum((tl.minimum(full_hi, start + sink_e) // BLOCK_N) * BLOCK_N, s_hi),
                       s_ilo)

    # Range 2: the local band (for a dense head, the whole causal range), after the sink blocks.
    l_lo_key = tl.maximum(lo_key, q_lo - local_e + 1)
    l_nonempty = hi_key > l_lo_key
    l_lo = tl.maximum((l_lo_key // BLOCK_N) * BLOCK_N, s_hi)
    l_hi = tl.where(l_nonempty, tl.cdiv(hi_key, BLOCK_N) * BLOCK_N, 0)
    l_hi = tl.maximum(l_hi, l_lo)
    if HAS_BLOCKS:   # a dense head walks its listed blocks instead (below): no static range
        l_hi = tl.where(is_stream, l_hi, l_lo)
    l_ilo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, q_hi - local_e + 1), BLOCK_N) * BLOCK_N,
                                  l_lo), l_hi)
    l_ihi = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, l_hi), l_ilo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base,
                            stride_kn, stride_kd, stride_vn, stride_vd, KD, VD, b, hk, s_lo, s_ilo, qpos, start, Skv,
                            sink_e, local_e, window, qk_scale, True, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base,
                            stride_kn, stride_kd, stride_vn, stride_vd, KD, VD, b, hk, s_ilo, s_ihi, qpos, start, Skv,
                            sink_e, local_e, window, qk_scale, False, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base,
                            stride_kn, stride_kd, stride_vn, stride_vd, KD, VD, b, hk, s_ihi, s_hi, qpos, start, Skv,
                            sink_e, local_e, window, qk_scale, True, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base,
                            stride_kn, stride_kd, stride_vn, stride_vd, KD, VD, b, hk, l_lo, l_ilo, qpos, start, Skv,
                            sink_e, local_e, window, qk_scale, True, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base,
                            stride_kn, stride_kd, stride_vn, stride_vd, KD, VD, b, hk, l_ilo, l_ihi, qpos, start, Skv,
                            sink_e, local_e, window, qk_scale, False, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base,
                            stride_kn, stride_kd, stride_vn, stride_vd, KD, VD, b, hk, l_ihi, l_hi, qpos, start, Skv,
                            sink_e, local_e, window, qk_scale, True, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)
    if HAS_BLOCKS:
        lq = (pid_m * BLOCK_M) // list_block          # BLOCK_M divides list_block (the wrapper)
        n_list = tl.load(COUNTS + b.to(tl.int64) * stride_cb + hk * stride_ch + lq)
        n_list = tl.where(is_stream, 0, n_list)
        lists = LISTS + b.to(tl.int64) * stride_lb + hk.to(tl.int64) * stride_lh + lq.to(tl.int64) * stride_lq
        acc, l_i, m_i = attend_listed(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                      stride_vd, KD, VD, b, hk, lists, n_list, list_block, full_lo, full_hi,
                                      qpos, start, Skv, window, qk_scale, BLOCK_N, HEAD_DIM, PREC, UPCAST, TMA)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]   # a query that sees no key gets zeros
    if TMA:   # rows past Sq are clipped by the copy engine
        OD.store([b, h, pid_m * BLOCK_M, 0], out.to(OD.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < Sq)[:, None])


def block_sparse_prefill(q, k, v, streaming, sink, local, q_offset=0, kv_start=None, scale=None,
                         sliding_window=None, out=None, *, plan: PrefillPlan | None = None,
                         q_heads=None, blocks=None):
    """LServe prefill attention in one launch; same result as ``reference.prefill_attention``.

    q ``[B, Hq, Sq, D]``; k, v ``[B, Hkv, Skv, D]`` (Hq a multiple of Hkv, KV never repeated;
    fp16, bf16 or fp32; D 64 or 128); ``streaming`` bool ``[Hkv]``; query i sits at position
    ``q_offset + i``; ``kv_start`` int ``[B]`` masks each row's keys before it (sinks count from
    it); ``sliding_window`` bounds every head. ``out`` (``[B, Hq, Sq, D]``, q's dtype) is written
    in full when given. ``plan``: launch parameters; None: :func:`default_prefill_plan` for D,
    with TMA on Hopper and newer when the layouts allow it (a plan's ``tma=True`` raises where
    they do not). ``q_heads``: compute only these query heads of q (int ``[Hkv * G]``, the G
    heads of k's KV head j at ``j*G .. j*G + G-1``) and write only them into ``out``: a prompt
    chunk whose two head kinds keep their keys in different stores runs one call per store
    without copying q or out. ``blocks``: ``(index, count, block)`` key-block lists per KV head of
    k (``lserve_hf.dynamic_prefill.KeyBlocks``): each dense head's query block of ``block`` rows
    reads only its ``count`` listed key blocks of ``block`` keys (indices valid, distinct,
    ascending); streaming heads ignore them. The plan's blocks are capped at ``block``."""
    refuse_float64("block_sparse_prefill", "lserve_hf.reference.prefill_attention", q, k, v)
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    n_heads = Hq if q_heads is None else q_heads.numel()
    if Bk != B or Dk != D or v.shape != k.shape or n_heads % max(Hkv, 1):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "[B, Hq, Sq, D] / [B, Hkv, Skv, D] with Hq (or len(q_heads)) a multiple of Hkv")
    if D not in PREFILL_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported (supported: {PREFILL_HEAD_DIMS}); use the "
                         "torch reference lserve_hf.reference.prefill_attention")
    if streaming.numel() != Hkv:
        raise ValueError(f"streaming has {streaming.numel()} entries for {Hkv} KV heads")
    if out is None:
        out = torch.empty_like(q)
    scale = D ** -0.5 if scale is None else float(scale)
    tma = plan.tma if plan is not None else None
    if tma is None:
        tma = _use_tma(q, k, v, out)
    elif tma and not _tma_ok(q, k, v, out):
        raise ValueError("tma=True needs 2-byte q/k/v/out with unit stride in the head dim and "
                         "16-byte aligned bases and strides")
    if plan is None:
        plan = default_prefill_plan(D, tma)
    bm, bn = plan.block_m, plan.block_n
    stream = streaming.to(device=q.device, dtype=torch.int8)
    if blocks is not None:
        lists, counts, list_block = check_blocks(blocks, B, Hkv, Sq, q.device)
        bm, bn = min(bm, list_block), min(bn, list_block)   # a program's rows lie in one list block
        list_strides = lists.stride()[:3] + counts.stride()[:2]
    else:
        lists, counts, list_block, list_strides = stream, stream, 1, (0,) * 5   # unused
    has_start = kv_start is not None
    start = kv_start.to(device=q.device, dtype=torch.int32) if has_start else stream
    window = _BIG.value if sliding_window is None else int(sliding_window)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if Sq == 0 or B * n_heads == 0:
        return out
    G = n_heads // Hkv
    if q_heads is not None:
        order = q_heads.to(device=q.device, dtype=torch.int32)
    else:
        order = torch.argsort(stream.repeat_interleave(G), stable=True).to(torch.int32)
    if tma:
        descs = (_descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(out, bm))
    else:
        descs = (q, k, v, out)   # unused
    _block_sparse_prefill_kernel[(B * n_heads * triton.cdiv(Sq, bm),)](
        q, k, v, out, *descs, stream, start, order, lists, counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *list_strides,
        B, G, Sq, Skv, int(q_offset), int(sink), int(local), window,
        scale * 1.4426950408889634, list_block,
        LISTED=q_heads is not None, HAS_START=has_start, HAS_BLOCKS=blocks is not None, BLOCK_M=bm,
        BLOCK_N=bn, HEAD_DIM=D,
        PREC=prec, UPCAST=q.device.type == "cpu", TMA=bool(tma),
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out
