"""The GPU page cache of an offloaded retrieval pool (SparseServe's hierarchical KV memory): the
lookup of a decode step's pages, the load of its misses from host memory (FlashH2D) and the
append of a decode token to the newest slot and to host memory (FlashD2H).

The host pool is pinned and mapped into the GPU's address space (UVA), so a kernel given its
pointer reads and writes host memory over PCIe directly: a load is one launch of page-granular
gathers, a token write needs no copy call, and nothing waits on the host, so all of it sits in a
captured CUDA graph. Under Triton's interpreter the host pool is a CPU tensor like the others.

* :func:`lookup_pages`: one program per (row, KV head) dedups the step's read list (a sort),
  looks the pages up, picks the victims (a sort of the victim window's slots by policy key; the
  slots the step reads sort last) and writes the slot ids, the load list and the counters.
* :func:`load_pages`: ``load_workers`` programs per (row, KV head) share its load list, one
  whole page (K and V) per iteration.
* :func:`append_tokens`: one program per (row, KV head) writes the tokens to host memory and, for
  a decode token, moves a full newest page to a victim slot before the token opens a new page.
* :func:`prime_pages`: ``prime_workers`` programs per (row, KV head) fill a new cache's regular
  slots with the row's most recent full pages.

The state layout and the semantics are ``lserve_hf.page_cache.PageCache``'s. Reference:
lserve_hf.page_cache.PageCache.lookup / .load / .append and lserve_hf.page_cache.write_host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..page_cache import lanes, window_width
from .launch import check_positive, check_power_of_two

_BIG = tl.constexpr(1 << 40)            # lserve_hf.page_cache.BIG
_FREQ_CAP = tl.constexpr((1 << 13) - 1)  # lserve_hf.page_cache.FREQ_CAP
_SLOT_BITS = tl.constexpr(16)           # lserve_hf.page_cache.SLOT_BITS
_SLOT_MASK = tl.constexpr((1 << 16) - 1)
_MAX = tl.constexpr((1 << 63) - 1)


@dataclass(frozen=True)
class PageCachePlan:
    """Launch plan of the page-cache kernels. ``load_workers``: programs per (row, KV head) that
    share its misses, so that enough page reads are in flight to fill PCIe even at batch 1.
    Not tuned on a GPU yet (2026-12): the values are the first guess."""

    load_workers: int = 8
    prime_workers: int = 64   # a new cache's fill: many pages, once; more reads in flight
    num_warps: int = 4

    def __post_init__(self):
        check_positive("PageCachePlan", load_workers=self.load_workers, prime_workers=self.prime_workers)
        check_power_of_two("PageCachePlan", num_warps=self.num_warps)


DEFAULT_PAGE_CACHE_PLAN = PageCachePlan()

# Table strides grow with the context (n_pages + 1 columns, any parity): runtime values, so a new
# length compiles nothing.
LENGTH_ARGS = {"_lookup_kernel": ["stb", "sth", "NP"], "_append_kernel": ["stb", "sth"],
               "_prime_kernel": ["stb", "sth"]}


@triton.jit
def _policy_key(last, freq, owner, FREQUENCY: tl.constexpr):
    """lserve_hf.page_cache.policy_key: free slots -1, then LRU or (read count, last read)."""
    if FREQUENCY:
        key = (tl.minimum(freq, _FREQ_CAP).to(tl.int64) << 32) | (last - ((last >> 32) << 32))   # int64 only
    else:
        key = last
    return tl.where(owner < 0, -1, key)


@triton.jit(do_not_specialize=LENGTH_ARGS["_lookup_kernel"])
def _lookup_kernel(PAGES, LENGTHS, TABLE, OWNER, LAST, FREQ, HAND, CLOCK, STATS, SLOTS, SLOT_LEN,
                   LOAD_PAGE, LOAD_SLOT, N_LOAD, SCRATCH,
                   spb, sph, spg, spk, ssb, ssh, ssg, ssk, stb, sth,
                   H, G, K, S, C, NP, page_size, n_lanes,
                   EP: tl.constexpr, CP: tl.constexpr, FREQUENCY: tl.constexpr):
    """One (row, KV head): its G x K read-list entries (EP >= G*K lanes), S slots and a victim
    window of C regular slots from its hand (CP >= C lanes); ``n_lanes``: the load list's row length."""
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
    scr = SCRATCH + pid.to(tl.int64) * (EP + CP)
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
    # victims: the window's slots this step does not read, lowest policy key first (free: -1)
    hand = tl.load(HAND + pid)
    c = tl.arange(0, CP)
    in_c = c < C
    s = (hand + c) % (S - 1)
    own_s = tl.load(OWNER + row + s, mask=in_c, other=-1).to(tl.int64)
    last_s = tl.load(LAST + row + s, mask=in_c, other=0)
    freq_s = tl.load(FREQ + row + s, mask=in_c, other=0)
    used = last_s == now
    key = _policy_key(last_s, freq_s, own_s, FREQUENCY)
    packed = (used.to(tl.int64) << 62) | ((key + 1) << _SLOT_BITS) | s
    order = tl.sort(tl.where(in_c, packed, _MAX)) & _SLOT_MASK
    tl.store(scr + EP + c, order)
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
    own = tl.load(OWNER + row + S - 1).to(tl.int64)
    f_last = tl.load(FREQ + row + S - 1)
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
    tl.store(HAND + pid, (hand + C) % (S - 1))
    if h == 0:
        tl.store(SLOT_LEN + b, (S - 1) * page_size + length - newest * page_size)


@triton.jit
def _copy_page(hk, hv, ck, cv, page, slot, t, shk_t, shv_t, sck_t, scv_t, page_size):
    """Host page ``page`` (K and V) into cache slot ``slot``; the pointers are at the (row, head),
    ``t`` the page's row lanes."""
    ok = (t < page_size)[:, None]
    src = (page * page_size + t)[:, None]
    dst = (slot * page_size + t)[:, None]
    tl.store(ck + dst * sck_t, tl.load(hk + src * shk_t, mask=ok), mask=ok)
    tl.store(cv + dst * scv_t, tl.load(hv + src * shv_t, mask=ok), mask=ok)


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
    d = tl.arange(0, HEAD_DIM)[None, :]
    hk, hv = HK + b * shk_b + h * shk_h + d * shk_d, HV + b * shv_b + h * shv_h + d * shv_d
    ck, cv = CK + b * sck_b + h * sck_h + d * sck_d, CV + b * scv_b + h * scv_h + d * scv_d
    lanes = pid.to(tl.int64) * n_lanes
    for i in range(tl.program_id(1), n, WORKERS):
        page = tl.load(LOAD_PAGE + lanes + i).to(tl.int64)
        slot = tl.load(LOAD_SLOT + lanes + i).to(tl.int64)
        _copy_page(hk, hv, ck, cv, page, slot, t, shk_t, shv_t, sck_t, scv_t, page_size)


@triton.jit(do_not_specialize=LENGTH_ARGS["_prime_kernel"])
def _prime_kernel(HK, HV, CK, CV, LENGTHS, TABLE, OWNER,
                  shk_b, shk_h, shk_t, shk_d, shv_b, shv_h, shv_t, shv_d,
                  sck_b, sck_h, sck_t, sck_d, scv_b, scv_h, scv_t, scv_d, stb, sth,
                  H, S, page_size,
                  WORKERS: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Worker program_id(1) of one (row, KV head) fills regular slots j = w, w + WORKERS, ...
    with page ``newest - (S - 1) + j`` where that is a page."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    length = tl.load(LENGTHS + b).to(tl.int64)
    newest = (length + page_size - 1) // page_size - 1
    t = tl.arange(0, PAGE_PAD)
    d = tl.arange(0, HEAD_DIM)[None, :]
    hk, hv = HK + b * shk_b + h * shk_h + d * shk_d, HV + b * shv_b + h * shv_h + d * shv_d
    ck, cv = CK + b * sck_b + h * sck_h + d * sck_d, CV + b * scv_b + h * scv_h + d * scv_d
    row = pid.to(tl.int64) * (S + 1)
    tb = TABLE + b * stb + h * sth
    first = tl.maximum(S - 1 - newest, 0)          # the first slot whose page exists
    start = tl.program_id(1) + tl.cdiv(tl.maximum(first - tl.program_id(1), 0), WORKERS) * WORKERS
    for j in range(start, S - 1, WORKERS):
        page = newest - (S - 1) + j
        _copy_page(hk, hv, ck, cv, page, page * 0 + j, t, shk_t, shv_t, sck_t, scv_t, page_size)
        tl.store(tb + page, (page * 0 + j).to(tl.int32))
        tl.store(OWNER + row + j, page.to(tl.int32))


@triton.jit(do_not_specialize=LENGTH_ARGS["_append_kernel"])
def _append_kernel(KR, VR, POS, HK, HV, CK, CV, TABLE, OWNER, LAST, FREQ, HAND, CLOCK,
                   skr_b, skr_h, skr_t, skr_d, svr_b, svr_h, svr_t, svr_d,
                   shk_b, shk_h, shk_t, shk_d, shv_b, shv_h, shv_t, shv_d,
                   sck_b, sck_h, sck_t, sck_d, scv_b, scv_h, scv_t, scv_d, stb, sth,
                   H, T, S, C, page_size,
                   CP: tl.constexpr, PAGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
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
        own = tl.load(OWNER + row + S - 1).to(tl.int64)
        f_last = tl.load(FREQ + row + S - 1)
        claim = (own != new_page) & (pos % page_size == 0)
        write = (own == new_page) | claim
        retire = claim & (own >= 0)
        # the victim: lowest policy key in the window (lookup's, the hand as it stands)
        c = tl.arange(0, CP)
        in_c = c < C
        s = (tl.load(HAND + pid) + c) % (S - 1)
        own_s = tl.load(OWNER + row + s, mask=in_c, other=-1).to(tl.int64)
        last_s = tl.load(LAST + row + s, mask=in_c, other=0)
        freq_s = tl.load(FREQ + row + s, mask=in_c, other=0)
        key = _policy_key(last_s, freq_s, own_s, FREQUENCY)
        packed = tl.where(in_c, ((key + 1) << _SLOT_BITS) | s, _MAX)
        victim = tl.min(packed, 0) & _SLOT_MASK
        v_old = tl.load(OWNER + row + victim).to(tl.int64)
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


def lookup_pages(cache, pages: torch.Tensor, lengths: torch.Tensor, *, plan: PageCachePlan | None = None) -> None:
    """``cache.lookup(pages, lengths)`` (a ``lserve_hf.page_cache.PageCache``) in one launch: slot
    ids into ``cache.slot_ids``, victims, load list, counters; then the step clock advances."""
    plan = DEFAULT_PAGE_CACHE_PLAN if plan is None else plan
    B, H, G, K = pages.shape
    # the window's lanes follow the read list, not the slot count: a cache of any size compiles nothing new
    EP, CP = lanes(G * K), window_width(G * K)
    out = cache.output_for(pages)
    if cache.scratch is None or cache.scratch.shape != (B, H, EP + CP):
        cache.scratch = torch.empty(B, H, EP + CP, dtype=torch.int64, device=pages.device)
    _lookup_kernel[(B * H,)](
        pages, lengths, cache.table, cache.owner, cache.last, cache.freq, cache.hand, cache.clock, cache.stats, out,
        cache.slot_lengths, cache.load_page, cache.load_slot, cache.n_load, cache.scratch,
        *pages.stride(), *out.stride(), *cache.table.stride()[:2],
        H, G, K, cache.slots, cache.window, cache.n_pages, cache.page_size, cache.load_page.shape[-1],
        EP=EP, CP=CP, FREQUENCY=cache.policy == "frequency", num_warps=plan.num_warps)
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


def prime_pages(cache, host_k: torch.Tensor, host_v: torch.Tensor, lengths: torch.Tensor, *,
                plan: PageCachePlan | None = None) -> None:
    """``cache.prime(host_k, host_v, lengths)``: a new cache's regular slots take each row's most
    recent full pages, read from the host pool in place, one launch."""
    plan = DEFAULT_PAGE_CACHE_PLAN if plan is None else plan
    B, H, _, D = cache.hbm_k.shape
    _prime_kernel[(B * H, plan.prime_workers)](
        host_k, host_v, cache.hbm_k, cache.hbm_v, lengths, cache.table, cache.owner,
        *host_k.stride(), *host_v.stride(), *cache.hbm_k.stride(), *cache.hbm_v.stride(), *cache.table.stride()[:2],
        H, cache.slots, cache.page_size,
        WORKERS=plan.prime_workers, PAGE_PAD=triton.next_power_of_2(cache.page_size), HEAD_DIM=D,
        num_warps=plan.num_warps)


def append_tokens(cache, host_k, host_v, kr, vr, pos, *, plan: PageCachePlan | None = None) -> None:
    """Tokens ``kr``, ``vr`` ``[B, H, T, D]`` at positions ``pos`` ``[B, T]`` into the host pool
    (``write_host``), and with ``cache`` and T == 1 into its newest slot (``cache.append``)."""
    plan = DEFAULT_PAGE_CACHE_PLAN if plan is None else plan
    B, H, T, D = kr.shape
    cached = cache is not None and T == 1
    c = cache if cached else None
    ck, cv = (c.hbm_k, c.hbm_v) if cached else (host_k, host_v)
    table, owner, last, freq, hand, clock = (c.table, c.owner, c.last, c.freq, c.hand, c.clock) if cached else (pos,) * 6
    pos = pos.contiguous()
    _append_kernel[(B * H,)](
        kr, vr, pos, host_k, host_v, ck, cv, table, owner, last, freq, hand, clock,
        *kr.stride(), *vr.stride(), *host_k.stride(), *host_v.stride(), *ck.stride(), *cv.stride(),
        *(table.stride()[:2] if cached else (0, 0)),
        H, T, c.slots if cached else 2, c.window if cached else 1, c.page_size if cached else 1,
        CP=window_width(c.entries) if cached else 16, PAGE_PAD=triton.next_power_of_2(c.page_size) if cached else 16,
        HEAD_DIM=D, CACHED=cached, FREQUENCY=cached and c.policy == "frequency", num_warps=plan.num_warps)
