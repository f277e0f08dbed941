"""Pages of the retrieval heads' KV pool: physical pages (the unit read at decode) split into
logical pages, each summarised by per-channel key max and min ("hierarchical paging").

Thin dispatch between the torch reference and the Triton kernels."""

from __future__ import annotations

import torch

from . import reference
from .backend import use_triton
from .config import LServeConfig


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_summaries(pool_k: torch.Tensor, lengths: torch.Tensor, cfg: LServeConfig):
    if use_triton(cfg.backend, pool_k) and pool_k.dtype != torch.float64:
        from .kernels import build_page_summaries

        return build_page_summaries(pool_k, lengths, cfg.logical_page_size)
    return reference.page_summaries(pool_k, lengths, cfg.logical_page_size)


def select(q, kmax, kmin, lengths, cfg: LServeConfig) -> torch.Tensor:
    """Pages per retrieval query head, ``[B, Hr, G, pages_per_selection]`` (``reference.select_pages``)."""
    if use_triton(cfg.backend, q):
        from .kernels import select_pages
        from .kernels.page_selector import unsupported

        if unsupported(q, cfg.page_size, cfg.logical_page_size):   # e.g. float64, D < 16
            select_pages = reference.select_pages
    else:
        select_pages = reference.select_pages
    return select_pages(q, kmax, kmin, lengths, cfg.page_size, cfg.logical_page_size, cfg.pages_per_selection)


def update_summaries(kmax, kmin, new_k, positions, cfg: LServeConfig) -> None:
    """Fold new keys ``[B, Hr, S, D]`` at token positions ``[B, S]`` into the summaries in place.
    Empty logical pages hold -inf/+inf, so a plain max/min starts a page correctly."""
    B, Hr, S, D = new_k.shape
    if S == 1 and use_triton(cfg.backend, new_k) and new_k.dtype != torch.float64:
        from .kernels import update_page_summaries

        update_page_summaries(kmax, kmin, new_k[:, :, 0], positions[:, 0], cfg.logical_page_size)
        return
    idx = (positions // cfg.logical_page_size).view(B, 1, S, 1).expand(B, Hr, S, D)
    kmax.scatter_reduce_(2, idx, new_k.to(kmax.dtype), reduce="amax")
    kmin.scatter_reduce_(2, idx, new_k.to(kmin.dtype), reduce="amin")
