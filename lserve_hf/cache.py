"""The LServe KV cache: a thin ``transformers.Cache`` over one ``LServeLayer`` per decoder layer.

Each layer owns two stores, one per kind of KV head:
- streaming heads: a sink buffer and a ring buffer (``streaming.py``), constant size;
- retrieval heads: a page pool ``[B, Hr, capacity, D]`` that grows by whole physical pages, with
  per-logical-page key max/min summaries (``pages.py``) for query-aware page selection.

Rows are stored from their first real token (left padding removed), so every row's pages, sinks
and budget are exactly what the same prompt would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import pages as page_ops
from .config import LServeConfig
from .streaming import fill_sink_and_ring


@dataclass
class LayerPlan:
    """Which KV heads of one layer stream, fixed at patch time."""

    layer_idx: int
    streaming: torch.Tensor  # bool [Hkv]
    dense: bool              # a dense layer: no streaming heads and no page selection

    def __post_init__(self):
        self.stream_heads = self.streaming.nonzero().flatten()
        self.retrieval_heads = (~self.streaming).nonzero().flatten()
        # streaming heads first: one index_select sorts a tensor's heads by kind, and each kind is
        # then a slice (a view), not a copy
        self.order = torch.cat([self.stream_heads, self.retrieval_heads])
        self.n_stream = self.stream_heads.numel()
        self._on_device = {}

    def _indices(self, device) -> tuple:
        """(streaming, retrieval, kind order, its inverse) on ``device``, copied there once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.stream_heads.to(device), self.retrieval_heads.to(device),
                                    self.order.to(device), torch.argsort(self.order).to(device))
        return self._on_device[key]

    def heads(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(streaming, retrieval) KV-head indices on ``device``, copied there once, not per step."""
        return self._indices(device)[:2]

    def streaming_on(self, device) -> torch.Tensor:
        """``streaming`` on ``device``, copied there once."""
        key = ("streaming", str(device))
        if key not in self._on_device:
            self._on_device[key] = self.streaming.to(device)
        return self._on_device[key]

    def query_heads(self, device, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(streaming, retrieval) query-head indices on ``device`` (the ``group`` query heads of
        each KV head of the kind, in that kind's order), built there once."""
        key = (str(device), group)
        if key not in self._on_device:
            offs = torch.arange(group, device=device)
            self._on_device[key] = tuple((h[:, None] * group + offs).flatten() for h in self.heads(device))
        return self._on_device[key]

    def _mixed(self) -> bool:
        return 0 < self.n_stream < self.streaming.numel()

    def sort_by_kind(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(streaming part, retrieval part) of ``x`` along its head dimension: one copy when both
        kinds exist, none when the layer has one kind."""
        if self._mixed():
            x = x.index_select(dim, self._indices(x.device)[2])
        return x.narrow(dim, 0, self.n_stream), x.narrow(dim, self.n_stream, x.shape[dim] - self.n_stream)

    def unsort(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of ``sort_by_kind`` on a tensor whose heads are in (streaming, retrieval) order."""
        return x.index_select(dim, self._indices(x.device)[3]) if self._mixed() else x


class LServeLayer(CacheLayerMixin):
    """One decoder layer's LServe KV: streaming sink + ring, retrieval page pool + summaries."""

    is_compileable = False
    is_sliding = False

    def __init__(self, plan: LayerPlan, config: LServeConfig, capacity: int = 0):
        super().__init__()
        self.plan, self.config = plan, config
        self.capacity = capacity    # tokens to allocate the page pool for at prefill (0: the prompt's)
        self.seq_len = 0            # positions seen, padding included (what generate() counts)
        self.lengths = None         # [B] real tokens stored per row, updated in place
        self.max_length = 0         # host copy of lengths.max(), so growth needs no device sync
        self.min_length = 0         # a host lower bound of lengths.min(): past the sink, no sink write
        self.pending_kv_start = None
        self.chunk_total = None     # prompt length while a chunked prefill is under way
        # "empty" -> "chunking" (chunked prefill) -> "prefill" (prompt stored) -> "extend"
        self.phase = "empty"
        self.pages = None           # [B, Hr, G, K] reused page selection, overwritten in place
        self.decode_steps = 0
        # bumped whenever a store is reallocated: captured decode graphs hold its addresses
        self.epoch = 0
        self.sink_k = self.sink_v = self.ring_k = self.ring_v = None
        self.pool_k = self.pool_v = self.kmax = self.kmin = None
        self.chunk_k = self.chunk_v = None

    # -- transformers' CacheLayerMixin ------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.seq_len + q, 0

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states, value_states, *args, **kwargs):
        """Store new keys/values. Returns them unchanged: the first (prefill) chunk is attended
        from them directly; later steps are attended from the stores (``attention.py``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.phase == "empty":
            total = self.chunk_total or key_states.shape[2]
            self._start_prompt(key_states, value_states, total)
            if total == key_states.shape[2]:
                self.finish_prompt()
        elif self.phase == "chunking":
            self._write_prompt(key_states, value_states)
        else:
            self._append(key_states, value_states)
            self.phase = "extend"
        return key_states, value_states

    def reset(self):
        epoch = self.epoch
        self.__init__(self.plan, self.config, self.capacity)
        self.epoch = epoch + 1      # never repeat an epoch: graphs of the old stores must not replay

    def crop(self, tokens_to_remove):
        raise NotImplementedError(
            "LServeCache cannot crop: streaming heads keep only a ring of recent tokens, so dropped "
            "tokens cannot be restored. Assisted/speculative decoding needs an unpatched model.")

    def _batch_apply(self, fn):
        for name in ("lengths", "sink_k", "sink_v", "ring_k", "ring_v", "pool_k", "pool_v",
                     "kmax", "kmin", "pages"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx):
        # in place, so that the stores keep their addresses (captured decode graphs read them)
        if self.lengths is not None:
            self._batch_apply(lambda t: t.copy_(t.index_select(0, beam_idx.to(t.device))))

    def batch_repeat_interleave(self, repeats: int):
        if self.lengths is not None:
            self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))
            self.epoch += 1

    def batch_select_indices(self, indices):
        if self.lengths is not None:
            self._batch_apply(lambda t: t[indices])
            self.max_length = int(self.lengths.max())
            self.min_length = int(self.lengths.min())
            self.epoch += 1

    def host_state(self) -> tuple:
        """The host-side bookkeeping a decode step changes (``advance`` replays it)."""
        return self.seq_len, self.max_length, self.min_length, self.decode_steps, self.phase

    def restore_host_state(self, state: tuple) -> None:
        self.seq_len, self.max_length, self.min_length, self.decode_steps, self.phase = state

    def advance(self) -> None:
        """Host bookkeeping of one decode step whose device work ran elsewhere (a graph replay):
        what ``_append`` and the decode attention do to the host state."""
        self.seq_len += 1
        self.max_length += 1
        self.min_length += 1
        self.decode_steps += 1
        self.phase = "extend"

    # -- LServe stores -------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.sink_k, self.sink_v, self.ring_k, self.ring_v,
                    self.pool_k, self.pool_v, self.kmax, self.kmin, self.chunk_k, self.chunk_v)
                   if t is not None)

    def _start_prompt(self, k, v, total: int):
        """Allocate the prompt's stores and write its first chunk. Rows are written as given
        (left padding included) and compacted by ``finish_prompt``: chunks attend to them in the
        positions the model sees. Retrieval heads go straight to the page pool; streaming heads
        to a prompt buffer that ``finish_prompt`` turns into sink + ring."""
        B, H, S, D = k.shape
        st, rt = self.plan.heads(k.device)
        cap = page_ops.round_up(max(total, self.capacity, 1), self.config.page_size)
        self.pool_k = k.new_zeros(B, rt.numel(), cap, D)
        self.pool_v = v.new_zeros(B, rt.numel(), cap, D)
        self.chunk_k = k.new_empty(B, st.numel(), total, D)
        self.chunk_v = v.new_empty(B, st.numel(), total, D)
        self.chunk_total, self.seq_len, self.phase = total, 0, "chunking"
        self._write_prompt(k, v)

    def _write_prompt(self, k, v):
        a, b = self.seq_len, self.seq_len + k.shape[2]
        if b > self.chunk_total:
            raise ValueError(f"A prompt chunk ends at token {b}, past the {self.chunk_total} tokens announced "
                             "for this chunked prefill.")
        ks, kr = self.plan.sort_by_kind(k)
        vs, vr = self.plan.sort_by_kind(v)
        self.pool_k[:, :, a:b], self.pool_v[:, :, a:b] = kr, vr
        self.chunk_k[:, :, a:b], self.chunk_v[:, :, a:b] = ks, vs
        self.seq_len = b

    def finish_prompt(self):
        """The whole prompt is stored: compact rows past their left padding, fill the streaming
        heads' sink + ring from the prompt buffer (then freed) and summarise the pool's pages."""
        cfg = self.config
        S = self.seq_len
        B = self.pool_k.shape[0]
        kv_start = self.pending_kv_start
        if kv_start is None:
            kv_start = torch.zeros(B, dtype=torch.long, device=self.pool_k.device)
        kv_start = kv_start.to(self.pool_k.device)
        self.pending_kv_start = kv_start
        self.lengths = (S - kv_start).long()
        lo, hi = torch.stack([kv_start.min(), kv_start.max()]).tolist() if B else (0, 0)
        self.max_length, self.min_length = S - lo, S - hi
        ks, vs = self.chunk_k, self.chunk_v
        self.chunk_k = self.chunk_v = None
        if bool((kv_start != 0).any()):
            # left padding: shift each row so its first real token sits at slot 0
            idx = (torch.arange(S, device=ks.device).view(1, S) + kv_start.view(B, 1)).clamp(max=S - 1)

            def shift(x):
                return torch.gather(x, 2, idx.view(B, 1, S, 1).expand(*x.shape[:2], S, x.shape[3]))
            ks, vs = shift(ks), shift(vs)
            self.pool_k[:, :, :S] = shift(self.pool_k[:, :, :S])
            self.pool_v[:, :, :S] = shift(self.pool_v[:, :, :S])
        self.sink_k, self.ring_k = fill_sink_and_ring(ks, self.lengths, cfg.decode_sink, cfg.decode_local)
        self.sink_v, self.ring_v = fill_sink_and_ring(vs, self.lengths, cfg.decode_sink, cfg.decode_local)
        self.kmax, self.kmin = page_ops.build_summaries(self.pool_k, self.lengths, cfg)
        self.chunk_total, self.phase = None, "prefill"
        self.epoch += 1

    # Decode appends grow the pool geometrically (an eighth) up to this many tokens at a time, in
    # whole pages: the concatenations amortise, and a long prompt is not charged a fraction of its
    # own size in unused pages.
    MAX_GROWTH = 1024

    def _grow(self, needed: int, min_step: int = 0):
        """Make room for ``needed`` tokens: grow the page pool by whole pages (at least
        ``min_step`` tokens) and extend the summaries with empty logical pages."""
        cfg = self.config
        cap = self.pool_k.shape[2]
        if needed <= cap:
            return
        step = max(min_step, min(cap // 8, self.MAX_GROWTH))
        new_cap = page_ops.round_up(max(needed, cap + step), cfg.page_size)
        extra = new_cap - cap
        B, Hr, _, D = self.pool_k.shape
        self.pool_k = torch.cat([self.pool_k, self.pool_k.new_zeros(B, Hr, extra, D)], dim=2)
        self.pool_v = torch.cat([self.pool_v, self.pool_v.new_zeros(B, Hr, extra, D)], dim=2)
        nl = extra // cfg.logical_page_size
        self.kmax = torch.cat([self.kmax, self.kmax.new_full((B, Hr, nl, D), float("-inf"))], dim=2)
        self.kmin = torch.cat([self.kmin, self.kmin.new_full((B, Hr, nl, D), float("inf"))], dim=2)
        self.epoch += 1

    def _append(self, k, v):
        """Append S new tokens per row at slots ``lengths[b] + i``."""
        cfg = self.config
        B, H, S, D = k.shape
        pos = self.lengths.view(B, 1) + torch.arange(S, device=k.device).view(1, S)   # [B, S]
        ks, kr = self.plan.sort_by_kind(k)
        vs, vr = self.plan.sort_by_kind(v)
        if self.pool_k.shape[1]:
            self._grow(self.max_length + S)
            idx = pos.view(B, 1, S, 1).expand(B, kr.shape[1], S, D)
            self.pool_k.scatter_(2, idx, kr)
            self.pool_v.scatter_(2, idx, vr)
            page_ops.update_summaries(self.kmax, self.kmin, kr, pos, cfg)
        if self.sink_k.shape[1]:
            # attention of a multi-token chunk needs the ring as it was before this chunk
            self.ring_before = (self.ring_k.clone(), self.ring_v.clone()) if S > 1 else None
            self._append_streaming(ks, vs, pos)
        self.lengths.add_(S)
        self.max_length += S
        self.min_length += S
        self.seq_len += S

    def _append_streaming(self, ks, vs, pos):
        cfg = self.config
        B, Hs, S, D = ks.shape
        if cfg.decode_sink and self.min_length < cfg.decode_sink:   # else every new token is past the sink
            in_sink = (pos < cfg.decode_sink).view(B, 1, S, 1)
            slot = pos.clamp(max=cfg.decode_sink - 1).view(B, 1, S, 1).expand(B, Hs, S, D)
            # rows past the sink write a slot's own value back
            self.sink_k.scatter_(2, slot, torch.where(in_sink, ks, self.sink_k.gather(2, slot)))
            self.sink_v.scatter_(2, slot, torch.where(in_sink, vs, self.sink_v.gather(2, slot)))
        n = min(S, cfg.decode_local)   # only the newest `local` tokens can survive in the ring
        slot = torch.remainder(pos[:, S - n:], cfg.decode_local).view(B, 1, n, 1).expand(B, Hs, n, D)
        self.ring_k.scatter_(2, slot, ks[:, :, S - n:])
        self.ring_v.scatter_(2, slot, vs[:, :, S - n:])


class LServeCache(Cache):
    """KV cache of a patched model. ``generate()`` and plain forwards of a patched model create
    one per call; pass ``LServeCache(model)`` as ``past_key_values`` to keep it yourself."""

    def __init__(self, model=None, *, plans: list[LayerPlan] | None = None,
                 config: LServeConfig | None = None, max_length: int | None = None):
        """``max_length``: tokens (prompt + new) to allocate the page pools for at prefill, so that
        decoding never grows them; without it they grow in steps as decoding goes."""
        if plans is None:
            state = getattr(model, "_lserve", None)
            if state is None:
                raise ValueError("LServeCache(model) needs a model patched with lserve_hf.patch_model(model).")
            plans, config = state.plans, state.config
        super().__init__(layers=[LServeLayer(p, config, max_length or 0) for p in plans])
        self.config = config
        self.decode_graphs = None   # lserve_hf.decode_graph.DecodeGraphs, made on the first decode step

    @property
    def epoch(self) -> int:
        """Changes whenever a layer reallocates a store."""
        return sum(layer.epoch for layer in self.layers)

    def begin_chunks(self, total: int) -> None:
        """Announce a prompt of ``total`` tokens that will arrive in several forwards."""
        for layer in self.layers:
            layer.chunk_total = total

    def finish_chunks(self) -> None:
        for layer in self.layers:
            if layer.phase == "chunking":
                layer.finish_prompt()

    def begin_forward(self, attention_mask: torch.Tensor | None, batch: int, q_len: int, device):
        """Record each row's left padding before the first (prefill) chunk reaches the layers."""
        if self.layers[0].phase == "chunking":
            return
        if self.get_seq_length() > 0:
            if attention_mask is not None and attention_mask.dim() == 2 and q_len > 1 \
                    and not bool(attention_mask[:, -q_len:].all()):
                raise ValueError("LServe supports padding only on the left of the first chunk; "
                                 "new tokens appended to a cache cannot be padding.")
            return
        kv_start = torch.zeros(batch, dtype=torch.long, device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            m = attention_mask[:, -q_len:].to(device).bool()
            if bool((m[:, 1:] < m[:, :-1]).any()):
                raise ValueError(
                    "LServe supports left padding only (each row's real tokens must be contiguous and "
                    "end at the last position): load the tokenizer with padding_side='left'.")
            kv_start = (~m).sum(1)
            if bool((kv_start >= q_len).any()):
                raise ValueError("A row of the batch holds no real token (its attention_mask is all zeros).")
        for layer in self.layers:
            layer.pending_kv_start = kv_start

    def kv_bytes(self) -> int:
        """Bytes held by the KV stores of all layers (page pools by capacity, summaries included)."""
        return sum(layer.kv_bytes() for layer in self.layers)
