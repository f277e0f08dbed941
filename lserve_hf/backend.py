"""Which implementation runs: the Triton kernels (``lserve_hf.kernels``) or the torch reference.

"auto" takes the kernels for CUDA tensors when Triton imports, the torch path otherwise;
"triton" insists (a clear error when it cannot); "torch" never uses them."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("lserve_hf")
_said: set[str] = set()


def say_once(msg: str) -> None:
    """Log a message once per process: a patched path that cannot run as asked says so, once."""
    if msg not in _said:
        _said.add(msg)
        logger.warning(msg)


def use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    from lserve_hf import kernels

    ok = x.is_cuda and kernels.TRITON_AVAILABLE
    if backend == "triton" and not ok:
        raise RuntimeError(
            "LServeConfig(backend='triton') needs CUDA tensors and an importable `triton` "
            f"(tensor on {x.device}, triton available: {kernels.TRITON_AVAILABLE}); "
            "use backend='auto' or 'torch' on this machine.")
    return ok


def set_attention_implementation(model, name) -> None:
    """Switch ``model`` (and its sub-models) to the attention implementation ``name``; older
    models that refuse ``set_attn_implementation`` get their configs set directly."""
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name
