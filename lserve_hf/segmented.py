"""Layer-segmented prefill (SparseServe): a long prompt runs one decoder layer at a time, every
chunk of it through a layer before the next layer starts, instead of every layer for each chunk.

With ``LServeConfig(offload="host")`` each layer's retrieval KV goes to host memory as soon as
the layer has stored the whole prompt (``LServeLayer.finish_prompt``), so during the prefill the
GPU holds one layer's KV (and that layer's streaming-head prompt buffer) at a time, plus the
prompt's hidden states and one chunk's activations; a chunk-major prefill would hold every
layer's until the last chunk. Each chunk of a layer sees exactly what it sees in a chunk-major
prefill (the prompt stored so far, the prefill masks, RoPE at its positions), so both give the
same hidden states.

For decoders laid out like Llama's (``embed_tokens``, ``rotary_emb``, ``layers``, ``norm``).
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# the decoder's own arguments, and outputs a layer-by-layer run does not record (the patched
# decoder prefills in one pass when they are asked for)
_NOT_FOR_LAYERS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "past_key_values",
                   "use_cache", "cache_position", "return_dict", "output_attentions", "output_hidden_states")


def runs(base) -> bool:
    """Whether the decoder ``base`` can be prefilled layer by layer here: laid out like Llama's,
    and no autograd (the hidden states are updated in place)."""
    return all(hasattr(base, n) for n in ("embed_tokens", "rotary_emb", "layers", "norm")) \
        and not torch.is_grad_enabled()


def prefill(base, cache, chunk: int, kw: dict) -> BaseModelOutputWithPast:
    """Prefill the prompt of the decoder call ``kw`` into ``cache`` layer by layer, ``chunk``
    tokens at a time (``cache.begin_prompt`` has run)."""
    from .decoder import _run

    ids, embeds, pos = kw.get("input_ids"), kw.get("inputs_embeds"), kw.get("position_ids")
    extra = {k: v for k, v in kw.items() if k not in _NOT_FOR_LAYERS}     # lserve_mask, attention kwargs
    h = base.embed_tokens(ids) if embeds is None else embeds.clone()
    S = h.shape[1]
    if pos is None:
        pos = torch.arange(S, device=h.device).unsqueeze(0)
    spans = [(a, min(S, a + chunk)) for a in range(0, S, chunk)]
    cache.step.announce_prompt(S)

    def run():
        for i, layer in enumerate(base.layers[: base.config.num_hidden_layers]):
            for a, b in spans:
                p = pos[..., a:b]
                with cache.step.segment(a, b - a):
                    out = layer(h[:, a:b], attention_mask=None, position_ids=p,
                                position_embeddings=base.rotary_emb(h, position_ids=p),
                                past_key_values=cache, use_cache=True, **extra)
                h[:, a:b] = out[0] if isinstance(out, tuple) else out
            cache.layers[i].finish_prompt(cache)     # offload: this layer's KV leaves the GPU
        for a, b in spans:
            h[:, a:b] = base.norm(h[:, a:b])
        return h
    hidden = _run(cache, S, run, prompt=True)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
