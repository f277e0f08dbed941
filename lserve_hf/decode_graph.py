"""Decode steps of a patched decoder replayed as CUDA graphs.

Eager decoding of an 8B model spends most of each token in Python and kernel launches, not on the
GPU; a CUDA graph of the whole decoder step removes both. A graph replays fixed kernels on fixed
addresses, so everything a step touches lives in buffers that outlast it: the ``LServeCache``
stores (updated in place: ``lengths``, pools, rings, summaries, the reused page selection) and
the static inputs here. The host-side bookkeeping of a step (token counts, the decode-step
counter that drives selection reuse) is replayed by ``LServeLayer.advance``.

Two graphs per cache: a step that selects pages and a step that reuses the selection; which
one runs follows the host step counter, so selector reuse needs no device-side branch. A graph is
captured at the second step of its kind in a cache epoch (the first runs eagerly, so every kernel
is compiled before capture); when a store is reallocated (pool growth, batch change) the graphs
are dropped and captured again.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from .backend import say_once, use_triton


class DecodeGraphs:
    """The decode graphs of one ``LServeCache`` (held by it; the cache is passed in, not kept, so
    that a dropped cache frees its stores and graphs without waiting for the garbage collector)."""

    # pool growth between captures when the cache was not sized up front: each growth costs an
    # eager step and two captures, so grow in large steps
    GROWTH = 4096

    def __init__(self):
        self.graphs = {}       # kind -> (CUDAGraph, static hidden-state output)
        self.warm = set()      # (epoch, kind) that ran eagerly
        self.epoch = None
        self.static = None     # input_ids, position_ids, cache_position

    def eligible(self, cache, base, input_ids, inputs_embeds, kwargs) -> bool:
        cfg, layers = cache.config, cache.layers
        if not (cfg.cuda_graphs and input_ids is not None and inputs_embeds is None and input_ids.is_cuda
                and input_ids.shape[1] == 1 and not torch.is_grad_enabled()):
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if layers[0].phase not in ("prefill", "extend") or not use_triton(cfg.backend, input_ids):
            return False
        window = getattr(base.config, "sliding_window", None)
        if window is not None and layers[0].max_length + 1 > window:
            say_once("LServe: past Mistral's sliding window, decode steps run eagerly (no CUDA graph).")
            return False
        return True

    @staticmethod
    def _kind(cache) -> str:
        layer = cache.layers[0]
        return "select" if layer.decode_steps % cache.config.selector_interval == 0 else "reuse"

    def _reserve(self, cache) -> None:
        """Grow every page pool outside the graph when the next token would not fit."""
        for layer in cache.layers:
            layer._grow(layer.max_length + 1, min_step=self.GROWTH)

    def step(self, cache, forward, input_ids, position_ids, cache_position):
        """Run one decode step; returns the decoder output, or None when this step must run
        eagerly (a kind's first step in an epoch: warms the kernels)."""
        self._reserve(cache)
        if self.epoch != cache.epoch:
            self.graphs.clear()
            self.static = None
            self.epoch = cache.epoch
        kind = self._kind(cache)
        if (self.epoch, kind) not in self.warm:
            self.warm.add((self.epoch, kind))
            return None
        B = input_ids.shape[0]
        if self.static is None:
            dev = input_ids.device
            self.static = (torch.zeros(B, 1, dtype=torch.long, device=dev),
                           torch.zeros(B, 1, dtype=torch.long, device=dev),
                           torch.zeros(1, dtype=torch.long, device=dev))
        ids, pos, cpos = self.static
        ids.copy_(input_ids)
        seen = cache.layers[0].seq_len
        if cache_position is None:
            cpos.fill_(seen)
        else:
            cpos.copy_(cache_position.view(-1)[-1:])
        pos.copy_(position_ids.view(B, -1)[:, -1:] if position_ids is not None else cpos.view(1, 1).expand(B, 1))
        if kind not in self.graphs:
            self.graphs[kind] = self._capture(cache, forward)
        graph, hidden = self.graphs[kind]
        graph.replay()
        for layer in cache.layers:
            layer.advance()
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def _capture(self, cache, forward):
        """Record one decode step. Capturing runs the Python (host state moves) but no GPU work,
        so the host state is put back and checked against what ``advance`` will replay."""
        layers = cache.layers
        before = [layer.host_state() for layer in layers]
        ids, pos, cpos = self.static
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward(input_ids=ids, position_ids=pos, cache_position=cpos, past_key_values=cache,
                          use_cache=True, attention_mask=None)
        after = [layer.host_state() for layer in layers]
        for layer, state in zip(layers, before):
            layer.restore_host_state(state)
            layer.advance()
        if [layer.host_state() for layer in layers] != after:
            raise RuntimeError("LServe: a captured decode step changed the cache's host state in a way the "
                               "graph replay does not; set LServeConfig(cuda_graphs=False) and report this.")
        for layer, state in zip(layers, before):
            layer.restore_host_state(state)
        return graph, out.last_hidden_state
