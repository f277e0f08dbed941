"""SparseServe's hierarchical KV memory for LServe (``LServeConfig(offload="host")``): the
retrieval heads' pages live in host memory, and each (row, retrieval KV head) keeps the pages
decode reads in a GPU page cache.

Where each piece lives, and why:
- host memory (pinned, mapped for the GPU): every retrieval token, written once. A layer's
  prompt goes there when the layer has stored it; a decode token as it is appended, by a kernel
  that writes through the mapping from inside the step (no copy call, nothing waits).
- GPU: the page summaries (selection scores every page every few steps), the streaming heads'
  sink and ring buffers, and the page cache (``page_cache.PageCache``): each row's newest page
  and the pages recent steps read. A decode step looks its read list up and loads its misses
  from host memory in one launch each, all on the device, so it sits in the captured graph.
- during a prompt, the layer's retrieval KV on the GPU (``stage_k``/``stage_v``): the prompt's
  chunks attend to it and its summaries are computed from it; the layer's ``finish_prompt``
  sends it to host memory on a side stream and frees it. A layer-segmented prefill
  (``segmented.py``) thus holds about one layer's KV on the GPU at a time.

``max_batch_size`` sizes a batch for a GPU memory budget with and without offload;
``working_set`` reads the page caches' counters (``LServeCache.working_set()``).
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass

import torch

from . import ops
from .page_cache import SLOT_BITS, PageCache, write_host
from .pages import PagePool, round_up

_STREAMS: dict = {}


def host_zeros(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Zeroed host memory; ``pin``: page-locked and mapped into the GPU's address space (UVA, so
    a kernel reads it through its pointer). Registered in place at the size asked:
    ``torch.empty(pin_memory=True)`` rounds every allocation up to a power of two, which would
    nearly double a host pool. Falls back to ``pin_memory=True`` if registration fails."""
    n = 1
    for x in shape:
        n *= x
    if not pin:
        return torch.zeros(shape, dtype=dtype)
    nbytes = n * dtype.itemsize
    page = mmap.PAGESIZE
    size = round_up(max(nbytes, 1), page)
    raw = torch.empty(size + page, dtype=torch.uint8)
    buf = raw[(-raw.data_ptr()) % page:][:size]      # whole pages of its own: no other tensor's
    buf.zero_()                                      # faults every page in (threaded) before locking
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buf.data_ptr(), size, 0)) != 0:   # 0: mapped and portable under UVA
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    out = buf.view(dtype)[:n].view(shape)
    weakref.finalize(out, cudart.cudaHostUnregister, buf.data_ptr())
    return out


def _side_stream(device) -> torch.cuda.Stream:
    """The stream a prompt's KV is copied to host memory on (one per device), beside the compute."""
    key = str(device)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


def page_cache_slots(config, group: int, columns: int) -> int:
    """Slots of the page cache per (row, retrieval KV head): ``hbm_pages`` (None: 2x
    ``pages_per_selection``), at least what one step can read: each of the ``group`` query heads
    of a KV head reads the ``columns`` pages of its read list, and the newest, in a slot of its own."""
    floor = group * columns + 1
    want = config.hbm_pages or 2 * config.pages_per_selection
    if config.hbm_pages is not None and config.hbm_pages < floor:
        ops.say_once(f"LServe offload: hbm_pages={config.hbm_pages} is fewer than one decode step can read "
                     f"({group} query heads x {columns} pages + the newest); the page cache holds {floor}.")
    return max(want, floor)


class HostPagePool(PagePool):
    """A ``PagePool`` whose pages live in host memory (``pool_k``/``pool_v``, every token of
    every row, as a PagePool's; pinned when the model runs on CUDA), with the summaries on the
    GPU and a GPU page cache (``cache``, made at the first decode step, when the read lists'
    shape is known). ``stage_k``/``stage_v``: the prompt on the GPU while it comes in.
    ``summarize`` at the end of a prompt is where the prompt leaves for host memory."""

    CHUNK = 65536   # tokens per host-to-GPU copy when summaries are built from host memory

    def __init__(self, config):
        super().__init__(config)
        self.stage_k = self.stage_v = None
        self.cache: PageCache | None = None
        self.device = None
        self.saved = None    # CUDA event: the prompt's copy to host memory (side stream) is done

    @property
    def pinned(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def allocate(self, like: torch.Tensor, heads: int, tokens: int) -> None:
        B, _, _, D = like.shape
        cap = round_up(max(tokens, 1), self.config.page_size)
        self.device = like.device
        self.pool_k = host_zeros((B, heads, cap, D), like.dtype, self.pinned)
        self.pool_v = host_zeros((B, heads, cap, D), like.dtype, self.pinned)
        self.stage_k = like.new_zeros(B, heads, cap, D)
        self.stage_v = like.new_zeros(B, heads, cap, D)
        self.kmax = self.kmin = self.cache = None

    def prompt_store(self):
        return self.stage_k, self.stage_v

    def summarize(self, lengths: torch.Tensor, longest: int) -> None:
        """Summaries from keys on the GPU: the staged prompt's, which then goes to host memory
        (its layer has stored it), or, past the budget later, host memory's chunk by chunk."""
        needs = self.needs_summaries(longest)
        if self.stage_k is not None:
            if needs:
                self.kmax, self.kmin = ops.page_summaries(self.stage_k, lengths, self.config)
            self._send_prompt()
        elif needs:
            self._quiet()
            n = round_up(self.CHUNK, self.config.page_size)
            parts = [ops.page_summaries(self.pool_k[:, :, a:a + n].to(self.device), (lengths - a).clamp(min=0),
                                        self.config) for a in range(0, self.capacity, n)]
            self.kmax, self.kmin = (torch.cat([p[i] for p in parts], 2) for i in (0, 1))

    def _send_prompt(self) -> None:
        """The staged prompt to host memory, then freed. On CUDA the copy runs on a side stream
        (the next layer computes meanwhile); the allocator reuses the stage only once it is done
        (``record_stream``), and the first GPU access to host memory waits for it (``saved``)."""
        stage = (self.stage_k, self.stage_v)
        self.stage_k = self.stage_v = None
        if not self.pinned:
            self.pool_k.copy_(stage[0])
            self.pool_v.copy_(stage[1])
            return
        side = _side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for host, t in zip((self.pool_k, self.pool_v), stage):
                host.copy_(t, non_blocking=True)
                t.record_stream(side)
            self.saved = torch.cuda.Event()
            self.saved.record(side)

    def _gpu_after_copy(self) -> None:
        """Before a kernel touches host memory: the stream waits (on the device) for the prompt's
        copy. Runs at the first decode step, which is eager (no graph is captured before it)."""
        if self.saved is not None:
            torch.cuda.current_stream(self.device).wait_event(self.saved)
            self.saved = None

    def _quiet(self) -> None:
        """Before the CPU touches host memory (outside decode steps: growth, batch operations,
        crops, extends): every GPU write to it is done. A host sync, on purpose."""
        if self.pinned:
            if self.saved is not None:
                self.saved.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        self.saved = None

    def _kernels(self, like: torch.Tensor):
        """``lserve_hf.kernels`` when the page-cache kernels take tensors like ``like``, else None."""
        kern = ops._kernels_for(self.config, like)
        return kern if kern is not None and ops._supported(self.config, "page cache", like) else None

    def token_range(self, a: int, b: int):
        if self.stage_k is not None:
            return self.stage_k[:, :, a:b], self.stage_v[:, :, a:b]
        self._quiet()
        return self.pool_k[:, :, a:b].to(self.device), self.pool_v[:, :, a:b].to(self.device)

    def grow(self, needed: int, min_step: int = 0) -> bool:
        extra = self._growth(needed, min_step)
        if not extra:
            return False
        self._quiet()
        B, Hr, cap, D = self.pool_k.shape
        for name in ("pool_k", "pool_v"):
            new = host_zeros((B, Hr, cap + extra, D), self.pool_k.dtype, self.pinned)
            new[:, :, :cap].copy_(getattr(self, name))
            setattr(self, name, new)
        self._grow_summaries(extra)
        if self.cache is not None:
            self.cache.grow_table((cap + extra) // self.config.page_size)
        return True

    def append(self, kr: torch.Tensor, vr: torch.Tensor, pos: torch.Tensor | None, at: int | None = None) -> None:
        """S new tokens per row at positions ``pos`` ``[B, S]`` (or the host position ``at`` of
        every row's one token): to host memory, their keys into the summaries, and a decode
        token to the newest page's slot. Several tokens may open pages, so the cache forgets its
        pages then (the next lookup loads what it reads)."""
        if pos is None:
            pos = torch.full((kr.shape[0], 1), at, dtype=torch.long, device=kr.device)
        self._gpu_after_copy()
        if self.kmax is not None:
            ops.update_summaries(self.kmax, self.kmin, kr, pos, self.config)
        kern = self._kernels(kr)
        if kern is not None:
            kern.append_tokens(self.cache, self.pool_k, self.pool_v, kr, vr, pos)
        else:
            write_host(self.pool_k, self.pool_v, kr, vr, pos)
            if self.cache is not None and kr.shape[2] == 1:
                self.cache.append(kr, vr, pos)
        if self.cache is not None and kr.shape[2] > 1:
            self.cache.reset()

    def resident(self, pages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Slot ids into ``cache.hbm_k``/``hbm_v`` for the read lists ``pages`` ``[B, Hr, G, K]``
        (physical pages, -1 empty), the misses loaded from host memory: all on the device, no
        host sync (the step may be a captured graph)."""
        B, Hr, G, K = pages.shape
        self._gpu_after_copy()
        new = self.cache is None
        if new:
            cfg = self.config
            self.cache = PageCache(B, Hr, self.pool_k.shape[-1], page_cache_slots(cfg, G, K),
                                   self.capacity // cfg.page_size, G * K, cfg.page_size, cfg.offload_policy,
                                   self.pool_k.dtype, self.device)
        kern = self._kernels(self.cache.hbm_k)
        if new:      # a new cache starts with each row's newest pages (page_cache's docstring)
            (kern.prime_pages if kern is not None else PageCache.prime)(self.cache, self.pool_k, self.pool_v, lengths)
        if kern is not None:
            kern.lookup_pages(self.cache, pages, lengths)
            kern.load_pages(self.cache, self.pool_k, self.pool_v)
        else:
            self.cache.lookup(pages, lengths)
            self.cache.load(self.pool_k, self.pool_v)
        return self.cache.slot_ids

    def decode_view(self, pages: torch.Tensor, lengths: torch.Tensor):
        """The page cache, the slot ids of ``pages`` and (slot lengths, pages): with the slot
        lengths the decode kernel reads the cache as it reads a pool (``page_cache``'s
        docstring); the torch path locates tokens by the pages themselves."""
        slots = self.resident(pages, lengths)
        return self.cache.hbm_k, self.cache.hbm_v, slots, (self.cache.slot_lengths, pages)

    def crop(self, lengths: torch.Tensor, shortest: int, longest: int) -> None:
        super().crop(lengths, shortest, longest)
        if self.cache is not None:
            self.cache.reset()    # the newest page may now be one the cache holds as full

    def apply(self, fn) -> None:
        """A batch operation: on host memory through the rows it selects (``fn`` applied to the
        row numbers), in place when the batch keeps its size (captured graphs hold the address)."""
        if self.pool_k is None:
            return
        rows = fn(torch.arange(self.pool_k.shape[0]))
        self._quiet()
        self.pool_k, self.pool_v = (_take_rows(t, rows, self.pinned) for t in (self.pool_k, self.pool_v))
        for name in ("kmax", "kmin", "stage_k", "stage_v"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.cache is not None:
            self.cache.apply(fn)

    def tensors(self) -> dict:
        return {n: getattr(self, n) for n in ("pool_k", "pool_v", "kmax", "kmin", "stage_k", "stage_v")}

    def nbytes(self) -> int:
        return super().nbytes() + (self.cache.nbytes() if self.cache is not None else 0)

    def gpu_bytes(self) -> int:
        """Bytes this pool holds on the GPU: summaries, the staged prompt, the page cache."""
        t = [self.kmax, self.kmin, self.stage_k, self.stage_v]
        return sum(x.numel() * x.element_size() for x in t if x is not None) + \
            (self.cache.nbytes() if self.cache is not None else 0)


def _take_rows(t: torch.Tensor, rows: torch.Tensor, pin: bool) -> torch.Tensor:
    """Rows ``rows`` of host tensor ``t``: in place when the count is unchanged (a copy of only
    the rows that move), else a new host tensor."""
    rows = rows.to("cpu", torch.long)
    if rows.numel() != t.shape[0]:
        out = host_zeros((rows.numel(),) + tuple(t.shape[1:]), t.dtype, pin)
        return torch.index_select(t, 0, rows, out=out)
    moved = [(i, r) for i, r in enumerate(rows.tolist()) if r != i]
    saved = {r: t[r].clone() for r in {r for _, r in moved}}
    for i, r in moved:
        t[i].copy_(saved[r])
    return t


def working_set(cache) -> dict:
    """The page caches' counters of an ``LServeCache`` (one device sync, on demand): per offloaded
    layer, the pages each (row, retrieval KV head) touched per step (``pages_per_step``, ``[B, Hr]``,
    the newest page counted) and its hits and misses; overall hit rate. ``steps``: decode steps."""
    layers = [(i, layer.pool.cache) for i, layer in enumerate(cache.layers)
              if isinstance(layer.pool, HostPagePool) and layer.pool.cache is not None]
    stats = [c.stats.to("cpu") for _, c in layers]
    steps = int(layers[0][1].clock) if layers else 0
    hits = sum(int(s[..., 1].sum()) for s in stats)
    misses = sum(int(s[..., 2].sum()) for s in stats)
    return dict(layers=[i for i, _ in layers], steps=steps, slots=[c.slots for _, c in layers],
                pages_per_step=[s[..., 0].double() / max(steps, 1) for s in stats],
                hits=hits, misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None,
                layer_hit_rate=[float(s[..., 1].sum()) / max(1, int(s[..., 1:].sum())) for s in stats])


@dataclass(frozen=True)
class BatchFit:
    """What ``max_batch_size`` found: the largest batches, and the bytes behind them."""

    in_memory: int           # rows that fit with every page on the GPU
    offload: int             # rows that fit with offload="host" (host memory too, when given)
    row_bytes_in_memory: int  # GPU bytes of one row's KV, every page on the GPU
    row_bytes_offload: int   # GPU bytes of one row with offload: streaming buffers, summaries, page cache
    host_row_bytes: int      # pinned host bytes of one row with offload
    weights: int             # bytes taken off the budget first (0 with weights=False)


def _row_bytes(model, context: int, new_tokens: int, hbm_pages: int | None = None, caller: str = "max_batch_size"):
    """GPU bytes of one row's KV with every page on the GPU and with offload (``hbm_pages`` slots,
    None: the config's), its pinned host bytes with offload, and the page cache's bounds
    (the floor one step reads, and one slot per page past that) for ``max_batch_size``."""
    state = getattr(model, "_lserve", None)
    if state is None:
        raise ValueError(f"{caller} needs a model patched with lserve_hf.patch_model(model).")
    cfg, mc = state.config, model.config
    G = mc.num_attention_heads // mc.num_key_value_heads
    D = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    elt = next(model.parameters()).element_size()
    tokens = context + new_tokens
    cap = round_up(max(tokens, 1), cfg.page_size)
    K = cfg.pages_per_selection          # the read list of a query head (the newest page besides)
    floor = G * K + 1
    slots = page_cache_slots(cfg, G, K) if hbm_pages is None else max(hbm_pages, floor)
    per_head = 2 * cap * D * elt
    summaries = 2 * (cap // cfg.logical_page_size) * D * elt if tokens > cfg.token_budget else 0
    streaming = 2 * (min(cfg.decode_sink, tokens) + min(cfg.decode_local, tokens)) * D * elt
    cached = PageCache.row_bytes(slots, cap // cfg.page_size, G * K, D, cfg.page_size, elt)
    mem = off = host = 0
    for plan in state.plans:
        hs, hr = plan.n_stream, plan.n_retrieval
        mem += hs * streaming + hr * (per_head + summaries)
        if hr and not plan.dense:
            off += hs * streaming + hr * (summaries + cached)
            host += hr * per_head
        else:
            off += hs * streaming + hr * (per_head + summaries)
    return mem, off, host, (floor, cap // cfg.page_size + 1)


def _weights(model, weights: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if weights else 0


def max_batch_size(model, context: int, memory_bytes: int, new_tokens: int = 0, *, weights: bool = True,
                   host_memory_bytes: int | None = None) -> BatchFit:
    """The largest batch of rows of ``context`` prompt tokens plus ``new_tokens`` whose KV fits
    ``memory_bytes`` of GPU memory, with every page on the GPU and with ``offload="host"``, for a
    model patched with ``patch_model`` (its head pattern and config; the offload figure holds for
    its config with ``offload="host"``, whatever the config says).

    Counted per row and layer: the streaming heads' sink + ring buffers, the retrieval heads' pages
    (in memory) or their page cache (``page_cache_slots`` slots, the newest page's included, and its
    tables), the page summaries once the context passes the budget; dense layers keep their
    pages on the GPU. ``weights``: the model's parameters are taken off the budget first (the
    budget is then the GPU's memory); activations are not counted. ``host_memory_bytes``: also
    bound the offload batch by the pinned host memory its pools take."""
    mem, off, host, _ = _row_bytes(model, context, new_tokens)
    w = _weights(model, weights)
    budget = max(0, memory_bytes - w)
    fit_off = budget // max(off, 1)
    if host_memory_bytes is not None and host:
        fit_off = min(fit_off, host_memory_bytes // host)
    return BatchFit(int(budget // max(mem, 1)), int(fit_off), mem, off, host, w)


def hbm_pages_for(model, context: int, memory_bytes: int, batch: int = 1, new_tokens: int = 0, *,
                  weights: bool = True) -> int | None:
    """The largest ``hbm_pages`` with which ``batch`` offloaded rows of ``context`` prompt tokens
    plus ``new_tokens`` fit ``memory_bytes`` of GPU memory (counted as ``max_batch_size`` counts;
    ``weights``: the parameters come off first). At most one slot per page (a cache that holds
    every page misses only on its first reads); None when not even one step's reads fit.
    Leave room for activations: the count does not include them."""
    budget = max(0, memory_bytes - _weights(model, weights))
    _, _, _, (lo, hi) = _row_bytes(model, context, new_tokens, caller="hbm_pages_for")
    hi = min(hi, (1 << SLOT_BITS) - 1)

    def fits(slots):
        return batch * _row_bytes(model, context, new_tokens, slots)[1] <= budget

    if not fits(lo):
        return None
    while lo < hi:                  # the largest slot count that fits: bytes grow with slots
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_generate(model, args, kwargs) -> None:
    """``generate()`` on an offloaded model, on CUDA: log once when its batch is more than the
    GPU's free memory holds with offload (``max_batch_size`` of the free bytes, weights already
    loaded): past that the page caches do not fit, and with a smaller ``hbm_pages`` they thrash."""
    x = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs", kwargs.get("inputs_embeds")))
    dev = next(model.parameters()).device
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or dev.type != "cuda":
        return
    gen = kwargs.get("generation_config") or model.generation_config
    rows = x.shape[0] * int(kwargs.get("num_return_sequences", gen.num_return_sequences) or 1) * \
        int(kwargs.get("num_beams", gen.num_beams) or 1)
    new = kwargs.get("max_new_tokens", gen.max_new_tokens) or max(0, (gen.max_length or 0) - x.shape[1])
    free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    fit = max_batch_size(model, x.shape[1], free, new, weights=False)
    if rows > fit.offload:
        ops.say_once(
            f"LServe offload: {rows} rows of {x.shape[1] + new} tokens need {rows * fit.row_bytes_offload / 2**30:.1f} "
            f"GiB of GPU memory for their KV (streaming buffers, summaries, page caches), {free / 2**30:.1f} GiB are "
            f"free: {fit.offload} rows fit (lserve_hf.max_batch_size). The HBM page cache will thrash if hbm_pages is "
            "lowered to fit, or the run will run out of memory: lower the batch.")
