"""The patched decoder's forward: the model's own forward, plus two things only a loop around it
can do: prefill a long prompt in chunks, and replay decode steps as CUDA graphs.

Installed by ``patch_model`` on the decoder module (``model.model``) and removed by
``unpatch_model``; every other forward goes to the model's own code unchanged."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from .backend import say_once
from .cache import LServeCache
from .decode_graph import DecodeGraphs

_ARG_NAMES = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
              "cache_position", "use_cache")


def decoder_forward(original):
    """Wrap the decoder's bound ``forward``."""

    def forward(*args, **kwargs):
        kwargs.update(zip(_ARG_NAMES, args))
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, LServeCache):
            return original(**kwargs)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        chunk = cache.config.prefill_chunk_size
        if chunk is not None and cache.get_seq_length() == 0 and x.shape[1] > chunk:
            if not (kwargs.get("output_attentions") or kwargs.get("output_hidden_states")):
                return chunked_prefill(original, cache, chunk, kwargs)
            say_once("LServe: output_attentions/output_hidden_states need the prompt in one pass; "
                     "this prefill is not chunked.")
        if x.shape[1] == 1 and cache.get_seq_length() > 0:
            if cache.decode_graphs is None:
                cache.decode_graphs = DecodeGraphs()
            graphs = cache.decode_graphs
            if graphs.eligible(cache, original.__self__, ids, embeds, kwargs):
                out = graphs.step(cache, original, ids, kwargs.get("position_ids"), kwargs.get("cache_position"))
                if out is not None:
                    return out
        return original(**kwargs)

    forward.lserve_original = original
    return forward


def chunked_prefill(original, cache: LServeCache, chunk: int, kwargs: dict):
    """Prefill ``kwargs``' prompt ``chunk`` tokens at a time. Every chunk's queries attend to the
    prompt stored so far with the one-pass masks, so the hidden states equal a one-pass prefill's,
    while activations are those of one chunk."""
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    mask = kwargs.pop("attention_mask", None)
    pos, cpos = kwargs.pop("position_ids", None), kwargs.pop("cache_position", None)
    kwargs.pop("past_key_values")
    x = ids if ids is not None else embeds
    B, S = x.shape[:2]
    if mask is not None and mask.dim() != 2:
        raise ValueError("Chunked prefill takes a 2-D attention_mask (or none); pass "
                         "LServeConfig(prefill_chunk_size=None) to prefill a custom mask in one pass.")
    cache.begin_chunks(S)
    hidden = None
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        out = original(
            input_ids=ids[:, a:b] if ids is not None else None,
            inputs_embeds=embeds[:, a:b] if embeds is not None else None,
            attention_mask=mask[:, :b] if mask is not None else None,
            position_ids=pos[..., a:b] if pos is not None else None,
            cache_position=cpos[a:b] if cpos is not None else None,
            past_key_values=cache, **kwargs)
        h = out.last_hidden_state
        if hidden is None:
            hidden = h.new_empty(B, S, h.shape[-1])
        hidden[:, a:b] = h
    cache.finish_chunks()
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


def install(base) -> None:
    base.forward = decoder_forward(base.forward)


def uninstall(base) -> None:
    fwd = base.__dict__.get("forward")
    if fwd is not None and hasattr(fwd, "lserve_original"):
        del base.forward
