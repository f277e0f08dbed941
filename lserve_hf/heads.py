"""Which KV heads stream: head patterns in DuoAttention's format, the global-quantile rule, the
patterns shipped with the package, and ``LayerPlan`` (one layer's split, fixed at patch time).

A pattern is a ``[num_layers, num_kv_heads]`` matrix of scores alpha in [0, 1]: how much each KV
head needs full attention. DuoAttention publishes it as ``full_attention_heads.tsv`` (one row per
layer, tab-separated floats) beside a ``config.json`` of the run that produced it. The serving
path reads patterns here; ``lserve_hf.calibration`` produces them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PATTERN_FILE = "full_attention_heads.tsv"
# Trained gates land a hair outside [0, 1] (published files hold -1e-4); anything beyond this is
# not a score file.
_RANGE_SLACK = 0.01
_SHIPPED_DIR = Path(__file__).parent / "shipped_patterns"
# (model_type, layers, hidden, q heads, kv heads, vocab) -> folder under shipped_patterns/
_SHIPPED = {
    ("llama", 30, 576, 9, 3, 49152): "SmolLM2-135M-Instruct",
}


# -- pattern files ------------------------------------------------------------------------------

def _pattern_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(the TSV, its config.json) for a TSV path or the folder holding it. An existing file is a
    file whatever its name; a path that does not exist and has no suffix is taken for a folder."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix == ""):
        return path / PATTERN_FILE, path / "config.json"
    return path, path.with_name("config.json")


def load_pattern(path: str | os.PathLike) -> torch.Tensor:
    """Read a DuoAttention ``full_attention_heads.tsv`` (or the folder holding it) as a float32
    tensor ``[num_layers, num_kv_heads]`` clamped to [0, 1]."""
    tsv, _ = _pattern_paths(path)
    if not tsv.is_file():
        raise FileNotFoundError(
            f"No head pattern at {tsv}. Pass the path of a DuoAttention 'full_attention_heads.tsv' "
            "(or its folder), or compute one with `lserve-hf calibrate`.")
    try:
        text = tsv.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{tsv} is not a text file: a head pattern is a tab-separated table of "
                         "floats, one row per layer (DuoAttention's full_attention_heads.tsv).") from None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{tsv} is not a rectangular table: every row (layer) needs one float per KV head.")
    try:
        scores = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{tsv} holds a value that is not a float: {exc}") from None
    return validate_scores(torch.from_numpy(scores), source=str(tsv))


def validate_scores(scores, source: str = "head pattern") -> torch.Tensor:
    """Scores as float32 ``[num_layers, num_kv_heads]`` in [0, 1], or a ValueError that says what
    is wrong with them (ragged rows, strings, a mapping, NaN, out of range)."""
    if isinstance(scores, (str, bytes, dict)) or scores is None:
        raise TypeError(f"{source} must be a [num_layers, num_kv_heads] array of scores in [0, 1] "
                        f"or the path of a full_attention_heads.tsv, not {type(scores).__name__}.")
    try:
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{source} is not a rectangular array of numbers (one row per layer, one "
                         f"score per KV head): {exc}") from None
    if scores.ndim != 2 or scores.numel() == 0:
        raise ValueError(f"{source} must be 2-D [num_layers, num_kv_heads] and not empty, got shape "
                         f"{tuple(scores.shape)}.")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{source} holds NaN or infinite scores.")
    if scores.min() < -_RANGE_SLACK or scores.max() > 1 + _RANGE_SLACK:
        raise ValueError(
            f"{source} holds scores in [{scores.min():.3g}, {scores.max():.3g}]; head scores must lie in [0, 1].")
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


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after a long calibration, when the pattern could not be written to ``path``."""
    tsv, _ = _pattern_paths(path)
    folder = tsv.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        # a file cannot hold the pattern's folder, whatever the permissions (root passes os.access)
        raise NotADirectoryError(f"cannot write the head pattern to {tsv}: {folder} is a file, not a "
                                 "folder; choose another --output.")
    if not os.access(folder, os.W_OK) or (tsv.exists() and not os.access(tsv, os.W_OK)):
        raise PermissionError(f"cannot write the head pattern to {tsv}: choose another --output.")


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


# -- shipped patterns ---------------------------------------------------------------------------

def model_key(config) -> tuple:
    return (config.model_type, config.num_hidden_layers, config.hidden_size,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size)


def find_shipped_pattern(config) -> Path | None:
    """The shipped pattern's TSV for a model config, or None."""
    name = _SHIPPED.get(model_key(config))
    if name is None:
        return None
    path = _SHIPPED_DIR / name / PATTERN_FILE
    return path if path.is_file() else None


def model_streaming_heads(model_config, sparsity: float, dense_layers=(), head_pattern=None) -> torch.Tensor:
    """Bool ``[num_layers, num_kv_heads]``: the streaming heads of a model for a sparsity, from
    ``head_pattern`` (a path or an array of scores), else the model's shipped pattern."""
    shape = (model_config.num_hidden_layers, model_config.num_key_value_heads)
    if head_pattern is None:
        if sparsity in (0.0, 1.0):
            # every head has the same kind: the scores cannot matter
            scores = torch.full(shape, 1.0 - sparsity)
        else:
            path = find_shipped_pattern(model_config)
            if path is None:
                raise ValueError(
                    f"No head pattern is known for this model ({model_config.model_type}, {shape[0]} layers x "
                    f"{shape[1]} KV heads). Pass head_pattern= a DuoAttention 'full_attention_heads.tsv' "
                    "(or a [num_layers, num_kv_heads] array of scores in [0, 1]), compute one with "
                    "`lserve-hf calibrate`, or use LServeConfig(streaming_sparsity=0) for page selection only.")
            scores = load_pattern(path)
    elif isinstance(head_pattern, (str, os.PathLike)):
        scores = load_pattern(head_pattern)
    else:
        scores = validate_scores(head_pattern)
    if tuple(scores.shape) != shape:
        raise ValueError(
            f"The head pattern has shape {tuple(scores.shape)} but the model has {shape[0]} layers x "
            f"{shape[1]} KV heads: use the pattern computed for this model (`lserve-hf calibrate`).")
    streaming = streaming_mask(scores, sparsity)
    for i in dense_layers:
        if i >= shape[0]:
            raise ValueError(f"dense_layers holds {i} but the model has {shape[0]} layers.")
        streaming[i] = False
    return streaming


# -- one layer's plan ---------------------------------------------------------------------------

@dataclass(eq=False)
class LayerPlan:
    """Which KV heads of one layer stream, fixed at patch time. Heads of a tensor are sorted by
    kind (streaming first) with one ``index_select``, so each kind is then a view."""

    layer_idx: int
    streaming: torch.Tensor  # bool [Hkv]
    dense: bool              # a dense layer: no streaming heads and no page selection
    config: object = None    # the LServeConfig this layer runs (one object for the whole model)
    rope_inv_freq: torch.Tensor | None = None  # the model's RoPE frequencies (queries before RoPE)
    _on_device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.streaming = torch.as_tensor(self.streaming, dtype=torch.bool).cpu()
        self.stream_heads = self.streaming.nonzero().flatten()
        self.retrieval_heads = (~self.streaming).nonzero().flatten()
        self.order = torch.cat([self.stream_heads, self.retrieval_heads])
        self.n_stream = self.stream_heads.numel()
        self.n_retrieval = self.retrieval_heads.numel()

    def _cached(self, key, make):
        """A tensor derived from the plan, made once per device (not per step)."""
        if key not in self._on_device:
            self._on_device[key] = make()
        return self._on_device[key]

    def heads(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(streaming, retrieval) KV-head indices on ``device``."""
        return self._cached(("heads", str(device)), lambda: (self.stream_heads.to(device),
                                                              self.retrieval_heads.to(device)))

    def streaming_on(self, device) -> torch.Tensor:
        return self._cached(("streaming", str(device)), lambda: self.streaming.to(device))

    def query_heads(self, device, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(streaming, retrieval) query-head indices on ``device``: the ``group`` query heads of
        each KV head of the kind, in that kind's order."""
        def make():
            offs = torch.arange(group, device=device)
            return tuple((h[:, None] * group + offs).flatten() for h in self.heads(device))
        return self._cached(("query_heads", str(device), group), make)

    def inv_freq_on(self, device) -> torch.Tensor | None:
        if self.rope_inv_freq is None:
            return None
        return self._cached(("rope", str(device)), lambda: self.rope_inv_freq.float().to(device))

    def _mixed(self) -> bool:
        return 0 < self.n_stream < self.streaming.numel()

    def sort_by_kind(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(streaming part, retrieval part) of ``x`` along its head dimension: one copy when both
        kinds exist, none when the layer has one kind."""
        if self._mixed():
            x = x.index_select(dim, self._cached(("order", str(x.device)), lambda: self.order.to(x.device)))
        return x.narrow(dim, 0, self.n_stream), x.narrow(dim, self.n_stream, x.shape[dim] - self.n_stream)

    def unsort(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of ``sort_by_kind`` on a tensor whose heads are in (streaming, retrieval) order."""
        if not self._mixed():
            return x
        inv = self._cached(("inverse", str(x.device)), lambda: torch.argsort(self.order).to(x.device))
        return x.index_select(dim, inv)


def layer_plans(streaming: torch.Tensor, config, rope_inv_freq=None) -> list[LayerPlan]:
    dense = set(config.dense_layers)
    rope = None if rope_inv_freq is None else rope_inv_freq.detach().float().cpu()
    return [LayerPlan(i, streaming[i].clone(), i in dense, config, rope) for i in range(streaming.shape[0])]
