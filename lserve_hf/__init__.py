"""LServe unified sparse attention (streaming heads + query-aware page selection) as a drop-in
patch for HuggingFace Transformers causal LMs."""

from .cache import LServeCache
from .config import LServeConfig
from .embedded import load_embedded_model
from .memory import kv_bytes
from .offload import max_batch_size
from .patch import SUPPORTED_MODEL_TYPES, patch_model, unpatch_model

__all__ = ["LServeCache", "LServeConfig", "SUPPORTED_MODEL_TYPES", "kv_bytes", "load_embedded_model",
           "max_batch_size", "patch_model", "unpatch_model"]
__version__ = "0.2.0"
