"""Head patterns in DuoAttention's format, and the global-quantile rule that turns scores into
streaming heads.

A pattern is a ``[num_layers, num_kv_heads]`` matrix of scores alpha in [0, 1]: how much each KV
head needs full attention. DuoAttention publishes it as ``full_attention_heads.tsv`` (one row per
layer, tab-separated floats) beside a ``config.json`` of the run that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

PATTERN_FILE = "full_attention_heads.tsv"
# Trained gates land a hair outside [0, 1] (published files hold -1e-4); anything beyond this is
# not a score file.
_RANGE_SLACK = 0.01


def _pattern_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        return path / PATTERN_FILE, path / "config.json"
    return path, path.with_name("config.json")


def load_pattern(path: str | os.PathLike) -> torch.Tensor:
    """Read a DuoAttention ``full_attention_heads.tsv`` (or the folder holding it) as a float32
    tensor ``[num_layers, num_kv_heads]`` clamped to [0, 1]."""
    tsv, _ = _pattern_paths(path)
    if not tsv.is_file():
        raise FileNotFoundError(
            f"No head pattern at {tsv}. Pass the path of a DuoAttention 'full_attention_heads.tsv' "
            "(or its folder), or compute one with `lserve-hf calibrate`."
        )
    rows = [line.split() for line in tsv.read_text().splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{tsv} is not a rectangular table: every row (layer) needs one float per KV head.")
    try:
        scores = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{tsv} holds a value that is not a float: {exc}") from None
    return validate_scores(torch.from_numpy(scores), source=str(tsv))


def validate_scores(scores, source: str = "head pattern") -> torch.Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if scores.ndim != 2:
        raise ValueError(f"{source} must be 2-D [num_layers, num_kv_heads], got shape {tuple(scores.shape)}.")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{source} holds NaN or infinite scores.")
    if scores.min() < -_RANGE_SLACK or scores.max() > 1 + _RANGE_SLACK:
        raise ValueError(
            f"{source} holds scores in [{scores.min():.3g}, {scores.max():.3g}]; head scores must lie in [0, 1]."
        )
    return scores.clamp(0, 1).float()


def save_pattern(scores, path: str | os.PathLike, **run_config) -> Path:
    """Write scores as ``full_attention_heads.tsv`` plus ``config.json`` (the run's settings).

    ``path`` is a folder or a ``.tsv`` file name; returns the TSV's path."""
    scores = validate_scores(scores)
    tsv, cfg = _pattern_paths(path)
    tsv.parent.mkdir(parents=True, exist_ok=True)
    # repr-exact floats so that a round trip gives identical values
    np.savetxt(tsv, scores.double().numpy(), delimiter="\t", fmt="%.18e")
    cfg.write_text(json.dumps(run_config, indent=2, sort_keys=True, default=str) + "\n")
    return tsv


def streaming_mask(scores, sparsity: float) -> torch.Tensor:
    """Bool ``[num_layers, num_kv_heads]``, True where the KV head streams.

    The spec's rule: heads scoring below the ``sparsity``-quantile of all scores of the model
    stream, the rest are retrieval heads; per-layer counts are therefore uneven. Exactly
    ``round(sparsity * num_heads)`` heads stream. Ties are broken deterministically: among equal
    scores the head with the lower (layer, head) index streams first.
    """
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1].")
    scores = validate_scores(scores)
    flat = scores.flatten().double()
    n_stream = int(np.floor(float(sparsity) * flat.numel() + 0.5))
    order = torch.sort(flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:n_stream]] = True
    return mask.view_as(scores)
