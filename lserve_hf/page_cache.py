"""The GPU page cache of an offloaded retrieval pool (``LServeConfig(offload="host")``): its state
and the torch reference of its three operations, the semantics the Triton kernels of
``kernels/page_cache.py`` are checked against and the path that runs wherever they do not (CPU).

Each (row, retrieval KV head) owns ``slots`` page slots of ``page_size`` tokens in ``hbm_k`` /
``hbm_v``. The last slot, ``slots - 1``, always holds the row's newest page (the one decode appends
to); the others hold full pages, whose tokens never change. Per slot: the page it holds
(``owner``), the step it was last read (``last``) and how often it was read since it was loaded
(``freq``); per page: its slot or -1 (``table``). Every tensor has one spare column at the end
(``table[..., n_pages]``, ``owner[..., slots]``...): a masked-out scatter writes there, so no
scatter needs a host-side mask.

- :meth:`PageCache.lookup`: a decode step's read list (physical pages, -1 empty) becomes slot
  ids. Pages already cached are hits; each page missing gets a victim slot, the least valuable
  by the policy among the slots this step does not read (free slots first); the newest page goes
  to the last slot. It writes the load list (page, slot) that :meth:`PageCache.load` copies
  from host memory.
- :meth:`PageCache.append`: a decode token goes to host memory and to the newest slot. A token
  that opens a page first moves the full newest page to a victim slot (a device copy: the page
  stays cached, no host read) and claims the last slot for the new page.
- :meth:`PageCache.prime`: a new cache starts with each row's most recent full pages in its
  regular slots (recent tokens are the likeliest reads), so the first steps do not load what the
  cache could have held from the start.

**Victims are sampled** (as Redis approximates LRU): a step weighs the ``window_width`` regular
slots from a rotating hand (``hand``, per (row, head); it moves on by the window each lookup),
not all of them, so its cost does not grow with the cache, which may then be as large as the GPU
holds. A cache no larger than the window weighs every slot: exact LRU (or frequency) order.

Decode reads the cache with the slot ids and ``slot_lengths = (slots - 1) * page_size + tokens
of the newest page``: slots below the last are then full pages, the last slot holds exactly the
newest page's tokens, and the newest page the decode reads besides its list (the page the lengths
end in) is the last slot. So the decode kernel needs no change.
"""

from __future__ import annotations

import torch

BIG = 1 << 40          # sorts after every page number
FREQ_CAP = (1 << 13) - 1  # read counts saturate here: the packed sort keys stay below 2^62
SLOT_BITS = 16         # slots per (row, head) < 65536: the slot id rides in the low bits of a sort key


def lanes(n: int) -> int:
    """Lanes the kernels give ``n`` items: a power of two, at least 16 (``tl.arange``'s floor)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def window_width(entries: int) -> int:
    """Victim candidates a step weighs: twice the read list's lanes. One step reads at most
    ``entries`` pages, so at most that many candidates are read this step or taken by its misses,
    and the window always holds a victim for every miss."""
    return 2 * lanes(entries)


def policy_key(last: torch.Tensor, freq: torch.Tensor, owner: torch.Tensor, policy: str) -> torch.Tensor:
    """Eviction order of slots, lowest first: free slots (-1), then by the policy ("lru": last
    read; "frequency": read count, then last read)."""
    key = last if policy == "lru" else (freq.clamp(max=FREQ_CAP).long() << 32) | (last & 0xFFFFFFFF)
    return torch.where(owner < 0, -1, key)


class PageCache:
    """Device state of the page cache of one layer's retrieval heads (see the module docstring).
    ``rows``, ``heads``: the pool's batch and retrieval KV heads; ``n_pages``: pages the host pool
    holds; ``entries``: read-list entries per (row, head), G query heads x K pages."""

    def __init__(self, rows, heads, head_dim, slots, n_pages, entries, page_size, policy, dtype, device):
        if not 2 <= slots < (1 << SLOT_BITS):
            raise ValueError(f"the page cache takes 2 to {(1 << SLOT_BITS) - 1} slots per head, not {slots}")
        self.slots, self.page_size, self.policy = slots, page_size, policy
        B, H, S = rows, heads, slots
        self.hbm_k = torch.zeros(B, H, S * page_size, head_dim, dtype=dtype, device=device)
        self.hbm_v = torch.zeros_like(self.hbm_k)
        self.table = torch.full((B, H, n_pages + 1), -1, dtype=torch.int32, device=device)
        self.owner = torch.full((B, H, S + 1), -1, dtype=torch.int32, device=device)
        self.last = torch.zeros(B, H, S + 1, dtype=torch.int64, device=device)
        self.freq = torch.zeros(B, H, S + 1, dtype=torch.int32, device=device)
        self.clock = torch.zeros(1, dtype=torch.int64, device=device)     # lookups so far (decode steps)
        self.window = min(S - 1, window_width(entries))                    # victim candidates a step
        self.hand = torch.zeros(B, H, dtype=torch.int64, device=device)    # the window's first slot
        self.stats = torch.zeros(B, H, 3, dtype=torch.int64, device=device)  # touched, hits, misses
        # a step's outputs, at fixed addresses (captured decode graphs read them)
        self.entries = entries
        self.slot_ids = None                                               # [B, H, G, K], by lookup
        self.slot_lengths = torch.zeros(B, dtype=torch.int64, device=device)
        self.load_page = torch.full((B, H, entries + 2), -1, dtype=torch.int32, device=device)
        self.load_slot = torch.full((B, H, entries + 2), -1, dtype=torch.int32, device=device)
        self.n_load = torch.zeros(B, H, dtype=torch.int32, device=device)
        self.scratch = None    # the lookup kernel's per-program scratch (kernels/page_cache.py)

    @staticmethod
    def row_bytes(slots, n_pages, entries, head_dim, page_size, elt) -> int:
        """GPU bytes of one (row, head)'s page cache: its slots' keys and values, the page table,
        the per-slot state and a step's buffers (what it and the lookup kernel allocate)."""
        pad = lanes(entries) + window_width(entries)
        return (2 * slots * page_size * head_dim * elt + 4 * (n_pages + 1) + 16 * (slots + 1) + 32
                + 8 * (entries + 2) + 4 + 8 * entries + 8 * pad)

    @property
    def n_pages(self) -> int:
        return self.table.shape[-1] - 1

    def tensors(self) -> dict:
        names = ("hbm_k", "hbm_v", "table", "owner", "last", "freq", "hand", "stats", "slot_ids", "slot_lengths",
                 "load_page", "load_slot", "n_load", "scratch")
        return {n: getattr(self, n) for n in names}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None) + 8

    def apply(self, fn) -> None:
        """A batch operation on every per-row tensor (the step clock is shared by the rows)."""
        for name, t in self.tensors().items():
            if t is not None:
                setattr(self, name, fn(t))

    def reset(self) -> None:
        """Forget every cached page (in place): the next lookup loads what it reads. After a crop
        or a multi-token append, whose pages are no longer what the slots hold."""
        self.table.fill_(-1)
        self.owner.fill_(-1)
        self.last.zero_()
        self.freq.zero_()
        self.hand.zero_()

    def grow_table(self, n_pages: int) -> None:
        """The host pool now holds ``n_pages`` pages (it grew)."""
        extra = n_pages - self.n_pages
        if extra > 0:
            B, H, _ = self.table.shape
            self.table = torch.cat([self.table[..., :-1], self.table.new_full((B, H, extra + 1), -1)], -1)

    def output_for(self, pages: torch.Tensor) -> torch.Tensor:
        """The slot-id buffer for read lists shaped like ``pages``."""
        if self.slot_ids is None or self.slot_ids.shape != pages.shape:
            self.slot_ids = torch.full(pages.shape, -1, dtype=torch.int64, device=pages.device)
        return self.slot_ids

    # -- the torch reference of the three operations ------------------------------------------
    def lookup(self, pages: torch.Tensor, lengths: torch.Tensor) -> None:
        """Slot ids for the read lists ``pages`` ``[B, H, G, K]`` (physical pages, -1 empty) of
        rows of ``lengths`` tokens, into ``slot_ids``; victims for the misses, the load list, the
        counters (``kernels.page_cache.lookup_pages`` computes the same)."""
        B, H, G, K = pages.shape
        S, ps, NP = self.slots, self.page_size, self.n_pages
        out = self.output_for(pages)
        now = self.clock + 1
        n_pg = (lengths.long() + ps - 1) // ps
        newest = (n_pg - 1).view(B, 1, 1)
        p = pages.reshape(B, H, G * K).long()
        valid = (p >= 0) & (p < n_pg.view(B, 1, 1))
        is_new = valid & (p == newest)
        reg = valid & ~is_new
        # each page the step reads once: sorted, first of a run
        sp = torch.sort(torch.where(reg, p, BIG), dim=-1).values
        first = (sp != torch.cat([sp.new_full((B, H, 1), -1), sp[..., :-1]], -1)) & (sp < BIG)
        u = torch.where(first, sp, 0)
        slot_u = torch.where(first, self.table.gather(-1, u).long(), -1)
        hit, miss = first & (slot_u >= 0), first & (slot_u < 0)
        spare = torch.full_like(slot_u, S)
        self.last.scatter_(-1, torch.where(hit, slot_u, spare), now.expand(B, H, G * K))
        self.freq.scatter_add_(-1, torch.where(hit, slot_u, spare), hit.int())
        # victims: the window's slots this step does not read, lowest policy key first
        cand = self.candidates()
        c_last, c_freq, c_owner = (t.gather(-1, cand) for t in (self.last, self.freq, self.owner))
        used = c_last == now
        key = policy_key(c_last, c_freq, c_owner, self.policy)
        order = torch.sort((used.long() << 62) | ((key + 1) << SLOT_BITS) | cand, dim=-1).values
        order = order & ((1 << SLOT_BITS) - 1)
        rank = miss.long().cumsum(-1) - 1
        victim = torch.where(miss, order.gather(-1, rank.clamp(0, cand.shape[-1] - 1)), -1)
        old = torch.where(miss, self.owner.gather(-1, victim.clamp(min=0)).long(), -1)
        self.table.scatter_(-1, torch.where(old >= 0, old, NP), -1)
        self.table.scatter_(-1, torch.where(miss, u, NP), victim.int())
        at = torch.where(miss, victim, spare)
        self.owner.scatter_(-1, at, u.int())
        self.last.scatter_(-1, at, now.expand(B, H, G * K))
        self.freq.scatter_(-1, at, torch.ones_like(at, dtype=torch.int32))
        # the newest page: the last slot, loaded when the slot does not hold it yet
        own, f_last = self.owner[..., S - 1].long(), self.freq[..., S - 1].clone()
        has = (n_pg > 0).view(B, 1).expand(B, H)
        nw = newest.view(B, 1).expand(B, H)
        need = has & (own != nw)
        self.table.scatter_(-1, torch.where(need & (own >= 0), own, NP).unsqueeze(-1), -1)
        self.table.scatter_(-1, torch.where(need, nw, NP).unsqueeze(-1), S - 1)
        self.owner[..., S - 1] = torch.where(need, nw, own).int()
        self.last[..., S - 1] = now
        self.freq[..., S - 1] = torch.where(need, 1, f_last + 1)
        # slot ids of the entries, the load list (misses by rank, then the newest), counters
        tab = self.table.gather(-1, p.clamp(0, max(NP - 1, 0))).long()
        out.copy_(torch.where(is_new, S - 1, torch.where(reg, tab, -1)).view(B, H, G, K))
        n_miss = miss.sum(-1)
        spare_lane = self.load_page.shape[-1] - 1
        lane = torch.where(miss, rank, spare_lane)
        self.load_page.scatter_(-1, lane, u.int())
        self.load_slot.scatter_(-1, lane, victim.int())
        lane_new = torch.where(need, n_miss, spare_lane).unsqueeze(-1)
        self.load_page.scatter_(-1, lane_new, nw.unsqueeze(-1).int())
        self.load_slot.scatter_(-1, lane_new, torch.full_like(lane_new, S - 1, dtype=torch.int32))
        self.n_load.copy_(n_miss + need)
        self.stats[..., 0] += first.sum(-1) + has
        self.stats[..., 1] += hit.sum(-1) + (has & ~need)
        self.stats[..., 2] += n_miss + need
        self.slot_lengths.copy_((S - 1) * ps + lengths.long() - (n_pg - 1) * ps)
        self.hand.copy_((self.hand + self.window) % (S - 1))
        self.clock.add_(1)

    def candidates(self) -> torch.Tensor:
        """The victim window ``[B, H, window]``: regular slots from the hand on, wrapping."""
        w = torch.arange(self.window, device=self.hand.device)
        return (self.hand.unsqueeze(-1) + w) % (self.slots - 1)

    def prime(self, host_k: torch.Tensor, host_v: torch.Tensor, lengths: torch.Tensor) -> None:
        """A new cache's regular slots take each row's most recent full pages of rows of
        ``lengths`` tokens: slot j the page ``newest - (slots - 1) + j`` where that is a page, so
        older pages sit in lower slots, which go first among equal keys. Not counted as reads
        (``kernels.page_cache.prime_pages`` computes the same; a host sync on CUDA)."""
        B, H, _, D = self.hbm_k.shape
        S, ps, NP, dev = self.slots, self.page_size, self.n_pages, host_k.device
        n_pg = (lengths.long() + ps - 1) // ps
        page = (n_pg - 1).view(B, 1) - (S - 1) + torch.arange(S - 1, device=n_pg.device)   # [B, S-1]
        ok = page >= 0
        j = torch.arange(S - 1, device=self.table.device, dtype=torch.int32).expand(B, H, S - 1)
        self.table.scatter_(-1, torch.where(ok, page, NP).view(B, 1, S - 1).expand(B, H, S - 1), j)
        self.owner[..., :S - 1] = torch.where(ok, page, -1).view(B, 1, S - 1).int()
        src = page.clamp(min=0).to(dev)
        keep = ok.view(B, 1, S - 1, 1, 1).to(self.hbm_k.device)
        rows = torch.arange(B, device=dev).view(B, 1)
        for host, hbm in ((host_k, self.hbm_k), (host_v, self.hbm_v)):
            got = host.view(B, H, -1, ps, D)[rows, :, src].transpose(1, 2).to(hbm.device)   # [B, H, S-1, ps, D]
            pg = hbm.view(B, H, S, ps, D)
            pg[:, :, :S - 1] = torch.where(keep, got, pg[:, :, :S - 1])

    def load(self, host_k: torch.Tensor, host_v: torch.Tensor) -> None:
        """Copy the pages of the load list from the host pool into their slots (a host sync on
        CUDA: the kernel ``kernels.page_cache.load_pages`` reads host memory without one)."""
        B, H, _, D = self.hbm_k.shape
        ps, S, dev = self.page_size, self.slots, host_k.device
        lanes = torch.arange(self.load_page.shape[-1], device=dev) < self.n_load.to(dev).unsqueeze(-1)
        b, h, i = lanes.nonzero(as_tuple=True)
        src, dst = self.load_page.to(dev)[b, h, i].long(), self.load_slot.to(dev)[b, h, i].long()
        at = tuple(x.to(self.hbm_k.device) for x in (b, h, dst))
        for host, hbm in ((host_k, self.hbm_k), (host_v, self.hbm_v)):
            hbm.view(B, H, S, ps, D)[at] = host.view(B, H, -1, ps, D)[b, h, src].to(hbm.device)

    def append(self, kr: torch.Tensor, vr: torch.Tensor, pos: torch.Tensor) -> None:
        """One decode token per row (``kr``, ``vr`` ``[B, H, 1, D]`` at token positions ``pos``
        ``[B, 1]``) into the newest slot, moving a full newest page out first when the token
        opens a page. The host write is :func:`write_host`'s. A row whose newest slot does not
        hold its page (after a reset) is left to the next lookup, which loads the page."""
        B, H, _, D = kr.shape
        S, ps, NP = self.slots, self.page_size, self.n_pages
        pos = pos[:, 0].long()
        new_page = (pos // ps).view(B, 1).expand(B, H)
        own, f_last = self.owner[..., S - 1].long(), self.freq[..., S - 1].clone()
        claim = (own != new_page) & (pos % ps == 0).view(B, 1)
        write = (own == new_page) | claim
        retire = claim & (own >= 0)
        cand = self.candidates()
        key = policy_key(*(t.gather(-1, cand) for t in (self.last, self.freq, self.owner)), self.policy)
        victim = (((key + 1) << SLOT_BITS) | cand).min(-1).values & ((1 << SLOT_BITS) - 1)   # [B, H]
        for hbm in (self.hbm_k, self.hbm_v):
            pg = hbm.view(B, H, S, ps, D)
            src = torch.where(retire, S - 1, victim).view(B, H, 1, 1, 1).expand(B, H, 1, ps, D)
            pg.scatter_(2, victim.view(B, H, 1, 1, 1).expand(B, H, 1, ps, D), pg.gather(2, src))
        v_old = self.owner.gather(-1, victim.unsqueeze(-1)).squeeze(-1).long()
        at = torch.where(retire, victim, S).unsqueeze(-1)
        self.table.scatter_(-1, torch.where(retire & (v_old >= 0), v_old, NP).unsqueeze(-1), -1)
        self.table.scatter_(-1, torch.where(retire, own, NP).unsqueeze(-1), victim.int().unsqueeze(-1))
        self.owner.scatter_(-1, at, own.int().unsqueeze(-1))
        self.last.scatter_(-1, at, self.clock.expand(B, H).unsqueeze(-1))
        self.freq.scatter_(-1, at, f_last.unsqueeze(-1))
        self.table.scatter_(-1, torch.where(claim, new_page, NP).unsqueeze(-1), S - 1)
        self.owner[..., S - 1] = torch.where(claim, new_page, own).int()
        self.freq[..., S - 1] = torch.where(claim, 0, f_last)
        idx = ((S - 1) * ps + pos % ps).view(B, 1, 1, 1).expand(B, H, 1, D)
        for hbm, x in ((self.hbm_k, kr), (self.hbm_v, vr)):
            hbm.scatter_(2, idx, torch.where(write.view(B, H, 1, 1), x.to(hbm.dtype), hbm.gather(2, idx)))


def write_host(host_k, host_v, kr, vr, pos) -> None:
    """Tokens ``[B, H, S, D]`` at positions ``pos`` ``[B, S]`` into the host pool (torch
    reference of the host write of ``kernels.page_cache.append_tokens``; a host sync on CUDA)."""
    B, H, S, D = kr.shape
    idx = pos.view(B, 1, S, 1).expand(B, H, S, D).to(host_k.device)
    host_k.scatter_(2, idx, kr.to(host_k.device, host_k.dtype))
    host_v.scatter_(2, idx, vr.to(host_v.device, host_v.dtype))
