"""Offload (``LServeConfig(offload="host")``, SparseServe's hierarchical KV memory): the offloaded
path gives the in-memory path's logits and tokens; the page cache's torch reference against a
brute-force cache, its Triton kernels against the reference (Triton's interpreter on CPU), its
counters on a crafted access pattern, and the batch estimate."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, max_batch_size, patch_model, unpatch_model
from lserve_hf.offload import HostPagePool, host_zeros, working_set
from lserve_hf.page_cache import PageCache, write_host

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"      # the page cache's device; its host pool is pinned on CUDA
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("lserve_hf.kernels.")]:
        importlib.reload(sys.modules[_name])

SMALL = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4, token_budget=48,
                     prefill_sink=4, prefill_local=32, decode_sink=4, decode_local=16, selector_interval=2)
PATTERN = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.6]])      # a streaming head in layers 0 and 1


def _generate(cfg, ids, mask, new=40, **kw):
    model = patch_model(tiny_llama(layers=3, heads=4, kv_heads=2), cfg, PATTERN)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def _padded(B=2, S=150, pad=13, seed=0):
    ids = torch.randint(1, 100, (B, S), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


# -- the offloaded path equals the in-memory path -----------------------------------------------

@pytest.mark.parametrize("chunk, dense, dynamic", [(None, (), False), (40, (2,), False), (64, (), True)])
def test_generate_equals_in_memory_across_evictions(chunk, dense, dynamic, monkeypatch):
    """Left padding, a page cache of 7 pages for 12 pages per row (evicted and loaded again),
    one-pass and layer-segmented chunked prefill, a dense layer (its pages stay on the GPU),
    dynamic prefill at a fixed 30% of key blocks."""
    from lserve_hf import segmented

    staged = []            # at each layer's first chunk: did every earlier layer's KV leave?
    allocate = HostPagePool.allocate

    def spy(pool, *a):
        staged.append(pool)
        assert all(p.stage_k is None for p in staged[:-1])
        return allocate(pool, *a)
    monkeypatch.setattr(HostPagePool, "allocate", spy)
    calls = []
    prefill = segmented.prefill
    monkeypatch.setattr(segmented, "prefill", lambda *a: calls.append(1) or prefill(*a))
    cfg = dataclasses.replace(SMALL, prefill_chunk_size=chunk, dense_layers=dense)
    if dynamic:
        cfg = dataclasses.replace(cfg, prefill_dynamic=True, dynamic_block=16, dynamic_min_density=0.3,
                                  dynamic_max_density=0.3, dynamic_dense_tail=16)
    ids, mask = _padded()
    want = _generate(cfg, ids, mask)
    got = _generate(dataclasses.replace(cfg, offload="host", hbm_pages=4), ids, mask)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    cache = got.past_key_values
    offloaded = [isinstance(layer.pool, HostPagePool) for layer in cache.layers]
    assert offloaded == [True, True, not dense]              # a dense layer's pages stay on the GPU
    assert len(calls) == (1 if chunk else 0) and len(staged) == sum(offloaded)
    ws = cache.working_set()
    assert ws["steps"] == 39 and ws["slots"][0] == 7          # raised to 2 query heads x 3 pages + 1
    pages = -(-190 // 16)
    assert ws["misses"] > len(ws["layers"]) * 2 * pages     # more loads than pages: evicted, loaded again
    assert 0 < ws["hit_rate"] < 1


def test_a_cache_larger_than_its_victim_window_gives_the_in_memory_tokens():
    """36 slots against a victim window of 32 (2 query heads x 3 pages: 16 lanes, twice), so
    victims come from the rotating window; 47 pages a row, so the primed cache evicts."""
    ids, mask = _padded(S=700, pad=21, seed=4)
    want = _generate(SMALL, ids, mask)
    got = _generate(dataclasses.replace(SMALL, offload="host", hbm_pages=36), ids, mask)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    ws = got.past_key_values.working_set()
    caches = [layer.pool.cache for layer in got.past_key_values.layers if isinstance(layer.pool, HostPagePool)]
    assert ws["slots"][0] == 36 and all(c.window == 32 for c in caches)
    assert ws["misses"] > 0 and ws["hit_rate"] > 0.5       # primed with the newest pages: mostly hits


def test_beam_search_and_prompt_lookup_equal_in_memory():
    """Beam reordering (rows of host memory moved in place) and assisted decoding (multi-token
    appends, crops: the page cache starts over) give the in-memory tokens."""
    ids = torch.randint(1, 100, (1, 120), generator=torch.Generator().manual_seed(3))
    rep = torch.cat([ids[:, :40], ids[:, :40], ids[:, :40]], 1)
    for kw, x in ((dict(num_beams=2), ids), (dict(prompt_lookup_num_tokens=4), rep)):
        m = torch.ones_like(x)
        want = _generate(SMALL, x, m, new=24, **kw)
        got = _generate(dataclasses.replace(SMALL, offload="host", hbm_pages=4), x, m, new=24, **kw)
        assert torch.equal(got.sequences, want.sequences), kw


def _embedded_offload_vs_memory(model, tok, device, new, **kw):
    """The embedded model on a ~2K-token passkey prompt, budget 256, in memory and offloaded with
    a page cache of 8 pages asked (raised to 3 query heads x 4 pages + 1 = 13 for 32 pages a row):
    both outputs of ``generate()``."""
    from lserve_hf.passkey import passkey_prompt

    p = passkey_prompt(tok, 2000, 0.5, chat=False)
    x = tok(p.text, return_tensors="pt", add_special_tokens=False).to(device)
    base = LServeConfig(token_budget=256, prefill_chunk_size=1024, **kw)
    out = {}
    try:
        for name, cfg in (("memory", base), ("offload", dataclasses.replace(base, offload="host", hbm_pages=8))):
            patch_model(model, cfg)
            with torch.no_grad():
                out[name] = model.generate(**x, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    finally:
        unpatch_model(model)
    ws = out["offload"].past_key_values.working_set()
    assert ws["slots"][0] == 13 and ws["misses"] > 0
    return out, x.input_ids.shape[1], ws


def test_embedded_model_gives_the_in_memory_tokens(embedded):
    """On the CPU (torch reference path), 16 new tokens."""
    model, tok = embedded
    out, n, ws = _embedded_offload_vs_memory(model, tok, "cpu", 16)
    assert torch.equal(out["offload"].sequences, out["memory"].sequences)
    assert ws["steps"] == out["offload"].sequences.shape[1] - n - 1 > 0      # up to 16: the answer may end


# -- the page cache: reference against brute force, kernels against the reference ---------------

class BruteCache:
    """The page cache of one (row, head) as lists, written from the rules in page_cache's
    docstring, not from its code: ``window`` victim candidates from a hand that moves on by the
    window each lookup (every regular slot when the cache is no larger)."""

    def __init__(self, slots, policy, window):
        self.S, self.policy = slots, policy
        self.C = min(slots - 1, window)
        self.hand = 0
        self.owner = [-1] * slots
        self.last = [0] * slots
        self.freq = [0] * slots
        self.clock = 0
        self.touched = self.hits = self.misses = 0

    def key(self, s):
        """Eviction order: free slots, then by last read (lru) or read count and last read; then slot."""
        if self.owner[s] < 0:
            return (-1, s)
        if self.policy == "lru":
            return (self.last[s], s)
        return (min(self.freq[s], 2 ** 13 - 1) * 2 ** 32 + self.last[s], s)

    def window(self):
        return [(self.hand + i) % (self.S - 1) for i in range(self.C)]

    def prime(self, length, ps):
        """Regular slot j takes page newest - (S - 1) + j where that is a page."""
        newest, R = (length + ps - 1) // ps - 1, self.S - 1
        for j in range(R):
            if newest - R + j >= 0:
                self.owner[j] = newest - R + j

    def append(self, pos, ps):
        page, S = pos // ps, self.S
        if self.owner[S - 1] != page and pos % ps == 0:
            if self.owner[S - 1] >= 0:              # the full newest page moves to a victim slot
                v = min(self.window(), key=self.key)
                self.owner[v], self.last[v], self.freq[v] = self.owner[S - 1], self.clock, self.freq[S - 1]
            self.owner[S - 1], self.freq[S - 1] = page, 0

    def lookup(self, entries, length, ps):
        """Slots of ``entries`` (pages, -1 empty); the newest page's in the last slot."""
        S, newest = self.S, (length + ps - 1) // ps - 1
        self.clock += 1
        now = self.clock
        pages = sorted({p for p in entries if 0 <= p < newest})
        where = {self.owner[s]: s for s in range(S - 1) if self.owner[s] >= 0}
        hits = [p for p in pages if p in where]
        for p in hits:
            self.last[where[p]], self.freq[where[p]] = now, self.freq[where[p]] + 1
        free = [s for s in self.window() if self.last[s] != now]
        victims = sorted(free, key=self.key)
        for p in (p for p in pages if p not in where):
            v = victims.pop(0)
            self.owner[v], self.last[v], self.freq[v] = p, now, 1
            where[p] = v
        self.hand = (self.hand + self.C) % (S - 1)
        need = self.owner[S - 1] != newest
        self.owner[S - 1], self.last[S - 1] = newest, now
        self.freq[S - 1] = 1 if need else self.freq[S - 1] + 1
        self.touched += len(pages) + 1
        self.hits += len(hits) + (not need)
        self.misses += len(pages) - len(hits) + need
        where[newest] = S - 1
        return [where[p] if 0 <= p <= newest else -1 for p in entries]


def _selection(lengths, H, G, n_sel, ps, gen):
    """``n_sel`` random pages per query head of each row, as a selection chooses them."""
    n_pg = (lengths + ps - 1) // ps
    return torch.stack([torch.stack([torch.stack([torch.randperm(int(n), generator=gen)[:n_sel] for _ in range(G)])
                                     for _ in range(H)]) for n in n_pg.tolist()])


def _host(x):
    """A copy of ``x`` in host memory as a HostPagePool holds it (pinned and mapped on CUDA)."""
    t = host_zeros(x.shape, x.dtype, pin=CUDA)
    return t.copy_(x)


def _drive(caches, steps, kernels, H=2, G=2, n_sel=3, ps=4, D=8, seed=0, start=(21, 30), tokens=128,
           prime=False, brute=None):
    """``steps`` decode steps (a token appended, the pages looked up and loaded; a new selection
    every other step) on PageCaches of two rows of ``start`` tokens, through the kernels where
    ``kernels[i]``, primed first with ``prime`` (``brute``: the BruteCaches by (row, head), primed
    too): yields the first cache's host pool, the read lists, lengths and token positions each step."""
    from lserve_hf.kernels import page_cache as KP

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(start, device=DEV)
    B = 2
    host_k, host_v = torch.randn(B, H, tokens, D, generator=gen), torch.randn(B, H, tokens, D, generator=gen)
    pools = [(_host(host_k), _host(host_v)) for _ in caches]
    if prime:
        for cache, (hk, hv), kern in zip(caches, pools, kernels):
            (KP.prime_pages if kern else PageCache.prime)(cache, hk, hv, lengths)
        for (b, _), bc in (brute or {}).items():
            bc.prime(start[b], ps)
    for step in range(steps):
        pos = lengths.view(B, 1).clone()
        lengths = lengths + 1
        kr, vr = (torch.randn(B, H, 1, D, generator=gen).to(DEV) for _ in range(2))
        if step % 2 == 0:
            sel = _selection(lengths.cpu(), H, G, n_sel, ps, gen).to(DEV)
        pages = sel                         # the read list; the newest page is read besides
        for cache, (hk, hv), kern in zip(caches, pools, kernels):
            if kern:
                KP.append_tokens(cache, hk, hv, kr, vr, pos)
                KP.lookup_pages(cache, pages, lengths)
                KP.load_pages(cache, hk, hv)
            else:
                write_host(hk, hv, kr, vr, pos)
                cache.append(kr, vr, pos)
                cache.lookup(pages, lengths)
                cache.load(hk, hv)
        if CUDA:
            torch.cuda.synchronize()
        yield pools[0], pages, lengths, pos


def _cache(policy, slots, H=2, G=2, K=3, ps=4, D=8, tokens=128):
    return PageCache(2, H, D, slots, tokens // ps, G * K, ps, policy, torch.float32, DEV)


# a cache no larger than its victim window (every slot weighed), and one larger (45 slots, a
# window of 32 for 6 read-list entries), primed, over 128 pages of which the rows use 75-97
BIG = dict(start=(300, 371), tokens=512, prime=True)


@pytest.mark.parametrize("policy, slots, big", [("lru", 7, False), ("frequency", 7, False), ("lru", 11, False),
                                                ("lru", 45, True), ("frequency", 45, True)])
def test_reference_lookup_equals_brute_force(policy, slots, big):
    ps, kw = 4, (BIG if big else {})
    cache = _cache(policy, slots, tokens=kw.get("tokens", 128))
    assert cache.window == min(slots - 1, 32)
    brute = {(b, h): BruteCache(slots, policy, cache.window) for b in range(2) for h in range(2)}
    for (hk, _), pages, lengths, pos in _drive([cache], 30, [False], brute=brute, **kw):
        for (b, h), bc in brute.items():
            bc.append(int(pos[b]), ps)
            entries = pages[b, h].flatten().tolist()
            want = bc.lookup(entries, int(lengths[b]), ps)
            assert cache.slot_ids[b, h].flatten().tolist() == want
            for p, s in zip(entries, want):            # every slot read holds its page's tokens
                if s >= 0:
                    n = min(ps, int(lengths[b]) - p * ps)
                    assert torch.equal(cache.hbm_k[b, h, s * ps:s * ps + n].cpu(), hk[b, h, p * ps:p * ps + n])
    counts = torch.tensor([[[bc.touched, bc.hits, bc.misses] for h in range(2) for bc in [brute[(b, h)]]]
                           for b in range(2)])
    assert torch.equal(cache.stats.cpu(), counts)


@pytest.mark.parametrize("policy, slots, big", [("lru", 7, False), ("frequency", 7, False), ("lru", 45, True)])
def test_kernels_equal_reference(policy, slots, big):
    """Triton's prime, lookup, load and append leave the reference's state, bit for bit: on CUDA
    from a pinned host pool (read and written in place), on CPU in the interpreter (CPU tensors)."""
    pytest.importorskip("triton")
    kw = BIG if big else {}
    ref, tri = (_cache(policy, slots, tokens=kw.get("tokens", 128)) for _ in range(2))
    for _ in _drive([ref, tri], 12, [False, True], **kw):
        for name in ("table", "owner", "last", "freq"):
            assert torch.equal(getattr(ref, name)[..., :-1], getattr(tri, name)[..., :-1]), name
        for name in ("stats", "slot_ids", "slot_lengths", "n_load", "clock", "hand", "hbm_k", "hbm_v"):
            assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    # a multi-token append writes host memory only
    from lserve_hf.kernels import page_cache as KP
    hk, hv = _host(torch.zeros(2, 2, 64, 8)), _host(torch.zeros(2, 2, 64, 8))
    k, v = torch.randn(2, 2, 3, 8, device=DEV), torch.randn(2, 2, 3, 8, device=DEV)
    pos = torch.tensor([[5, 6, 7], [9, 10, 11]], device=DEV)
    KP.append_tokens(None, hk, hv, k, v, pos)
    if CUDA:
        torch.cuda.synchronize()
    wk, wv = torch.zeros_like(hk), torch.zeros_like(hv)
    write_host(wk, wv, k, v, pos)
    assert torch.equal(hk, wk) and torch.equal(hv, wv)


def test_decode_kernel_reads_the_page_cache_by_slot():
    """The unchanged decode kernel over the page cache, with slot ids and slot lengths, equals the
    reference over the whole pool with physical pages (interpreter on CPU)."""
    pytest.importorskip("triton")
    from lserve_hf import reference as R
    from lserve_hf.kernels.sparse_decode import sparse_paged_decode

    cache = _cache("lru", 7, D=16)
    for (hk, hv), pages, lengths, _ in _drive([cache], 6, [False], D=16):
        pass
    q = torch.randn(2, 2, 2, 16, generator=torch.Generator().manual_seed(5)).to(DEV)
    newest = R.with_newest_page(pages, lengths, 4)
    want = R.paged_decode(q.double(), hk.to(DEV).double(), hv.to(DEV).double(), newest, lengths, 4, 0.25)
    empty = q[:, :0]
    _, got = sparse_paged_decode(empty, empty, empty, empty, empty, q, cache.hbm_k, cache.hbm_v, cache.slot_ids,
                                 cache.slot_lengths, 0, 1, 4, 0.25, newest_page=True)
    assert torch.allclose(got.double(), want, atol=1e-5)
    slots = R.with_newest_page(cache.slot_ids, cache.slot_lengths, 4)
    located = R.paged_decode(q, cache.hbm_k, cache.hbm_v, slots, lengths, 4, 0.25, token_pages=newest)
    assert torch.allclose(located.double(), want, atol=1e-5)


# -- counters and the batch estimate ---------------------------------------------------------------

@pytest.mark.parametrize("policy, victims", [("lru", [1, 0]), ("frequency", [1, 2])])
def test_working_set_counters_on_a_crafted_pattern(policy, victims):
    """One row, one head, 10 pages (the newest 9), a cache of 4 slots. Steps read {0, 1}, {0, 2}
    and {3, 4} beside the newest: 3 pages touched a step; hits 0, 2 (0 and the newest), 1; the
    third step evicts page 1 (least recently / least often read), then page 0 (LRU) or page 2
    (frequency: read once, page 0 twice)."""
    cfg = LServeConfig(streaming_sparsity=0, page_size=4, logical_page_size=4, token_budget=8,
                       offload="host", hbm_pages=4, offload_policy=policy)
    pool = HostPagePool(cfg)
    keys = torch.randn(1, 1, 40, 16)
    pool.allocate(keys, 1, 40)
    pool.write(keys, keys + 1, 0, 40)
    lengths = torch.tensor([40])
    pool.summarize(lengths, 40)
    assert pool.stage_k is None and torch.equal(pool.pool_k, keys)       # the prompt left for host memory
    reads = [[0, 1, 9], [0, 2, -1], [3, 4, 9]]
    got = [pool.resident(torch.tensor(r).view(1, 1, 1, 3), lengths)[0, 0, 0].tolist() for r in reads]
    assert got[0] == [0, 1, 3] and got[1] == [0, 2, -1] and got[2] == victims + [3]
    ws = working_set(SimpleNamespace(layers=[SimpleNamespace(pool=pool)]))
    assert ws["steps"] == 3 and ws["hits"] == 3 and ws["misses"] == 6 and ws["hit_rate"] == 3 / 9
    assert ws["pages_per_step"][0].tolist() == [[3.0]]
    slots = pool.cache.slot_ids[0, 0, 0].tolist()
    for p, s in zip(reads[-1], slots):
        assert torch.equal(pool.cache.hbm_k[0, 0, s * 4:s * 4 + 4], keys[0, 0, p * 4:p * 4 + 4])


def test_max_batch_size_grows_with_memory_and_offload_fits_more():
    model = patch_model(tiny_llama(layers=3, heads=4, kv_heads=2), SMALL, PATTERN)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fits = [max_batch_size(model, 4096, weights + m, new_tokens=64) for m in range(0, 2 ** 24, 2 ** 20)]
    for a, b in zip(fits, fits[1:]):
        assert b.in_memory >= a.in_memory and b.offload >= a.offload
    last = fits[-1]
    assert last.offload > last.in_memory > 0 and last.weights == weights
    assert max_batch_size(model, 4096, 2 ** 24, weights=False).in_memory > last.in_memory
    bound = max_batch_size(model, 4096, 2 ** 30, host_memory_bytes=3 * last.host_row_bytes)
    assert bound.offload == 3
    # the per-row figure is what the caches hold: one row, offloaded, at 4096 + 64 tokens
    cfg = dataclasses.replace(SMALL, offload="host")
    patch_model(model, cfg, PATTERN)
    ids = torch.randint(1, 100, (1, 4096), generator=torch.Generator().manual_seed(1))
    cache = LServeCache(model, max_length=4096 + 64)
    with torch.no_grad():
        out = model(ids, past_key_values=cache)
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    gpu = sum(layer.pool.gpu_bytes() if isinstance(layer.pool, HostPagePool) else layer.pool.nbytes()
              for layer in cache.layers) + sum(layer.streaming.nbytes() for layer in cache.layers)
    assert abs(gpu - max_batch_size(model, 4096, 2 ** 30, 64).row_bytes_offload) < 0.02 * gpu
    unpatch_model(model)


def test_hbm_pages_for_is_the_largest_page_cache_that_fits():
    """The slot count hbm_pages_for returns fits the budget with max_batch_size's count, one more
    slot does not (or it is one slot per page); too small a budget gives None."""
    from lserve_hf import hbm_pages_for

    model = patch_model(tiny_llama(layers=3, heads=4, kv_heads=2), SMALL, PATTERN)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        def row(pages):
            patch_model(model, dataclasses.replace(SMALL, offload="host", hbm_pages=pages), PATTERN)
            return max_batch_size(model, 4096, 2 ** 40, 64).row_bytes_offload

        floor = row(1)                                   # raised to one step's reads
        for batch, extra in ((1, floor + 5000), (3, 3 * floor + 40000), (2, 2 ** 30)):
            patch_model(model, SMALL, PATTERN)
            pages = hbm_pages_for(model, 4096, weights + extra, batch, 64)
            assert pages is not None and batch * row(pages) <= extra
            assert pages == 4160 // 16 + 1 or batch * row(pages + 1) > extra, (batch, extra, pages)
        assert pages == 4160 // 16 + 1                    # a GiB holds every page: one slot each
        patch_model(model, SMALL, PATTERN)
        assert hbm_pages_for(model, 4096, weights + floor - 1, 1, 64) is None
    finally:
        unpatch_model(model)


# -- on CUDA: the Triton kernels, pinned host memory, CUDA graphs ------------------------------------

@gpu
def test_gpu_host_pool_is_pinned_at_its_size():
    """Page-locked in place (cudaHostRegister), not through torch's pinned allocator, which rounds
    up to a power of two. torch's is_pinned() may know only its own allocator's blocks, so the
    check asks CUDA: unregistering the range succeeds only if it was registered (it is then
    registered again, as it was)."""
    import mmap

    t = host_zeros((3, 5, 7, 64), torch.bfloat16, pin=True)
    assert t.untyped_storage().nbytes() <= t.numel() * 2 + 2 * 4096 and not t.any()
    if not t.is_pinned():
        cudart = torch.cuda.cudart()
        assert int(cudart.cudaHostUnregister(t.data_ptr())) == 0
        size = -(-t.numel() * 2 // mmap.PAGESIZE) * mmap.PAGESIZE
        assert int(cudart.cudaHostRegister(t.data_ptr(), size, 0)) == 0


@gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_offloaded_generate_equals_in_memory(graphs):
    """The patched model on CUDA: Triton prefill, selection, page-cache lookup / load / append and
    decode (two launches, the retrieval heads by slot), eager or replayed as CUDA graphs."""
    ids = torch.randint(1, 100, (2, 300), generator=torch.Generator().manual_seed(0)).to("cuda")
    mask = torch.ones_like(ids)
    mask[1, :29] = 0
    cfg = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=16, token_budget=64,
                       prefill_sink=4, prefill_local=64, decode_sink=4, decode_local=32, prefill_chunk_size=128,
                       cuda_graphs=graphs)
    out = {}
    for name, c in (("memory", cfg), ("offload", dataclasses.replace(cfg, offload="host", hbm_pages=4))):
        model = patch_model(tiny_llama(layers=3, heads=4, kv_heads=2).cuda(), c, PATTERN)
        with torch.no_grad():
            out[name] = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
    a, b = torch.stack(out["offload"].logits), torch.stack(out["memory"].logits)
    assert ((a - b).norm() / b.norm()) < 1e-4
    assert (out["offload"].sequences == out["memory"].sequences).float().mean() > 0.95
    ws = out["offload"].past_key_values.working_set()
    assert ws["steps"] == out["offload"].sequences.shape[1] - ids.shape[1] - 1 and ws["misses"] > 0


@gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_embedded_model_gives_the_in_memory_tokens(embedded_on_gpu_box, graphs):
    """On CUDA (float32, Triton kernels, pinned host pool, primed page cache), eager or in
    graphs, 24 new tokens."""
    model, tok = embedded_on_gpu_box
    try:
        out, _, _ = _embedded_offload_vs_memory(model.cuda(), tok, "cuda", 24, cuda_graphs=graphs)
    finally:
        model.cpu()
    assert torch.equal(out["offload"].sequences, out["memory"].sequences)
