"""How many bytes a KV cache holds, for any Transformers cache: ``kv_bytes(cache)``."""

from __future__ import annotations

import torch


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def kv_bytes(cache, reserved: bool = False) -> int:
    """Bytes of keys and values (and LServe's page summaries) a cache holds.

    ``reserved=False`` (default): the bytes of the tokens it stores, comparable between caches
    (a dense cache stores every token; an ``LServeCache`` its streaming heads' sink + window and
    its retrieval heads' pages). ``reserved=True``: the memory its tensors take, spare capacity
    included (an ``LServeCache`` sized for ``generate()``'s ``max_new_tokens``, a static cache)."""
    from .cache import LServeCache

    if isinstance(cache, LServeCache):
        return cache.kv_bytes(reserved=reserved)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"kv_bytes takes a transformers Cache, not {type(cache).__name__}.")
    total = 0
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if reserved or not isinstance(keys, torch.Tensor):
            total += _nbytes(keys) + _nbytes(values)
            continue
        # a static layer holds max_cache_len slots: count the ones filled
        seen = layer.get_seq_length() if hasattr(layer, "get_seq_length") else keys.shape[-2]
        seen = min(int(seen), keys.shape[-2])
        per_token = (_nbytes(keys) + _nbytes(values)) // max(keys.shape[-2], 1)
        total += per_token * seen
    return total
