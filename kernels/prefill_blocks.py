"""Listed key blocks of the block-sparse prefill (dynamic sparsity of retrieval heads): the
checks of a ``blocks`` argument and the loop a program runs over its listed blocks; also the
online-softmax step that loop shares with the static one in ``block_sparse_prefill.py``.

A list names key blocks of ``block`` tokens (``lserve_hf.dynamic_prefill.KeyBlocks``); the
kernel walks each in steps of its own ``BLOCK_N`` (a divisor of ``block``), all listed steps of a
program in one loop so that the loads of one step overlap the math of the previous ones (a loop
per listed block would be one step long and could not be pipelined). A step that lies inside the
keys every row of the program sees needs no mask; the others (the diagonal band, the block of
``kv_start``, a sliding window's edge, keys past the cache) are masked token by token.

Reference: lserve_hf.reference.prefill_attention (its ``blocks`` argument).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_blocks(blocks, B: int, Hkv: int, Sq: int, device):
    """``(index int32 [B, Hkv, nQ, L], count int32 [B, Hkv, nQ], block)`` of a ``blocks``
    argument, contiguous on ``device``; raises on shapes that do not fit the launch."""
    index, count, block = blocks
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"blocks: block {block!r} must be a power of two >= 16")
    n_q = triton.cdiv(Sq, block)
    if index.dim() != 4 or tuple(index.shape[:3]) != (B, Hkv, n_q) or tuple(count.shape) != (B, Hkv, n_q):
        raise ValueError(f"blocks: index {tuple(index.shape)} and count {tuple(count.shape)} do not fit "
                         f"[B, Hkv, n_query_blocks, L] / [B, Hkv, n_query_blocks] = [{B}, {Hkv}, {n_q}, L] "
                         f"for {Sq} queries in blocks of {block}")
    if index.dtype.is_floating_point or count.dtype.is_floating_point:
        raise ValueError("blocks: index and count must be integer tensors")
    return (index.to(device=device, dtype=torch.int32).contiguous(),
            count.to(device=device, dtype=torch.int32).contiguous(), block)


@triton.jit
def attend_listed(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  KD, VD, b, hk, blocks, n_list, list_block,
                  full_lo, full_hi, qpos, start, Skv, window, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update of a dense head's query block over the ``n_list`` key blocks listed
    at ``blocks`` (``list_block`` tokens each). Steps inside [full_lo, full_hi), the keys every
    row sees, are not masked; the others get the causal, ``kv_start``, window and length mask."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    steps = list_block // BLOCK_N
    inner_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    inner_hi = (full_hi // BLOCK_N) * BLOCK_N
    for t in range(0, n_list * steps):
        start_n = tl.load(blocks + t // steps) * list_block + (t % steps) * BLOCK_N
        kpos = start_n + offs_n
        if TMA:   # the copy engine zero-fills keys past Skv
            kt = KD.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM).T
            v = VD.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            inb = (kpos >= 0) & (kpos < Skv)
            kt = tl.load(k_base + kpos[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=inb[None, :], other=0.0)                                  # [D, N]
            v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=inb[:, None], other=0.0)                                   # [N, D]
        if UPCAST:  # CPU tensors mean the interpreter, whose tl.dot mis-multiplies bf16
            qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt, input_precision=PREC)                                     # [M, N]
        if (start_n < inner_lo) | (start_n >= inner_hi):   # one branch per step, uniform over the program
            diff = qpos[:, None] - kpos[None, :]
            ok = (kpos[None, :] >= start) & (diff >= 0) & (kpos[None, :] < Skv) & (diff < window)
            qk = tl.where(ok, qk, float("-inf"))
        # the scale folds into one FMA per score; masked scores stay -inf (scale > 0)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing seen yet
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, m_new, m_use, p, v, PREC, UPCAST)
    return acc, l_i, m_i


@triton.jit
def softmax_step(acc, l_i, m_i, m_new, m_use, p, v, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The end of an online-softmax step (both prefill loops): rescale the running sum and
    output from the old row max ``m_i`` to ``m_use`` and add ``p @ v``; returns the new state."""
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:  # CPU tensors mean the interpreter, whose tl.dot mis-multiplies bf16
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new
