"""LServe unified sparse attention (streaming heads + query-aware page selection) as a drop-in
patch for HuggingFace Transformers causal LMs."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__all__ = ["LServeCache", "LServeConfig", "SUPPORTED_MODEL_TYPES", "hbm_pages_for", "kv_bytes",
           "load_embedded_model", "max_batch_size", "patch_model", "unpatch_model"]
__version__ = "0.2.0"

# The public names load on first use (PEP 562): most of them import torch and transformers, which
# take seconds, and `lserve-hf --help` (or anything importing a light submodule such as
# lserve_hf.config) should not wait for them.
_HOME = {"LServeCache": "cache", "LServeConfig": "config", "SUPPORTED_MODEL_TYPES": "patch",
         "kv_bytes": "memory", "load_embedded_model": "embedded", "max_batch_size": "offload",
         "hbm_pages_for": "offload", "patch_model": "patch", "unpatch_model": "patch"}

if TYPE_CHECKING:   # static analysers and IDEs see the names eagerly
    from .cache import LServeCache
    from .config import LServeConfig
    from .embedded import load_embedded_model
    from .memory import kv_bytes
    from .offload import hbm_pages_for, max_batch_size
    from .patch import SUPPORTED_MODEL_TYPES, patch_model, unpatch_model


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value     # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
