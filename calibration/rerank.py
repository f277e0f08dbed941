"""Re-ranking the heads near the streaming threshold by a measured drop.

A pattern ranks heads by a cheap signal. Near the threshold a small error of that signal flips
whether a head streams, so there the heads of a band of ranks (the candidates) are measured
instead: with the heads ranked below the band streaming (the base), stream each candidate too
and take the drop of the answer's log-prob. The candidates then keep the band's score values,
reordered by drop, so that every head outside the band keeps its score and rank.

How the drop is measured is the caller's: under the gates, every head outside the base dense
(``probe_gates.refine_by_gates``), or as the patched model serves it (``serving_refine``).
"""

from __future__ import annotations

import torch


def threshold_band(scores: torch.Tensor, sparsity: float, n: int) -> tuple[int, int]:
    """Ranks ``[lo, hi)`` of the ``n`` heads nearest the threshold that ``sparsity`` sets, half
    below it and half above. ``scores`` may be any signal (the threshold is a count of heads)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must lie in [0, 1].")
    total = scores.numel()
    n_stream = int(sparsity * total + 0.5)    # the count heads.streaming_mask streams
    lo = max(0, n_stream - int(n) // 2)
    return lo, min(total, lo + int(n))


def quantile_band(scores: torch.Tensor, lo: float, hi: float) -> tuple[int, int]:
    """Ranks ``[lo, hi)`` between two quantiles of the ranking."""
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"band=({lo}, {hi}) must be two quantiles 0 <= lo < hi <= 1.")
    total = scores.numel()
    return int(round(lo * total)), int(round(hi * total))


def band_heads(scores: torch.Tensor, band: tuple[int, int],
               dense_layers=()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(candidates, base)`` for the ranks ``band`` of ``scores`` ``[num_layers, num_kv_heads]``
    (ascending: the lowest scores stream first; ties as ``streaming_mask``): the flat indices of
    the band's heads in rank order, and a flat bool mask of the heads ranked below it. Heads of
    ``dense_layers`` never stream, so they are no candidates."""
    lo, hi = band
    heads = scores.shape[-1]
    order = torch.argsort(scores.flatten(), stable=True)
    dense = set(dense_layers)
    candidates = torch.tensor([h for h in order[lo:hi].tolist() if h // heads not in dense], dtype=torch.long)
    base = torch.zeros(scores.numel(), dtype=torch.bool)
    base[order[:lo]] = True
    return candidates, base


def reorder(scores: torch.Tensor, candidates: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """``scores`` with the candidates' values permuted by measured drop: the smallest drop takes
    the lowest value (and streams first); every other head keeps its score."""
    flat = scores.flatten()
    new = flat.clone()
    new[candidates[torch.argsort(drops, stable=True)]] = flat[candidates].sort().values
    return new.view_as(scores)
