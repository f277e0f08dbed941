"""The attention function a patched model runs, registered with transformers'
``AttentionInterface`` (and a matching mask function with ``AttentionMaskInterface``).

It reads the cache and returns outputs; the cache's layers store keys and values themselves
(``LServeCache.update``, called by the model before attention) and ``DecodeStep`` has decided
what the forward is (``lserve_hf.step``):
- prefill (the prompt in one pass): block-sparse attention over the prompt's own keys; retrieval
  heads causal, streaming heads sink + local band (``prefill_sink``/``prefill_local``);
- chunk (a long prompt in chunks): the same masks, each chunk's queries against the prompt
  stored so far, so the result equals the one-pass prefill;
- decode (one new token): streaming heads read sink + ring, retrieval heads read the pages their
  query selects (dense while the row is within the token budget);
- extend (several tokens appended to a cache): retrieval heads causal over the pool, streaming
  heads sink + ring as decode would see them token by token.
A prompt whose mask the fast paths do not express (``lserve_hf.masks``) is attended densely in
torch with the same rule.
"""

from __future__ import annotations

import torch

from . import ops, reference
from .dynamic_prefill import prefill_blocks
from .masks import PromptMask, general_prefill
from .streaming import ring_tokens, streaming_decode_slots

ATTN_NAME = "lserve"


def lserve_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """Mask function for ``AttentionMaskInterface``: none. The patched decoder finds each
    forward's mask once (``lserve_hf.masks.prompt_mask``) and hands it to attention."""
    return None


def lserve_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             lserve_cache=None, lserve_mask=None, sliding_window=None, **kwargs):
    """``AttentionInterface`` entry: returns ``([B, S, Hq, D], None)``."""
    plan = getattr(module, "lserve_plan", None)
    if plan is None:
        raise RuntimeError("attn_implementation='lserve' runs only in a model patched with "
                           "lserve_hf.patch_model(model); this model (or this layer) is not patched.")
    cfg = plan.config
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = lserve_mask if lserve_mask is not None else PromptMask()
    fwd = lserve_cache.step.current if lserve_cache is not None else None
    if lserve_cache is not None and fwd is None:
        raise RuntimeError("LServe: a decoder layer ran with an LServeCache outside the patched decoder's "
                           "forward; call the model (or model.model) rather than its layers.")
    weights = None
    want_weights = bool(kwargs.get("output_attentions"))
    if fwd is None or fwd.kind == "prefill":
        if lserve_cache is None and query.shape[2] == 1 and key.shape[2] > 1:
            ops.say_once("LServe: decoding with a cache that is not an LServeCache; streaming heads use the "
                         "prefill window and retrieval heads attend densely (no page selection). Let the "
                         "patched model create its cache, or pass LServeCache(model).")
        if want_weights:
            out, weights = general_prefill(query, key, value, plan.streaming_on(query.device), cfg.prefill_sink,
                                           cfg.prefill_local, key.shape[2] - query.shape[2], mask, scale,
                                           sliding_window, dropout, cfg.prefill_query_block, return_weights=True)
        else:
            out = _prefill(query, key, value, mask, plan, cfg, scale, sliding_window, dropout)
    else:
        layer = lserve_cache.layers[plan.layer_idx]
        if want_weights and fwd.kind != "decode":
            raise ValueError("output_attentions=True is available for a prompt in one pass and for decode steps, "
                             "not for tokens appended several at a time.")
        if fwd.kind == "chunk":
            out = _chunk_prefill(query, layer, lserve_cache, fwd, mask, plan, cfg, scale, sliding_window)
        elif fwd.kind == "decode":
            out, weights = _decode(query, layer, lserve_cache, fwd, plan, cfg, scale, sliding_window, want_weights)
        else:
            out = _extend(query, layer, lserve_cache, plan, cfg, scale, key, value, sliding_window)
    return out.transpose(1, 2).contiguous(), weights


def _prefill(query, key, value, mask, plan, cfg, scale, window, dropout):
    q_offset = key.shape[2] - query.shape[2]
    streaming = plan.streaming_on(query.device)
    if mask.general or dropout:
        if mask.general:
            ops.say_once(f"LServe: a prompt with {mask.why} runs the torch path, densely masked.")
        return general_prefill(query, key, value, streaming, cfg.prefill_sink, cfg.prefill_local, q_offset,
                               mask, scale, window, dropout, cfg.prefill_query_block)
    blocks = prefill_blocks(query, key, cfg, plan, q_offset, mask.kv_start, scale, window)
    return ops.prefill(query, key, value, streaming, cfg.prefill_sink, cfg.prefill_local, q_offset,
                       mask.kv_start, scale, window, cfg, blocks=blocks, memo=mask.memo)


def _chunk_prefill(query, layer, cache, fwd, mask, plan, cfg, scale, window):
    """A prompt chunk, queries at positions ``T - S .. T - 1``, against the prompt stored so far:
    retrieval heads read the page pool, streaming heads the prompt buffer. One call per store,
    each computing its kind's query heads of the whole query in place (no copy in or out)."""
    B, Hq, S, D = query.shape
    G = Hq // plan.streaming.numel()
    T = fwd.before + S
    out = torch.empty_like(query)
    q_stream, q_retr = plan.query_heads(query.device, G)
    for streams, q_heads, k, v in ((False, q_retr, *layer.pool.token_range(0, T)),
                                   (True, q_stream, layer.prompt_k, layer.prompt_v)):
        if q_heads.numel():
            kinds = torch.full((k.shape[1],), streams, device=query.device)
            blocks = None if streams else prefill_blocks(query, k[:, :, :T], cfg, plan, T - S, mask.kv_start,
                                                         scale, window, q_heads, prompt_end=cache.step.prompt_total)
            ops.prefill(query, k[:, :, :T], v[:, :, :T], kinds, cfg.prefill_sink, cfg.prefill_local, T - S,
                        mask.kv_start, scale, window, cfg, out=out, q_heads=q_heads, blocks=blocks,
                        memo=mask.memo)
    return out


def _decode(query, layer, cache, fwd, plan, cfg, scale, window, want_weights=False):
    """One query per head: streaming heads over sink + ring, retrieval heads over the pages the
    selector names. Queries and outputs are sorted by head kind once, so each kind is a view.
    Returns (output, weights over the positions seen or None)."""
    B, Hq, _, D = query.shape
    Hkv = plan.streaming.numel()
    q = query.view(B, Hkv, Hq // Hkv, D)
    q_s, q_r = plan.sort_by_kind(q)
    out = torch.empty_like(q)
    o_s, o_r = out.narrow(1, 0, q_s.shape[1]), out.narrow(1, q_s.shape[1], q_r.shape[1])
    lengths = cache.lengths_on(q.device)
    if q_r.shape[1]:
        pages = layer.selector.read_list(q_r, layer.pool, lengths, fwd.selects, fwd.memo)
    else:
        pages = q.new_zeros(B, 0, q.shape[2], 1, dtype=torch.long)
    s = layer.streaming
    pool_k, pool_v, read, located = layer.pool.decode_view(pages, lengths)   # offload: the GPU page cache
    slots = None
    if q_s.shape[1] and not ops.kernels_run(cfg, q):
        # the sink/ring slots a streaming head sees follow the row lengths only: alike in every layer
        key = ("streaming slots", s.slots, window, lengths.data_ptr())   # layers may sit on several devices
        slots = fwd.memo.get(key)
        if slots is None:
            slots = fwd.memo[key] = streaming_decode_slots(lengths, cfg.decode_sink, cfg.decode_local, window,
                                                           s.slots)
    ops.decode(q_s, s.sink_k, s.sink_v, s.ring_k, s.ring_v, q_r, pool_k, pool_v, read,
               lengths, cfg, scale, o_s, o_r, window, fwd.longest, located, stream_slots=slots)
    weights = None
    if want_weights:
        weights = plan.unsort(decode_weights(q_s, q_r, layer, cache, pages, fwd, cfg, scale, window))
        weights = weights.reshape(B, Hq, 1, -1)
    return plan.unsort(out).view(B, Hq, 1, D), weights


def decode_weights(q_s, q_r, layer, cache, pages, fwd, cfg, scale, window):
    """The attention weights of a decode step, ``[B, Hs + Hr, G, positions]`` (heads sorted by
    kind) over the positions Transformers counts (left padding included): the keys each head
    read get their softmax weight, every other position 0. For ``output_attentions``."""
    B, Hs, G, D = q_s.shape
    Hr = q_r.shape[1]
    lengths = cache.lengths_on(q_s.device)
    start = cache.kv_start.to(q_s.device).view(B, 1, 1, 1) if cache.kv_start is not None else 0
    n_pos = fwd.before + 1
    weights = q_s.new_zeros(B, Hs + Hr, G, n_pos, dtype=torch.float32)
    parts = []
    if Hs:
        s = layer.streaming
        keys = torch.cat([s.sink_k, s.ring_k], dim=2)
        n_sink, n_ring = s.slots
        sink_tok = torch.arange(n_sink, device=q_s.device).view(1, -1).expand(B, -1)
        tok = torch.cat([sink_tok, ring_tokens(lengths, cfg.decode_local)[:, :n_ring]], dim=1)   # [B, N]
        valid = streaming_decode_slots(lengths, cfg.decode_sink, cfg.decode_local, window, s.slots)
        scores = torch.einsum("bhgd,bhnd->bhgn", q_s.float(), keys.float()) * scale
        parts.append((0, Hs, scores, valid.view(B, 1, 1, -1), tok.view(B, 1, 1, -1)))
    if Hr:
        pool = layer.pool
        P = pool.capacity // cfg.page_size
        pages = reference.with_newest_page(pages, lengths, cfg.page_size)
        idx = pages.clamp(0, P - 1)
        tok = idx.unsqueeze(-1) * cfg.page_size + torch.arange(cfg.page_size, device=q_r.device)
        valid = ((pages >= 0) & (pages < P)).unsqueeze(-1) & (tok < lengths.view(B, 1, 1, 1, 1))
        if window is not None:
            valid = valid & (tok >= lengths.view(B, 1, 1, 1, 1) - window)
        tok, valid = tok.flatten(3), valid.flatten(3)                                       # [B, Hr, G, N]
        pool_k = pool.token_range(0, pool.capacity)[0]        # on the GPU (an offloaded pool: a copy)
        keys = torch.gather(pool_k, 2, tok.flatten(2).unsqueeze(-1).expand(-1, -1, -1, D))
        scores = torch.einsum("bhgd,bhgnd->bhgn", q_r.float(), keys.view(B, Hr, G, -1, D).float()) * scale
        parts.append((Hs, Hs + Hr, scores, valid, tok))
    for a, b, scores, valid, tok in parts:
        valid = valid.expand_as(scores)
        p = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
        p = torch.where(valid, p, 0.0)
        pos = (tok + start).clamp(0, n_pos - 1).expand_as(scores)
        weights[:, a:b].scatter_add_(-1, pos, p)
    return weights.to(q_s.dtype)


def _extend(query, layer, cache, plan, cfg, scale, new_k, new_v, window):
    B, Hq, S, D = query.shape
    Hkv = plan.streaming.numel()
    G = Hq // Hkv
    q = query.view(B, Hkv, G, S, D)
    lengths = cache.lengths_on(q.device)
    before = lengths - S
    q_pos = before.view(B, 1) + torch.arange(S, device=q.device).view(1, S)
    out = torch.empty_like(q)
    st, rt = plan.heads(q.device)
    if rt.numel():
        T = cache.step.current.longest
        k_pos = torch.arange(T, device=q.device).view(1, T).expand(B, T)
        k_pos = torch.where(k_pos < lengths.view(B, 1), k_pos, -1)
        out[:, rt] = reference.positional_attention(q[:, rt], *layer.pool.token_range(0, T),
                                                    q_pos, k_pos, scale=scale, window=window)
    if st.numel():
        sink, local = cfg.decode_sink, cfg.decode_local
        s = layer.streaming
        ring_k, ring_v = s.before_chunk
        n_sink, n_ring = s.slots
        sink_pos = torch.arange(n_sink, device=q.device).view(1, n_sink).expand(B, n_sink)
        sink_pos = torch.where(sink_pos < before.view(B, 1), sink_pos, -1)
        ring_pos = ring_tokens(before, local)[:, :n_ring]
        ring_pos = torch.where(ring_pos >= sink, ring_pos, -1)
        k = torch.cat([s.sink_k, ring_k, new_k[:, st]], dim=2)
        v = torch.cat([s.sink_v, ring_v, new_v[:, st]], dim=2)
        k_pos = torch.cat([sink_pos, ring_pos, q_pos], dim=1)
        out[:, st] = reference.positional_attention(q[:, st], k, v, q_pos, k_pos, sink, local, scale, window)
    return out.view(B, Hq, S, D)
