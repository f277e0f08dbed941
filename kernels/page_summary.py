"""Page summaries for query-aware page selection (Quest, as used by LServe section 2).

For each logical page of each retrieval KV head, the per-channel max and min of its keys.
:func:`build_page_summaries` makes them at prefill; :func:`update_page_summaries` folds one new
decode token per row into its page in place. An empty page holds max -inf and min +inf, so an
update needs no branch. Max and min run in fp32, exact for fp16, bf16 and fp32 keys.

Reference: lserve_hf.reference.page_summaries and lserve_hf.reference.update_page_summaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import refuse_float64


# Arguments that change with the context length or the batch: runtime values, not specialised (Triton
# would otherwise compile a variant per value class, ==1 or %16, and stall a new prompt length).
# (strides stay specialised: multiples of the head dim at any length, they prove alignment)
LENGTH_ARGS = {
    "_build_kernel": ["NL"],
    "_update_kernel": ["NL"],
}


@triton.jit(do_not_specialize=LENGTH_ARGS["_build_kernel"])
def _build_kernel(KEYS, LENGTHS, KMAX, KMIN,
                  stride_kb, stride_kh, stride_kt, stride_kd,
                  stride_sb, stride_sh, stride_sp, stride_sd,
                  H, NL, LP,
                  PAGES: tl.constexpr, LP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program: PAGES logical pages of one (row, head)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.load(LENGTHS + b)
    offs_t = tl.arange(0, LP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = KEYS + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    s_off = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    for i in tl.static_range(PAGES):
        page = tl.program_id(1) * PAGES + i
        tok = page * LP + offs_t
        valid = (offs_t < LP) & (tok < length)
        keys = tl.load(k_base + tok.to(tl.int64)[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                       mask=valid[:, None], other=0.0).to(tl.float32)
        kmax = tl.max(tl.where(valid[:, None], keys, float("-inf")), 0)
        kmin = tl.min(tl.where(valid[:, None], keys, float("inf")), 0)
        ok = (offs_d * 0 + page) < NL
        ptr = s_off + page.to(tl.int64) * stride_sp + offs_d * stride_sd
        tl.store(KMAX + ptr, kmax.to(KMAX.dtype.element_ty), mask=ok)
        tl.store(KMIN + ptr, kmin.to(KMIN.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=LENGTH_ARGS["_update_kernel"])
def _update_kernel(NEW, POS, KMAX, KMIN,
                   stride_nb, stride_nh, stride_nd,
                   stride_sb, stride_sh, stride_sp, stride_sd,
                   H, NL, LP, HEAD_DIM: tl.constexpr):
    """One program per (row, head): fold the row's new key into its logical page."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    pos = tl.load(POS + b)
    page = pos // LP
    offs_d = tl.arange(0, HEAD_DIM)
    pos_d = offs_d * 0 + pos
    ok = (pos_d >= 0) & (pos_d // LP < NL)   # a position outside the pages: no-op
    new = tl.load(NEW + b.to(tl.int64) * stride_nb + h.to(tl.int64) * stride_nh + offs_d * stride_nd)
    ptr = (b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + page.to(tl.int64) * stride_sp
           + offs_d * stride_sd)
    kmax = tl.load(KMAX + ptr, mask=ok, other=0.0)
    kmin = tl.load(KMIN + ptr, mask=ok, other=0.0)
    new = new.to(KMAX.dtype.element_ty).to(tl.float32)   # max / min in fp32: exact for any input
    kmax = tl.maximum(kmax.to(tl.float32), new)
    kmin = tl.minimum(kmin.to(tl.float32), new)
    tl.store(KMAX + ptr, kmax.to(KMAX.dtype.element_ty), mask=ok)
    tl.store(KMIN + ptr, kmin.to(KMIN.dtype.element_ty), mask=ok)


def build_page_summaries(keys: torch.Tensor, lengths: torch.Tensor, logical_page_size: int):
    """(kmax, kmin), each ``[B, H, T // logical_page_size, D]`` in keys' dtype, of keys
    ``[B, H, T, D]`` (T a multiple of the logical page size); tokens ``t >= lengths[b]`` do not
    count and a page with none holds -inf / +inf."""
    refuse_float64("build_page_summaries", "lserve_hf.reference.page_summaries", keys)
    B, H, T, D = keys.shape
    lp = int(logical_page_size)
    if T % lp:
        raise ValueError(f"cache length {T} is not a multiple of logical_page_size={lp}")
    if D & (D - 1):
        raise ValueError(f"head dim {D} must be a power of two")
    NL = T // lp
    kmax = torch.empty(B, H, NL, D, dtype=keys.dtype, device=keys.device)
    kmin = torch.empty_like(kmax)
    if kmax.numel() == 0:
        return kmax, kmin
    pages = 4
    lengths = lengths.to(device=keys.device)
    _build_kernel[(B * H, triton.cdiv(NL, pages))](
        keys, lengths, kmax, kmin, *keys.stride(), *kmax.stride(), H, NL, lp,
        PAGES=pages, LP_PAD=triton.next_power_of_2(lp), HEAD_DIM=D, num_warps=4)
    return kmax, kmin


def update_page_summaries(kmax: torch.Tensor, kmin: torch.Tensor, new_keys: torch.Tensor,
                          positions: torch.Tensor, logical_page_size: int) -> None:
    """In place: fold ``new_keys`` ``[B, H, D]`` (or ``[B, H, 1, D]``), the token at index
    ``positions[b]`` of row b, into logical page ``positions[b] // logical_page_size`` of
    ``kmax``/``kmin`` ``[B, H, NL, D]`` by max / min. A position outside the pages is ignored."""
    refuse_float64("update_page_summaries", "lserve_hf.reference.update_page_summaries",
                   kmax, kmin, new_keys)
    if new_keys.dim() == 4:
        new_keys = new_keys.squeeze(2)
    B, H, NL, D = kmax.shape
    if new_keys.shape != (B, H, D) or kmin.shape != kmax.shape or kmin.stride() != kmax.stride():
        raise ValueError(f"new_keys {tuple(new_keys.shape)} does not fit summaries {tuple(kmax.shape)}")
    if B * H == 0:
        return
    _update_kernel[(B * H,)](new_keys, positions.to(device=kmax.device), kmax, kmin,
                             *new_keys.stride(), *kmax.stride(), H, NL, int(logical_page_size),
                             HEAD_DIM=D, num_warps=1)
