"""The LServe KV cache: a thin ``transformers.Cache`` over one ``LServeLayer`` per decoder layer.

Each layer owns its stores, one per kind of KV head, and its page selection:
- streaming heads: a sink buffer and a ring buffer (``streaming.StreamingStore``), constant size;
- retrieval heads: a page pool that grows by whole physical pages, with per-logical-page key
  max/min summaries (``pages.PagePool``), and the page selection (``selector.PageSelector``).
The cache owns what all layers share: each row's stored length on the device (``lengths``) and
the host bookkeeping of its forwards (``step``, a ``DecodeStep``).

Rows are stored from their first real token (left padding removed), so every row's pages, sinks
and budget are exactly what the same prompt would get alone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .offload import HostPagePool
from .pages import PagePool, round_up
from .selector import PageSelector
from .step import DecodeStep
from .streaming import StreamingStore

# Up front, the page pools hold the prompt plus at most this many new tokens: generate() with a
# huge max_new_tokens must not reserve memory it may never use; past it the pools grow.
RESERVE_NEW_TOKENS = 16384


class LServeLayer(CacheLayerMixin):
    """One decoder layer's LServe KV: streaming sink + ring, retrieval page pool + summaries, and
    the page selection. ``epoch`` changes whenever a store is reallocated (captured decode graphs
    hold the stores' addresses)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, plan, capacity: int = 0):
        super().__init__()
        cfg = plan.config
        self.plan = plan
        self.capacity = capacity    # tokens to allocate the page pool for at prefill (0: the prompt's)
        self.streaming = StreamingStore(cfg.decode_sink, cfg.decode_local)
        # offload="host": retrieval pages in host memory, a GPU page cache (dense layers read every page)
        self.pool = (HostPagePool if cfg.offload and not plan.dense and plan.n_retrieval else PagePool)(cfg)
        self.selector = PageSelector(cfg, plan.dense, plan.rope_inv_freq)
        self.prompt_k = self.prompt_v = None   # streaming heads' prompt while it comes in chunks
        self.epoch = 0

    # -- transformers' CacheLayerMixin ---------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        raise NotImplementedError("LServeCache counts positions itself: use cache.get_seq_length().")

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        raise NotImplementedError("LServeCache sizes masks itself: use cache.get_mask_sizes().")

    def get_max_length(self) -> int:
        return -1

    def _no_dense(self, value=None):
        if value is not None:
            raise AttributeError("LServeLayer keys and values live in its stores; they cannot be set.")

    def _dense(self):
        raise AttributeError(
            "LServeLayer keeps no dense key/value tensor: streaming heads keep `layer.streaming` (sink + "
            "ring buffers), retrieval heads `layer.pool` (pages). Unpatch the model "
            "(lserve_hf.unpatch_model) for a DynamicCache with .keys / .values.")

    keys = property(_dense, _no_dense)
    values = property(_dense, _no_dense)

    def update(self, key_states, value_states, cache=None, *args, **kwargs):
        """Store new keys/values (``cache``: the LServeCache, for the forward in progress).
        Returns them unchanged: a prefill attends to them directly; later forwards attend to the
        stores (``attention.py``)."""
        if not isinstance(cache, LServeCache):
            raise TypeError("LServeLayer.update is called by LServeCache.update, with the cache.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fwd = cache.step.current
        if fwd.kind in ("prefill", "chunk"):
            self._store_prompt(key_states, value_states, cache, fwd)
        else:
            self._append(key_states, value_states, cache, fwd)
        return key_states, value_states

    def reset(self):
        epoch = self.epoch
        self.__init__(self.plan, self.capacity)
        self.epoch = epoch + 1      # never repeat an epoch: graphs of the old stores must not replay

    def crop(self, tokens_to_remove):
        raise NotImplementedError("LServeCache crops all layers at once: use cache.crop().")

    def apply(self, fn) -> None:
        """Apply a batch operation to every store (beam search, repeats, row selection)."""
        self.streaming.apply(fn)
        self.pool.apply(fn)
        self.selector.apply(fn)

    # -- the prompt ----------------------------------------------------------------------------
    def _store_prompt(self, k, v, cache, fwd) -> None:
        """Write a prompt (or one chunk of it) as given, left padding included: retrieval heads to
        the page pool, streaming heads to a prompt buffer that :meth:`finish_prompt` turns into
        sink + ring. A one-pass prefill is finished at once."""
        B, H, S, D = k.shape
        ks, kr = self.plan.sort_by_kind(k)
        vs, vr = self.plan.sort_by_kind(v)
        total = cache.step.prompt_total or S
        a = fwd.before
        if a == 0:
            self.pool.allocate(k, kr.shape[1], max(total, self.capacity))
            self.prompt_k = k.new_empty(B, ks.shape[1], total, D)
            self.prompt_v = v.new_empty(B, ks.shape[1], total, D)
        self.pool.write(kr, vr, a, a + S)
        self.prompt_k[:, :, a:a + S], self.prompt_v[:, :, a:a + S] = ks, vs
        if fwd.kind == "prefill":
            self.finish_prompt(cache)

    def finish_prompt(self, cache) -> None:
        """The whole prompt is stored: compact rows past their left padding, fill the streaming
        heads' sink + ring from the prompt buffer (then freed) and summarise the pool's pages."""
        S = self.prompt_k.shape[2]
        lengths = cache.lengths_on(self.prompt_k.device)
        ks, vs = self.prompt_k, self.prompt_v
        self.prompt_k = self.prompt_v = None
        if cache.padded:
            B = ks.shape[0]
            kv_start = cache.kv_start.to(ks.device)
            idx = (torch.arange(S, device=ks.device).view(1, S) + kv_start.view(B, 1)).clamp(max=S - 1)
            shift = idx.view(B, 1, S, 1).expand(B, ks.shape[1], S, ks.shape[3])
            ks, vs = torch.gather(ks, 2, shift), torch.gather(vs, 2, shift)
            self.pool.shift_rows(idx, S)
        longest = cache.prompt_rows[1]
        self.streaming.fill(ks, vs, lengths, slots=max(self.capacity, longest), record_past=cache.record_past)
        self.pool.summarize(lengths, longest)
        self.epoch += 1

    # -- decode and extend ---------------------------------------------------------------------
    def _append(self, k, v, cache, fwd) -> None:
        """Append S new tokens per row at slots ``lengths[b] - S + i`` (``lengths`` already
        counts them)."""
        B, H, S, D = k.shape
        lengths = cache.lengths_on(k.device)
        # a CPU decode step whose rows all hold as many tokens writes at one host position: a copy
        # per store, no scatter indices (nothing is captured in a graph there)
        at = fwd.longest - 1 if S == 1 and fwd.uniform and k.device.type == "cpu" else None
        pos = None if at is not None else lengths.view(B, 1) - S + torch.arange(S, device=k.device).view(1, S)
        ks, kr = self.plan.sort_by_kind(k)
        vs, vr = self.plan.sort_by_kind(v)
        self.reserve(fwd.longest, lengths - S)
        if kr.shape[1]:
            self.pool.append(kr, vr, pos, at=at)
        if ks.shape[1]:
            if S > 1 and cache.record_past and self.streaming.keep_undo(fwd.longest - S):
                self.epoch += 1     # graphs captured before the undo log would not write it
            self.streaming.append(ks, vs, pos, past_sink=cache.step.shortest >= self.streaming.sink, at=at)

    def reserve(self, longest: int, stored: torch.Tensor, min_step: int = 0) -> None:
        """Make room for rows of ``longest`` tokens before they are written (outside a captured
        step): grow the page pool and the streaming buffers, and summarise the pages (``stored``:
        each row's tokens written so far) once the context passes the token budget; within the
        budget attention is dense and needs no summaries."""
        moved = self.pool.grow(longest, min_step) | self.streaming.reserve(longest)
        if self.pool.heads and self.pool.kmax is None and self.pool.needs_summaries(longest):
            self.pool.summarize(stored, longest)
            moved = True
        if moved:
            self.epoch += 1

    def kv_bytes(self, stored: int, reserved: bool = False) -> int:
        """Bytes of this layer's KV: of the ``stored`` tokens per row it holds (its longest row),
        or, with ``reserved``, of its tensors (spare pages, undo logs and prompt buffers too)."""
        if reserved:
            return self.streaming.nbytes() + self.pool.nbytes() + sum(
                t.numel() * t.element_size() for t in (self.prompt_k, self.prompt_v) if t is not None)
        return self.streaming.stored_bytes(stored) + self.pool.stored_bytes(stored)


class LServeCache(Cache):
    """KV cache of a patched model. ``generate()`` and plain forwards of a patched model create
    one per call; pass ``LServeCache(model)`` as ``past_key_values`` to keep it yourself."""

    def __init__(self, model=None, *, plans=None, max_length: int | None = None, patch_token=None):
        """``max_length``: tokens (prompt + new) to allocate the page pools for at prefill, so that
        decoding never grows them (at most the prompt + ``RESERVE_NEW_TOKENS`` up front)."""
        if plans is None:
            state = getattr(model, "_lserve", None)
            if state is None:
                raise ValueError("LServeCache(model) needs a model patched with lserve_hf.patch_model(model).")
            plans, patch_token = state.plans, state.token
        super().__init__(layers=[LServeLayer(p) for p in plans])
        self.max_length = max_length
        self.patch_token = patch_token     # the patch_model call this cache was made for
        self.step = DecodeStep(self.config.refresh_interval)
        self._lengths = {}        # device -> int64 [B]: real tokens stored per row
        self.kv_start = None      # [B] each row's left padding in the prompt
        self.padded = False       # host: some row of the prompt is left-padded
        self.prompt_rows = (0, 0)  # host (shortest, longest) real lengths of the stored prompt's rows
        self.record_past = False  # streaming rings keep what they overwrite (assisted decoding)
        self.unusable = None      # why this cache refuses further forwards (None: it does not)
        self.decode_graphs = None  # lserve_hf.decode_graph.DecodeGraphs, made on the first graph step

    @property
    def config(self):
        return self.layers[0].plan.config

    @property
    def epoch(self) -> int:
        """Changes whenever a layer reallocates a store."""
        return sum(layer.epoch for layer in self.layers)

    @property
    def lengths(self) -> torch.Tensor | None:
        """Real tokens stored per row ``[B]`` (on the first layer's device)."""
        return next(iter(self._lengths.values()), None)

    def lengths_on(self, device) -> torch.Tensor:
        """The row lengths on ``device`` (a copy per device for models split across devices)."""
        key = str(device)
        if key not in self._lengths:
            self._lengths[key] = self.lengths.to(device)
        return self._lengths[key]

    # -- transformers' Cache -------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.step.current is None:
            raise RuntimeError(
                "This LServeCache is used outside a patched model's forward (was the model unpatched, "
                "or patched again since the cache was made?). Patch the model with "
                "lserve_hf.patch_model and let it create its cache, or pass LServeCache(model).")
        return self.layers[layer_idx].update(key_states, value_states, self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.step.seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.step.seen + q, 0

    @property
    def is_croppable(self) -> bool:
        return True

    def activate_past_recording(self) -> None:
        """Assisted decoding will crop rejected drafts: streaming rings keep what they overwrite."""
        self.record_past = True
        for layer in self.layers:
            if layer.streaming.heads and layer.streaming.keep_undo(self.step.longest):
                layer.epoch += 1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: ``crop(-n)`` removes n; a positive value is the length to keep."""
        n = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self.step.seen - tokens_to_remove)
        if n == 0:
            return
        if n > self.step.shortest:
            raise ValueError(f"cannot crop {n} tokens from a cache whose shortest row holds {self.step.shortest}.")
        for layer in self.layers:
            if layer.streaming.heads:
                layer.streaming.crop(self.lengths_on(layer.streaming.ring_k.device), n, self.step.longest)
        self.advance_lengths(-n)
        for layer in self.layers:
            if layer.pool.heads:
                layer.pool.crop(self.lengths_on(layer.device), self.step.shortest - n,
                                self.step.longest)
        self.step.crop(n)

    def reset(self):
        super().reset()
        self.__init__(plans=[layer.plan for layer in self.layers], max_length=self.max_length,
                      patch_token=self.patch_token)

    def _apply(self, fn, reallocates: bool) -> None:
        for layer in self.layers:
            layer.apply(fn)
            layer.epoch += reallocates
        self._lengths = {k: fn(t) for k, t in self._lengths.items()}
        if self.kv_start is not None:
            self.kv_start = fn(self.kv_start)

    def reorder_cache(self, beam_idx):
        # in place, so that the stores keep their addresses (captured decode graphs read them)
        self._apply(lambda t: t.copy_(t.index_select(0, beam_idx.to(t.device))), reallocates=False)

    def batch_repeat_interleave(self, repeats: int):
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0), reallocates=True)

    def batch_select_indices(self, indices):
        self._apply(lambda t: t[indices.to(t.device)], reallocates=True)
        if self.lengths is not None and self.lengths.numel():
            lo, hi = torch.stack([self.lengths.min(), self.lengths.max()]).tolist()
            self.step.select_rows(lo, hi)

    # -- forwards (driven by the patched decoder, lserve_hf.decoder) ----------------------------
    def begin_prompt(self, mask, batch: int, total: int, device) -> None:
        """A prompt of ``total`` positions per row is about to be stored; ``mask`` (a
        ``masks.PromptMask``) holds each row's left padding, the only padding LServe stores."""
        kv_start = mask.kv_start if mask.kv_start is not None and not mask.general else \
            torch.zeros(batch, dtype=torch.long, device=device)
        kv_start = kv_start.to(device)
        lo, hi = torch.stack([kv_start.min(), kv_start.max()]).tolist() if batch else (0, 0)
        if hi >= total:
            raise ValueError("A row of the batch holds no real token (its attention_mask is all zeros).")
        self.kv_start, self.padded = kv_start, hi > 0
        self._lengths = {str(device): (total - kv_start).long()}
        self.prompt_rows = (total - hi, total - lo)
        if self.max_length:
            cap = min(self.max_length, total + RESERVE_NEW_TOKENS)
            for layer in self.layers:
                layer.capacity = round_up(cap, self.config.page_size)

    def advance_lengths(self, n: int) -> None:
        """Device side of a forward that appends ``n`` tokens per row (captured with a decode step)."""
        for t in self._lengths.values():
            t.add_(n)

    def finish_prompt(self) -> None:
        """After a chunked prefill's last chunk."""
        for layer in self.layers:
            layer.finish_prompt(self)

    def working_set(self) -> dict:
        """Page-cache counters of an offloaded cache (``lserve_hf.offload.working_set``)."""
        from .offload import working_set

        return working_set(self)

    def kv_bytes(self, reserved: bool = False) -> int:
        """Bytes of the tokens stored (streaming heads: sink + window; retrieval heads: their tokens and
        page summaries), or with ``reserved`` the memory the stores take (``lserve_hf.kv_bytes``)."""
        return sum(layer.kv_bytes(self.step.longest, reserved) for layer in self.layers)
