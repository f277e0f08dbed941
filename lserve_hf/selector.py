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

from . import ops, reference


class PageSelector:
    """The page selection of one layer: ``pages`` ``[B, Hr, G, K]``, overwritten in place (a
    captured decode graph reads the buffer), and with the drift selector ``q_ref``
    ``[B, Hr, G, D]``, each query head's query before RoPE (unit length) when it last chose."""

    def __init__(self, config, dense: bool, rope_inv_freq=None):
        self.config = config
        self.dense = dense        # a dense layer reads every page
        self.rope_inv_freq = rope_inv_freq
        self.pages = None
        self.q_ref = None

    def read_list(self, q: torch.Tensor, pool, lengths: torch.Tensor, selects: bool) -> torch.Tensor:
        """Pages the decode step of queries ``q`` ``[B, Hr, G, D]`` reads, ``[B, Hr, G, K + 1]``:
        the selection plus the newest page (-1 where the selection already holds it)."""
        B, Hr, G, _ = q.shape
        cfg = self.config
        n_pages = pool.capacity // cfg.page_size
        if self.dense:
            return torch.arange(n_pages, device=q.device).view(1, 1, 1, -1).expand(B, Hr, G, -1)
        K = cfg.pages_per_selection
        if pool.kmax is None:         # every row within the budget: read all its pages
            self._keep(torch.arange(K, device=q.device).view(1, 1, 1, K).expand(B, Hr, G, K))
        elif selects or self.pages is None or (cfg.selector == "drift" and self.q_ref is None):
            self._keep(ops.select_pages(q, pool.kmax, pool.kmin, lengths, K, cfg))
            if cfg.selector == "drift":
                self._keep_query(self._unit_query(q, lengths))
        elif cfg.selector == "drift":
            now = self._unit_query(q, lengths)
            drifted = (now * self.q_ref).sum(-1) < cfg.selector_drift          # [B, Hr, G]
            ops.select_pages(q, pool.kmax, pool.kmin, lengths, K, cfg, need=drifted, out=self.pages)
            self.q_ref.copy_(torch.where(drifted.unsqueeze(-1), now, self.q_ref))
        last = ((lengths - 1) // cfg.page_size).view(B, 1, 1, 1).expand(B, Hr, G, 1)
        dup = (self.pages == last).any(-1, keepdim=True)
        return torch.cat([self.pages, torch.where(dup, -1, last)], dim=-1)

    def _unit_query(self, q, lengths) -> torch.Tensor:
        """The query before RoPE, of unit length. Rows are stored from their first real token, so
        ``lengths - 1`` is the query's position up to the row's left padding: a rotation by the
        same angle for both queries of a comparison, which the cosine does not see."""
        if self.rope_inv_freq is not None:
            q = reference.unrope(q, lengths - 1, self.rope_inv_freq.to(q.device))
        q = q.float()
        return q * torch.rsqrt((q * q).sum(-1, keepdim=True).clamp_min(1e-30))

    def _keep(self, chosen: torch.Tensor) -> None:
        if self.pages is None or self.pages.shape != chosen.shape:
            self.pages = chosen.contiguous()
        else:
            self.pages.copy_(chosen)

    def _keep_query(self, now: torch.Tensor) -> None:
        if self.q_ref is None or self.q_ref.shape != now.shape:
            self.q_ref = now.clone()
        else:
            self.q_ref.copy_(now)

    def apply(self, fn) -> None:
        if self.pages is not None:
            self.pages = fn(self.pages)
        if self.q_ref is not None:
            self.q_ref = fn(self.q_ref)
