"""Decode steps of a patched decoder replayed as CUDA graphs.

Eager decoding of an 8B model spends most of each token in Python and kernel launches, not on the
GPU; a CUDA graph of the whole decoder step removes both. A graph replays fixed kernels on fixed
addresses, so everything a step touches lives in buffers that outlast it: the ``LServeCache``
stores (updated in place: row lengths, pools, rings, summaries, the page selection) and the
static inputs here. The host bookkeeping of a step runs around the replay, exactly as around an
eager step (``lserve_hf.step.DecodeStep``).

Two graphs per cache: a step that selects pages and a step that reuses the selection; which
one runs follows the host step counter, so selector reuse needs no device-side branch. A graph is
captured at the second step of its kind in a cache epoch (the first runs eagerly, so every kernel
is compiled before capture); when a store is reallocated (pool growth, batch change) the graphs
are dropped and captured again.
"""

from __future__ import annotations

import torch

from . import ops


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
        self.static = None     # input_ids, position_ids

    @staticmethod
    def eligible(cache, model_config, input_ids, inputs_embeds, kwargs) -> bool:
        cfg = cache.config
        if not (cfg.cuda_graphs and input_ids is not None and inputs_embeds is None and input_ids.is_cuda
                and input_ids.shape[1] == 1 and not torch.is_grad_enabled()):
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if cache.step.seen == 0 or not ops.kernels_run(cfg, input_ids):
            return False
        window = getattr(model_config, "sliding_window", None)
        if window is not None and cache.step.longest + 1 > window:
            ops.say_once("LServe: past Mistral's sliding window, decode steps run eagerly (no CUDA graph).")
            return False
        return True

    def reserve(self, cache) -> None:
        """Grow every page pool outside the graph when the next token would not fit."""
        for layer in cache.layers:
            layer.reserve(cache.step.longest + 1, cache.lengths_on(layer.device), min_step=self.GROWTH)

    def run(self, cache, fwd, device_step, input_ids, position_ids):
        """Replay (capturing first if needed) the decode step ``fwd``; returns its hidden states,
        or None when this step must run eagerly (a kind's first step in an epoch warms the
        kernels). ``device_step(ids, pos)`` is the step's device work."""
        if self.epoch != cache.epoch:
            self.graphs.clear()
            self.static = None
            self.epoch = cache.epoch
        kind = "select" if fwd.selects else "reuse"
        if (self.epoch, kind) not in self.warm:
            self.warm.add((self.epoch, kind))
            return None
        B = input_ids.shape[0]
        if self.static is None:
            dev = input_ids.device
            self.static = (torch.zeros(B, 1, dtype=torch.long, device=dev),
                           torch.zeros(B, 1, dtype=torch.long, device=dev))
        ids, pos = self.static
        ids.copy_(input_ids)
        if position_ids is None:
            pos.fill_(fwd.before)
        else:
            pos.copy_(position_ids.view(-1, position_ids.shape[-1])[:, -1:].expand(B, 1))
        if kind not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                hidden = device_step(ids, pos)
            self.graphs[kind] = (graph, hidden)
        graph, hidden = self.graphs[kind]
        graph.replay()
        return hidden
