"""Query-aware page selection for the retrieval heads of one layer (Quest scoring, LServe's
hierarchical pages): which physical pages a decode step reads.

A retrieval query head reads at most ``pages_per_selection`` pages: the newest page always, and
the best-scoring others by the upper bound ``sum_c max(q_c Kmax_c, q_c Kmin_c)`` of q.k over
each page. ``DecodeStep`` marks the steps at which every head chooses from scratch (one in
``LServeConfig.refresh_interval``); between them a selection is reused, and with the default
"drift" selector a query head chooses afresh as soon as its query drifts from the one that made
its selection. The decision is a tensor, taken on the device: no host sync, so the step can be a
captured CUDA graph.

Why drift: right after the prompt, the query that makes the first selection often looks elsewhere
than the queries that follow (heads that copy the next tokens of an answer), so LServe's plain
reuse over a few steps drops the pages the answer is on. A drifted query is the signal, cheaply.
"""

from __future__ import annotations

import torch

from . import ops


class PageSelector:
    """The page selection of one layer: ``pages`` ``[B, Hr, G, K]``, overwritten in place (a
    captured decode graph reads the buffer), and with the drift selector ``q_ref``
    ``[B, Hr, G, D]`` (fp32), each query head's query before RoPE (unit length) when it last
    chose. The decode reads the newest page besides (``ops.decode``)."""

    def __init__(self, config, dense: bool, rope_inv_freq=None):
        self.config = config
        self.dense = dense        # a dense layer reads every page
        self.rope_inv_freq = rope_inv_freq
        self._inv_freq = None     # its copy on the device, made at an eager step (not in a capture)
        self.pages = None
        self.q_ref = None

    def read_list(self, q: torch.Tensor, pool, lengths: torch.Tensor, selects: bool, memo=None) -> torch.Tensor:
        """The pages the decode step of queries ``q`` ``[B, Hr, G, D]`` reads besides the newest
        one, ``[B, Hr, G, K]``. ``selects``: a refresh (every head chooses afresh). ``memo``: the
        forward's memo (``step.Forward.memo``), for what every layer's torch path computes alike."""
        B, Hr, G, D = q.shape
        cfg = self.config
        if self.dense:
            n_pages = pool.capacity // cfg.page_size
            return torch.arange(n_pages, device=q.device).view(1, 1, 1, -1).expand(B, Hr, G, -1)
        K = cfg.pages_per_selection
        first = self.pages is None or self.pages.shape != (B, Hr, G, K)
        if first:
            self.pages = torch.empty(B, Hr, G, K, dtype=torch.long, device=q.device)
        if pool.kmax is None:         # every row within the budget: read all its pages
            self.pages.copy_(torch.arange(K, device=q.device).view(1, 1, 1, K).expand(B, Hr, G, K))
            return self.pages
        if cfg.selector == "drift":
            if self.q_ref is None or self.q_ref.shape != q.shape:
                self.q_ref = torch.zeros(B, Hr, G, D, dtype=torch.float32, device=q.device)
                first = True
            need = ops.query_drift(q, self.q_ref, lengths, self._frequencies(q), cfg.selector_drift,
                                   selects or first, cfg, memo)
            ops.select_pages(q, pool.kmax, pool.kmin, lengths, K, cfg, need=need, out=self.pages)
        elif selects or first:
            ops.select_pages(q, pool.kmax, pool.kmin, lengths, K, cfg, out=self.pages)
        return self.pages

    def _frequencies(self, q) -> torch.Tensor:
        """The RoPE frequencies on q's device. Rows are stored from their first real token, so
        ``lengths - 1`` is a query's position up to its row's left padding: both queries of a
        comparison are rotated back by the same extra angle, which their cosine does not see.
        A model without RoPE frequencies compares queries as they come."""
        if self._inv_freq is None or self._inv_freq.device != q.device:
            half = q.shape[-1] // 2
            freq = self.rope_inv_freq if self.rope_inv_freq is not None else torch.zeros(half)
            self._inv_freq = freq.float().to(q.device).contiguous()
        return self._inv_freq

    def apply(self, fn) -> None:
        if self.pages is not None:
            self.pages = fn(self.pages)
        if self.q_ref is not None:
            self.q_ref = fn(self.q_ref)
