"""Query-aware page selection for the retrieval heads of one layer (Quest scoring, LServe's
hierarchical pages): which physical pages a decode step reads.

A retrieval query head reads at most ``pages_per_selection`` pages: the newest page always, and
the best-scoring others by the upper bound ``sum_c max(q_c Kmax_c, q_c Kmin_c)`` of q.k over
each page. A selecting step chooses them from scratch; the steps in between reuse the choice
(``selector_interval``); ``DecodeStep`` decides which step is which."""

from __future__ import annotations

import torch

from . import ops


class PageSelector:
    """The page selection of one layer: ``pages`` ``[B, Hr, G, K]``, chosen at a selecting step
    and overwritten in place (a captured decode graph reads this buffer)."""

    def __init__(self, config, dense: bool):
        self.config = config
        self.dense = dense        # a dense layer reads every page
        self.pages = None

    def read_list(self, q: torch.Tensor, pool, lengths: torch.Tensor, selects: bool) -> torch.Tensor:
        """Pages the decode step of queries ``q`` ``[B, Hr, G, D]`` reads, ``[B, Hr, G, K + 1]``:
        the selection plus the newest page (-1 where the selection already holds it)."""
        B, Hr, G, _ = q.shape
        cfg = self.config
        n_pages = pool.capacity // cfg.page_size
        if self.dense:
            return torch.arange(n_pages, device=q.device).view(1, 1, 1, -1).expand(B, Hr, G, -1)
        if selects:
            if pool.kmax is None:     # every row within the budget: read all its pages
                K = cfg.pages_per_selection
                chosen = torch.arange(K, device=q.device).view(1, 1, 1, K).expand(B, Hr, G, K).contiguous()
            else:
                chosen = ops.select_pages(q, pool.kmax, pool.kmin, lengths, cfg.pages_per_selection, cfg)
            if self.pages is None or self.pages.shape != chosen.shape:
                self.pages = chosen
            else:
                self.pages.copy_(chosen)   # in place: a captured decode graph reads this buffer
        elif self.pages is None:
            raise RuntimeError("LServe: a decode step reused a page selection that was never made.")
        last = ((lengths - 1) // cfg.page_size).view(B, 1, 1, 1).expand(B, Hr, G, 1)
        dup = (self.pages == last).any(-1, keepdim=True)
        return torch.cat([self.pages, torch.where(dup, -1, last)], dim=-1)

    def apply(self, fn) -> None:
        if self.pages is not None:
            self.pages = fn(self.pages)
