"""The GPU page cache of an offloaded retrieval pool (SparseServe's hierarchical KV memory): the
lookup of a decode step's pages, the load of its misses from host memory (FlashH2D) and the
append of a decode token to the newest slot and to host memory (FlashD2H).

The host pool is pinned and mapped into the GPU's address space (UVA), so a kernel given its
pointer reads and writes host memory over PCIe directly: a load is one launch of page-granular
gathers, a token write needs no copy call, and nothing waits on the host, so all of it sits in a
captured CUDA graph. Under Triton's interpreter the host pool is a CPU tensor like the others.

* :func:`lookup_pages`: one program per (row, KV head) dedups the step's read list (a sort),
  looks the pages up, picks the victims (a sort of the slots by policy key; the slots the step
  reads sort last) and writes the slot ids, the load list and the counters.
* :func:`load_pages`: ``load_workers`` programs per (row, KV head) share its load list, one
  whole page (K and V) per iteration.
* :func:`append_tokens`: one program per (row, KV head) writes the tokens to host memory and, for
  a decode token, moves a full newest page to a victim slot before the token opens a new page.

The state layout and the semantics are ``lserve_hf.page_cache.PageCache``'s. Reference:
lserve_hf.page_cache.PageCache.lookup / .load / .append and lserve_hf.page_cache.write_host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import check_positive, check_power_of_two

_BIG = tl.constexpr(1 << 40)            # lserve_hf.page_cache.BIG
_FREQ_CAP = tl.constexpr((1 << 17) - 1)  # lserve_hf.page_cache.FREQ_CAP
_SLOT_BITS = tl.constexpr(12)           # lserve_hf.page_cache.SLOT_BITS
_SLOT_MASK = tl.constexpr((1 << 12) - 1)
_MAX = tl.constexpr((1 << 63) - 1)


@dataclass(frozen=True)
class PageCachePlan:
    """Launch plan of the page-cache kernels. ``load_workers``: programs per (row, KV head) that
    share its misses, so that enough page reads are in flight to fill PCIe even at batch 1.
    Not tuned on a GPU yet (2026-12): the values are the first guess."""

    load_workers: int = 8
    num_warps: int = 4

    def __post_init__(self):
        check_positive("PageCachePlan", load_workers=self.load_workers)
        check_power_of_two("PageCachePlan", num_warps=self.num_warps)


DEFAULT_PAGE_CACHE_PLAN = PageCachePlan()

# Table strides grow with the context (n_pages + 1 columns, any parity): runtime values, so a new
# length compiles nothing.
LENGTH_ARGS = {"_lookup_kernel": ["stb", "sth", "NP"], "_append_kernel": ["stb", "sth"]}


@triton.jit
def _policy_key(last, freq, owner, FREQUENCY: tl.constexpr):
    """lserve_hf.page_cache.policy_key: free slots -1, then LRU or (read count, last read)."""
    if FREQUENCY:
        key = (tl.minimum(freq, _FREQ_CAP).to(tl.int64) << 32) | (last - ((last >> 32) << 32))   # int64 only
    else:
        key = last
    return tl.where(owner < 0, -1, key)


@triton.jit(do_not_specialize=LENGTH_ARGS["_lookup_kernel"])
def _lookup_kernel(PAGES, LENGTHS, TABLE, OWNER, LAST, FREQ, CLOCK, STATS, SLOTS, SLOT_LEN,
                   LOAD_PAGE, LOAD_SLOT, N_LOAD, SCRATCH,
                   spb, sph, spg, spk, ssb, ssh, ssg, ssk, stb, sth,
                   H, G, K, S, NP, page_size, n_lanes,
                   EP: tl.constexpr, SP: tl.constexpr, FREQUENCY: tl.constexpr):
    """One (row, KV head): its G x K read-list entries (EP >= G*K lanes) and S slots (SP >= S);
    ``n_lanes``: the load list's row length."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    E = G * K
    e = tl.arange(0, EP)
    in_e = e < E
    g = e // K
    kk = e % K
    p = tl.load(PAGES + b * spb + h * sph + g * spg + kk * spk, mask=in_e, other=-1).to(tl.int64)
    length = tl.load(LENGTHS + b).to(tl.int64)
    n_pg = (length + page_size - 1) // page_size
    newest = n_pg - 1
    valid = in_e & (p >= 0) & (p < n_pg)
    is_new = valid & (p == newest)
    reg = valid & (p != newest)
    scr = SCRATCH + pid.to(tl.int64) * (EP + SP)
    tb = TABLE + b * stb + h * sth
    row = pid.to(tl.int64) * (S + 1)
    # each page once: sorted, the first of each run (the neighbour comes through scratch memory)
    sp = tl.sort(tl.where(reg, p, _BIG))
    tl.store(scr + e, sp)
    tl.debug_barrier()
    prev = tl.load(scr + e - 1, mask=e > 0, other=-1)
    first = (sp != prev) & (sp < _BIG)
    u = tl.where(first, sp, 0)
    slot_u = tl.load(tb + u, mask=first, other=-1).to(tl.int64)
    hit = first & (slot_u >= 0)
    miss = first & (slot_u < 0)
    now = tl.load(CLOCK) + 1
    f_hit = tl.load(FREQ + row + slot_u, mask=hit, other=0)
    tl.store(LAST + row + slot_u, now + slot_u * 0, mask=hit)
    tl.store(FREQ + row + slot_u, f_hit + 1, mask=hit)
    tl.debug_barrier()
    # victims: the slots this step does not read, lowest policy key first (free slots: -1)
    s = tl.arange(0, SP)
    in_s = s < S
    own_s = tl.load(OWNER + row + s, mask=in_s, other=-1).to(tl.int64)
    last_s = tl.load(LAST + row + s, mask=in_s, other=0)
    freq_s = tl.load(FREQ + row + s, mask=in_s, other=0)
    used = (last_s == now) | (s == S - 1)
    key = _policy_key(last_s, freq_s, own_s, FREQUENCY)
    packed = (used.to(tl.int64) << 62) | ((key + 1) << _SLOT_BITS) | s
    order = tl.sort(tl.where(in_s, packed, _MAX)) & _SLOT_MASK
    tl.store(scr + EP + s, order)
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    tl.debug_barrier()
    victim = tl.load(scr + EP + rank, mask=miss, other=-1)
    old = tl.load(OWNER + row + victim, mask=miss, other=-1).to(tl.int64)
    tl.store(tb + old, old.to(tl.int32) * 0 - 1, mask=miss & (old >= 0))
    tl.store(tb + u, victim.to(tl.int32), mask=miss)
    tl.store(OWNER + row + victim, u.to(tl.int32), mask=miss)
    tl.store(LAST + row + victim, now + victim * 0, mask=miss)
    tl.store(FREQ + row + victim, (victim * 0 + 1).to(tl.int32), mask=miss)
    # the newest page: the last slot, loaded when that slot does not hold it yet
    own = tl.sum(tl.where(s == S - 1, own_s, 0), 0)
    f_last = tl.sum(tl.where(s == S - 1, freq_s, 0), 0)
    has = n_pg > 0
    need = has & (own != newest)
    if need:
        if own >= 0:
            tl.store(tb + own, (own * 0 - 1).to(tl.int32))
        tl.store(tb + newest, (newest * 0 + S - 1).to(tl.int32))
        tl.store(OWNER + row + S - 1, newest.to(tl.int32))
    tl.store(LAST + row + S - 1, now)
    tl.store(FREQ + row + S - 1, tl.where(need, 1, f_last + 1).to(tl.int32))
    tl.debug_barrier()
    # slot ids of the entries, the load list (misses by rank, then the newest), counters
    tab = tl.load(tb + tl.where(reg, p, 0), mask=reg, other=-1).to(tl.int64)
    slot_e = tl.where(is_new, S - 1, tl.where(reg, tab, -1))
    tl.store(SLOTS + b * ssb + h * ssh + g * ssg + kk * ssk, slot_e, mask=in_e)
    lanes = pid.to(tl.int64) * n_lanes
    tl.store(LOAD_PAGE + lanes + rank, u.to(tl.int32), mask=miss)
    tl.store(LOAD_SLOT + lanes + rank, victim.to(tl.int32), mask=miss)
    n_miss = tl.sum(miss.to(tl.int32), 0)
    if need:
        tl.store(LOAD_PAGE + lanes + n_miss, newest.to(tl.int32))
        tl.store(LOAD_SLOT + lanes + n_miss, (newest * 0 + S - 1).to(tl.int32))
    tl.store(N_LOAD + pid, n_miss + need.to(tl.int32))
    st = STATS + pid.to(tl.int64) * 3
    n_first = tl.sum(first.to(tl.int64), 0)
    n_hit = tl.sum(hit.to(tl.int64), 0)
    tl.store(st, tl.load(st) + n_first + has.to(tl.int64))
    tl.store(st + 1, tl.load(st + 1) + n_hit + (has & (own == newest)).to(tl.int64))
    tl.store(st + 2, tl.load(st + 2) + n_miss.to(tl.int64) + need.to(tl.int64))
    if h == 0:
        tl.store(SLOT_LEN + b, (S - 1) * page_size + length - newest * page_size)


@triton.jit
def _load_kernel(HK, HV, CK, CV, LOAD_PAGE, LOAD_SLOT, N_LOAD,
                 shk_b, shk_h, shk_t, shk_d, shv_b, shv_h, shv_t, shv_d,
                 sck_b, sck_h, sck_t, sck_d, scv_b, scv_h, scv_t, scv_d,
                 H, n_lanes, page_size,
                 WORKERS: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Worker program_id(1) of one (row, KV head) copies loads w, w + WORKERS, ... of its list."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    n = tl.load(N_LOAD + pid)
    t = tl.arange(0, PAGE_PAD)
    d = tl.arange(0, HEAD_DIM)
    ok = (t < page_size)[:, None]
    lanes = pid.to(tl.int64) * n_lanes
    for i in range(tl.program_id(1), n, WORKERS):
        page = tl.load(LOAD_PAGE + lanes + i).to(tl.int64)
        slot = tl.load(LOAD_SLOT + lanes + i).to(tl.int64)
        src = (page * page_size + t)[:, None]
        dst = (slot * page_size + t)[:, None]
        k = tl.load(HK + b * shk_b + h * shk_h + src * shk_t + d[None, :] * shk_d, mask=ok)
        tl.store(CK + b * sck_b + h * sck_h + dst * sck_t + d[None, :] * sck_d, k, mask=ok)
        v = tl.load(HV + b * shv_b + h * shv_h + src * shv_t + d[None, :] * shv_d, mask=ok)
        tl.store(CV + b * scv_b + h * scv_h + dst * scv_t + d[None, :] * scv_d, v, mask=ok)


@triton.jit(do_not_specialize=LENGTH_ARGS["_append_kernel"])
def _append_kernel(KR, VR, POS, HK, HV, CK, CV, TABLE, OWNER, LAST, FREQ, CLOCK,
                   skr_b, skr_h, skr_t, skr_d, svr_b, svr_h, svr_t, svr_d,
                   shk_b, shk_h, shk_t, shk_d, shv_b, shv_h, shv_t, shv_d,
                   sck_b, sck_h, sck_t, sck_d, scv_b, scv_h, scv_t, scv_d, stb, sth,
                   H, T, S, page_size,
                   SP: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   CACHED: tl.constexpr, FREQUENCY: tl.constexpr):
    """One (row, KV head): its T tokens to host memory; CACHED (one decode token, a cache): also
    to the newest slot, after moving a full newest page out when the token opens a page."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    kr = KR + b * skr_b + h * skr_h + d * skr_d
    vr = VR + b * svr_b + h * svr_h + d * svr_d
    for i in range(0, T):
        pos_i = tl.load(POS + b * T + i).to(tl.int64)
        tl.store(HK + b * shk_b + h * shk_h + pos_i * shk_t + d * shk_d,
                 tl.load(kr + i * skr_t).to(HK.dtype.element_ty))
        tl.store(HV + b * shv_b + h * shv_h + pos_i * shv_t + d * shv_d,
                 tl.load(vr + i * svr_t).to(HV.dtype.element_ty))
    if CACHED:
        pos = tl.load(POS + b).to(tl.int64)
        new_page = pos // page_size
        row = pid.to(tl.int64) * (S + 1)
        tb = TABLE + b * stb + h * sth
        s = tl.arange(0, SP)
        in_s = s < S
        own_s = tl.load(OWNER + row + s, mask=in_s, other=-1).to(tl.int64)
        last_s = tl.load(LAST + row + s, mask=in_s, other=0)
        freq_s = tl.load(FREQ + row + s, mask=in_s, other=0)
        own = tl.sum(tl.where(s == S - 1, own_s, 0), 0)
        f_last = tl.sum(tl.where(s == S - 1, freq_s, 0), 0)
        claim = (own != new_page) & (pos % page_size == 0)
        write = (own == new_page) | claim
        retire = claim & (own >= 0)
        key = _policy_key(last_s, freq_s, own_s, FREQUENCY)
        packed = tl.where(s < S - 1, ((key + 1) << _SLOT_BITS) | s, _MAX)
        victim = tl.argmin(packed, 0).to(tl.int64)
        v_old = tl.sum(tl.where(s == victim, own_s, 0), 0)
        ck = CK + b * sck_b + h * sck_h + d[None, :] * sck_d
        cv = CV + b * scv_b + h * scv_h + d[None, :] * scv_d
        if retire:
            t = tl.arange(0, PAGE_PAD)
            ok = (t < page_size)[:, None]
            src = ((S - 1) * page_size + t)[:, None]
            dst = (victim * page_size + t)[:, None]
            tl.store(ck + dst * sck_t, tl.load(ck + src * sck_t, mask=ok), mask=ok)
            tl.store(cv + dst * scv_t, tl.load(cv + src * scv_t, mask=ok), mask=ok)
            if v_old >= 0:
                tl.store(tb + v_old, (v_old * 0 - 1).to(tl.int32))
            tl.store(tb + own, victim.to(tl.int32))
            tl.store(OWNER + row + victim, own.to(tl.int32))
            tl.store(LAST + row + victim, tl.load(CLOCK))
            tl.store(FREQ + row + victim, f_last)
        if claim:
            tl.store(tb + new_page, (new_page * 0 + S - 1).to(tl.int32))
            tl.store(OWNER + row + S - 1, new_page.to(tl.int32))
            tl.store(FREQ + row + S - 1, (f_last * 0).to(tl.int32))
        tl.debug_barrier()   # the moved page is read before the token overwrites its first row
        if write:
            off = (S - 1) * page_size + pos % page_size
            tl.store(CK + b * sck_b + h * sck_h + off * sck_t + d * sck_d, tl.load(kr).to(CK.dtype.element_ty))
            tl.store(CV + b * scv_b + h * scv_h + off * scv_t + d * scv_d, tl.load(vr).to(CV.dtype.element_ty))


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def lookup_pages(cache, pages: torch.Tensor, lengths: torch.Tensor, *, plan: PageCachePlan | None = None) -> None:
    """``cache.lookup(pages, lengths)`` (a ``lserve_hf.page_cache.PageCache``) in one launch: slot
    ids into ``cache.slot_ids``, victims, load list, counters; then the step clock advances."""
    plan = DEFAULT_PAGE_CACHE_PLAN if plan is None else plan
    B, H, G, K = pages.shape
    EP, SP = _pad(G * K), _pad(cache.slots)
    out = cache.output_for(pages)
    if cache.scratch is None or cache.scratch.shape != (B, H, EP + SP):
        cache.scratch = torch.empty(B, H, EP + SP, dtype=torch.int64, device=pages.device)
    _lookup_kernel[(B * H,)](
        pages, lengths, cache.table, cache.owner, cache.last, cache.freq, cache.clock, cache.stats, out,
        cache.slot_lengths, cache.load_page, cache.load_slot, cache.n_load, cache.scratch,
        *pages.stride(), *out.stride(), *cache.table.stride()[:2],
        H, G, K, cache.slots, cache.n_pages, cache.page_size, cache.load_page.shape[-1],
        EP=EP, SP=SP, FREQUENCY=cache.policy == "frequency", num_warps=plan.num_warps)
    cache.clock.add_(1)


def load_pages(cache, host_k: torch.Tensor, host_v: torch.Tensor, *, plan: PageCachePlan | None = None) -> None:
    """``cache.load(host_k, host_v)``: the pages of the load list from the host pool (pinned and
    mapped: read in place over PCIe) into their slots, one launch."""
    plan = DEFAULT_PAGE_CACHE_PLAN if plan is None else plan
    B, H, _, D = cache.hbm_k.shape
    _load_kernel[(B * H, plan.load_workers)](
        host_k, host_v, cache.hbm_k, cache.hbm_v, cache.load_page, cache.load_slot, cache.n_load,
        *host_k.stride(), *host_v.stride(), *cache.hbm_k.stride(), *cache.hbm_v.stride(),
        H, cache.load_page.shape[-1], cache.page_size,
        WORKERS=plan.load_workers, PAGE_PAD=triton.next_power_of_2(cache.page_size), HEAD_DIM=D,
        num_warps=plan.num_warps)


def append_tokens(cache, host_k, host_v, kr, vr, pos, *, plan: PageCachePlan | None = None) -> None:
    """Tokens ``kr``, ``vr`` ``[B, H, T, D]`` at positions ``pos`` ``[B, T]`` into the host pool
    (``write_host``), and with ``cache`` and T == 1 into its newest slot (``cache.append``)."""
    plan = DEFAULT_PAGE_CACHE_PLAN if plan is None else plan
    B, H, T, D = kr.shape
    cached = cache is not None and T == 1
    c = cache if cached else None
    ck, cv = (c.hbm_k, c.hbm_v) if cached else (host_k, host_v)
    table, owner, last, freq, clock = (c.table, c.owner, c.last, c.freq, c.clock) if cached else (pos,) * 5
    pos = pos.contiguous()
    _append_kernel[(B * H,)](
        kr, vr, pos, host_k, host_v, ck, cv, table, owner, last, freq, clock,
        *kr.stride(), *vr.stride(), *host_k.stride(), *host_v.stride(), *ck.stride(), *cv.stride(),
        *(table.stride()[:2] if cached else (0, 0)),
        H, T, c.slots if cached else 2, c.page_size if cached else 1,
        SP=_pad(c.slots) if cached else 16, PAGE_PAD=triton.next_power_of_2(c.page_size) if cached else 16,
        HEAD_DIM=D, CACHED=cached, FREQUENCY=cached and c.policy == "frequency", num_warps=plan.num_warps)
