"""Programmatic dependent launch (PDL, Hopper and newer) for the decode-step kernels.

A decode step is a chain of short launches (page scores, two top-k rounds, the sparse decode, the
split merge), each a few microseconds, so the gap between one kernel's last program and the next
kernel's first is a large share of the step. With PDL the next kernel is scheduled while the
previous one drains; every kernel launched this way calls ``gdc_wait`` before it touches memory,
which returns once the previous grid has finished and its writes are visible. Safe after any
kernel, PDL-aware or not.
"""

from __future__ import annotations

import functools

import torch

# Per kernel family, measured by benchmarks/bench_kernels.py --sweep on an H200 (2026-11-29, 128K,
# 50% streaming, graph replay): decode + merge 19.2 -> 18.9 us (17.9 with TMA pages); the page
# selection 16.8 -> 30.7 us (its hundreds of score programs and the waiting top-k programs
# compete for the multiprocessors), so off there.
PDL = {"decode": True, "select": False}


def pdl_options(device, family: str) -> dict:
    """Launch keyword for a kernel with a ``GDC`` constexpr: ``{"launch_pdl": True}`` on an sm90+
    GPU whose Triton knows the option, when ``PDL[family]`` is on; else ``{}``."""
    if not PDL[family] or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return {}
    return {"launch_pdl": True} if _triton_has_pdl() else {}


@functools.lru_cache(maxsize=None)
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
