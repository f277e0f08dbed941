"""The attention function a patched model runs, registered with transformers'
``AttentionInterface`` (and a matching mask function with ``AttentionMaskInterface``).

Regimes, chosen by what the ``LServeLayer`` holds:
- prefill (the prompt in one pass): block-sparse attention over the prompt's own keys; retrieval
  heads causal, streaming heads sink + local band (``prefill_sink``/``prefill_local``);
- chunked prefill (a long prompt in chunks): the same masks, each chunk's queries against the
  prompt stored so far (``q_offset``), so the result equals the one-pass prefill;
- decode (one new token): streaming heads read sink + ring, retrieval heads read the pages their
  query selects (dense while the row is within the token budget);
- extend (several tokens appended to a cache): retrieval heads causal over the pool, streaming heads
  sink + ring as decode would see them token by token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pages as page_ops
from . import reference
from .backend import say_once, use_triton
from .cache import LayerPlan
from .streaming import ring_tokens

ATTN_NAME = "lserve"


def lserve_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """Mask function for ``AttentionMaskInterface``: hand the 2-D padding mask through (LServe
    builds its causal/sink/local masks itself), or None when nothing is padded."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    # no `.all()` check here: it would sync the device at every decode step
    return attention_mask[:, -kv_length:].bool()


def lserve_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             lserve_layer=None, sliding_window=None, **kwargs):
    """``AttentionInterface`` entry: returns ``([B, S, Hq, D], None)``."""
    plan = module.lserve_plan
    cfg = module.lserve_config
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if lserve_layer is None or lserve_layer.phase == "prefill":
        if lserve_layer is None and query.shape[2] == 1 and key.shape[2] > 1:
            say_once("LServe: decoding with a cache that is not an LServeCache; streaming heads use the "
                      "prefill window and retrieval heads attend densely (no page selection). Let the "
                      "patched model create its cache, or pass LServeCache(model).")
        out = _prefill(query, key, value, attention_mask, plan, cfg, scale, sliding_window)
    elif lserve_layer.phase == "chunking":
        out = _chunk_prefill(query, lserve_layer, attention_mask, plan, cfg, scale, sliding_window)
    elif query.shape[2] == 1:
        out = _decode(query, lserve_layer, plan, cfg, scale, sliding_window)
    else:
        out = _extend(query, lserve_layer, cfg, scale, key, value, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _kv_start(attention_mask, n_keys):
    """Each row's first real key (left padding), or None without padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    kv_start = (~attention_mask[:, -n_keys:].bool()).sum(1)
    return kv_start if bool(kv_start.any()) else None   # one sync per prefill, not per step


def _prefill(query, key, value, attention_mask, plan, cfg, scale, sliding_window):
    kv_start = _kv_start(attention_mask, key.shape[2])
    if use_triton(cfg.backend, query) and query.dtype != torch.float64:
        if query.shape[-1] in (64, 128):
            from .kernels import block_sparse_prefill

            return block_sparse_prefill(query, key, value, plan.streaming_on(query.device), cfg.prefill_sink,
                                        cfg.prefill_local, key.shape[2] - query.shape[2], kv_start, scale,
                                        sliding_window)
        say_once(f"LServe: the Triton prefill supports head dims 64 and 128, not {query.shape[-1]}; "
                 "prefill runs the torch path (same semantics, slower).")
    return sdpa_prefill(query, key, value, plan, cfg.prefill_sink, cfg.prefill_local,
                        key.shape[2] - query.shape[2], kv_start, scale, sliding_window,
                        cfg.prefill_query_block)


_KIND_PLANS: dict = {}


def _kind_plan(n_heads: int, streams: bool) -> LayerPlan:
    """A plan whose heads all have one kind: a prompt chunk attends per kind, since the two kinds'
    keys live in different stores."""
    key = (n_heads, streams)
    if key not in _KIND_PLANS:
        _KIND_PLANS[key] = LayerPlan(-1, torch.full((n_heads,), streams), False)
    return _KIND_PLANS[key]


def _chunk_prefill(query, layer, attention_mask, plan, cfg, scale, sliding_window):
    """A prompt chunk, queries at positions ``T - S .. T - 1``, against the prompt stored so far:
    retrieval heads read the page pool, streaming heads the prompt buffer."""
    B, Hq, S, D = query.shape
    Hkv = plan.streaming.numel()
    G, T = Hq // Hkv, layer.seq_len
    st, rt = plan.heads(query.device)
    stores = ((False, rt, layer.pool_k, layer.pool_v), (True, st, layer.chunk_k, layer.chunk_v))
    if use_triton(cfg.backend, query) and D in (64, 128) and query.dtype != torch.float64:
        from .kernels import block_sparse_prefill

        # One launch per store, each computing its kind's query heads of the whole query in
        # place: no copy of the queries in or of the output out.
        out = torch.empty_like(query)
        kv_start = _kv_start(attention_mask, T)
        q_st, q_rt = plan.query_heads(query.device, G)
        for (streams, heads, k, v), q_heads in zip(stores, (q_rt, q_st)):
            if heads.numel():
                block_sparse_prefill(query, k[:, :, :T], v[:, :, :T],
                                     _kind_plan(heads.numel(), streams).streaming_on(query.device),
                                     cfg.prefill_sink, cfg.prefill_local, T - S, kv_start, scale,
                                     sliding_window, out=out, q_heads=q_heads)
        return out
    q = query.view(B, Hkv, G, S, D)
    out = torch.empty_like(q)
    for streams, heads, k, v in stores:
        if heads.numel():
            qh = q.index_select(1, heads).flatten(1, 2)
            o = _prefill(qh, k[:, :, :T], v[:, :, :T], attention_mask, _kind_plan(heads.numel(), streams),
                         cfg, scale, sliding_window)
            out[:, heads] = o.view(B, heads.numel(), G, S, D)
    return out.view(B, Hq, S, D)


def sdpa_prefill(q, k, v, plan, sink, local, q_offset, kv_start, scale, sliding_window, query_block):
    """``reference.prefill_attention`` through fused SDPA: one call for the retrieval heads and one
    for the streaming heads, since each kind shares one mask. Queries that see no key (padding)
    get zeros, as in the reference."""
    B, Hq, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.empty(B, Hkv, G, S, D, dtype=q.dtype, device=q.device)
    qg = q.view(B, Hkv, G, S, D)
    st, rt = plan.heads(q.device)
    for streams, heads in ((False, rt), (True, st)):
        if not heads.numel():
            continue
        qh = qg.index_select(1, heads).flatten(1, 2)
        kh, vh = k.index_select(1, heads), v.index_select(1, heads)
        plain_causal = not streams and kv_start is None and sliding_window is None and q_offset == 0
        for s0 in range(0, S, S if plain_causal else query_block):
            s1 = min(S, s0 + query_block) if not plain_causal else S
            if plain_causal:
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
            else:
                mask = reference.prefill_mask(s1 - s0, N, torch.tensor([streams], device=q.device), sink, local,
                                              q_offset + s0, kv_start, sliding_window, device=q.device)
                seen = mask.any(-1, keepdim=True)
                o = F.scaled_dot_product_attention(qh[:, :, s0:s1], kh, vh, attn_mask=mask | ~seen,
                                                   scale=scale, enable_gqa=True)
                o = torch.where(seen, o, 0.0)
            out[:, heads, :, s0:s1] = o.view(B, heads.numel(), G, s1 - s0, D)
    return out.view(B, Hq, S, D)


def _decode(query, layer, plan, cfg, scale, window=None):
    B, Hq, _, D = query.shape
    Hkv = plan.streaming.numel()
    G = Hq // Hkv
    q = query.view(B, Hkv, G, D)
    st, rt = plan.heads(q.device)
    if use_triton(cfg.backend, q) and q.dtype != torch.float64 and D >= 16:
        if window is None or layer.max_length <= window:
            return _decode_triton(q, layer, plan, cfg, scale, st, rt).view(B, Hq, 1, D)
        say_once("LServe: the Triton decode has no sliding window; past the window, decode runs the "
                 "torch path (same semantics, slower).")
    out = torch.empty_like(q)
    if st.numel():
        out[:, st] = reference.streaming_decode(q[:, st], layer.sink_k, layer.sink_v, layer.ring_k,
                                                layer.ring_v, layer.lengths, cfg.decode_sink,
                                                cfg.decode_local, scale, window)
    if rt.numel():
        out[:, rt] = reference.paged_decode(q[:, rt], layer.pool_k, layer.pool_v,
                                            decode_pages(q[:, rt], layer, plan, cfg),
                                            layer.lengths, cfg.page_size, scale, window)
    layer.decode_steps += 1
    return out.view(B, Hq, 1, D)


def decode_pages(q, layer, plan, cfg) -> torch.Tensor:
    """Pages a decode step reads, ``[B, Hr, G, K+1]``: the reused selection plus the newest page
    (masked out where the selection already holds it)."""
    B, Hr, G, _ = q.shape
    n_pages = layer.pool_k.shape[2] // cfg.page_size
    last = ((layer.lengths - 1) // cfg.page_size).view(B, 1, 1, 1).expand(B, Hr, G, 1)
    if plan.dense:
        return torch.arange(n_pages, device=q.device).view(1, 1, 1, -1).expand(B, Hr, G, -1)
    if layer.pages is None or layer.decode_steps % cfg.selector_interval == 0:
        pages = page_ops.select(q, layer.kmax, layer.kmin, layer.lengths, cfg)
        if layer.pages is None:
            layer.pages = pages
        else:
            layer.pages.copy_(pages)   # in place: a captured decode graph reads this buffer
    dup = (layer.pages == last).any(-1, keepdim=True)
    return torch.cat([layer.pages, torch.where(dup, -1, last)], dim=-1)


def _decode_triton(q, layer, plan, cfg, scale, st, rt):
    """One launch for all heads (``kernels.sparse_paged_decode``). Queries and outputs are sorted
    by head kind once, so each kind is a view and the layer pays two small copies, not six."""
    from .kernels import sparse_paged_decode

    q_s, q_r = plan.sort_by_kind(q)
    out = torch.empty_like(q)
    o_s, o_r = out.narrow(1, 0, q_s.shape[1]), out.narrow(1, q_s.shape[1], q_r.shape[1])
    pages = decode_pages(q_r, layer, plan, cfg) if q_r.shape[1] else \
        q.new_zeros(q.shape[0], 0, q.shape[2], 1, dtype=torch.long)
    sparse_paged_decode(q_s, layer.sink_k, layer.sink_v, layer.ring_k, layer.ring_v, q_r, layer.pool_k,
                        layer.pool_v, pages, layer.lengths, cfg.decode_sink, cfg.decode_local, cfg.page_size,
                        scale, out_stream=o_s, out_retr=o_r)
    layer.decode_steps += 1
    return plan.unsort(out)


def _extend(query, layer, cfg, scale, new_k, new_v, window=None):
    plan = layer.plan
    B, Hq, S, D = query.shape
    Hkv = plan.streaming.numel()
    G = Hq // Hkv
    q = query.view(B, Hkv, G, S, D)
    before = layer.lengths - S
    q_pos = before.view(B, 1) + torch.arange(S, device=q.device).view(1, S)
    out = torch.empty_like(q)
    st, rt = plan.heads(q.device)
    if rt.numel():
        T = layer.max_length
        k_pos = torch.arange(T, device=q.device).view(1, T).expand(B, T)
        k_pos = torch.where(k_pos < layer.lengths.view(B, 1), k_pos, -1)
        out[:, rt] = reference.positional_attention(q[:, rt], layer.pool_k[:, :, :T], layer.pool_v[:, :, :T],
                                                    q_pos, k_pos, scale=scale, window=window)
    if st.numel():
        sink, local = cfg.decode_sink, cfg.decode_local
        ring_k, ring_v = layer.ring_before
        sink_pos = torch.arange(sink, device=q.device).view(1, sink).expand(B, sink)
        sink_pos = torch.where(sink_pos < before.view(B, 1), sink_pos, -1)
        ring_pos = ring_tokens(before, local)
        ring_pos = torch.where(ring_pos >= sink, ring_pos, -1)
        k = torch.cat([layer.sink_k, ring_k, new_k[:, st]], dim=2)
        v = torch.cat([layer.sink_v, ring_v, new_v[:, st]], dim=2)
        k_pos = torch.cat([sink_pos, ring_pos, q_pos], dim=1)
        out[:, st] = reference.positional_attention(q[:, st], k, v, q_pos, k_pos, sink, local, scale, window)
    return out.view(B, Hq, S, D)
