"""Launch plumbing shared by the kernel files: the checks of launch plans and inputs, and
programmatic dependent launch (PDL, Hopper and newer) for the decode-step kernels.

A decode step is a chain of short launches (page scores, two top-k rounds, the sparse decode, the
split merge), each a few microseconds, so the gap between one kernel's last program and the next
kernel's first is a large share of the step. With PDL the next kernel is scheduled while the
previous one drains; every kernel launched this way calls ``gdc_wait`` before it touches memory,
which returns once the previous grid has finished and its writes are visible. Safe after any
kernel, PDL-aware or not.

A PDL mode is a launch plan's ``pdl`` field (``DecodePlan``, ``SelectPlan``): True lets the next
grid be scheduled as soon as each program starts (its programs then wait on multiprocessors),
"late" once each program has written its output (the next grid's launch still overlaps this
one's drain), False no PDL.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def refuse_float64(kernel: str, reference: str, *tensors) -> None:
    """The kernels compute in fp32 on tensor cores: float64 inputs go to the torch reference."""
    if any(t.dtype == torch.float64 for t in tensors):
        raise ValueError(f"{kernel} takes fp16, bf16 or fp32 tensors, not float64; use the torch "
                         f"reference {reference}")


def check_pdl_mode(mode, owner: str) -> None:
    """Raise unless ``mode`` is a PDL mode: False, True or "late"."""
    if not (isinstance(mode, bool) or mode == "late"):
        raise ValueError(f"{owner}.pdl is {mode!r}; use False, True or \"late\"")


def check_power_of_two(owner: str, **values) -> None:
    """Raise unless each value is a positive power of two (Triton block shapes must be)."""
    for name, n in values.items():
        if not isinstance(n, int) or n < 1 or n & (n - 1):
            raise ValueError(f"{owner}.{name} is {n!r}; use a positive power of two")


def check_positive(owner: str, **values) -> None:
    for name, n in values.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{owner}.{name} is {n!r}; use a positive integer")


def pdl_options(device, mode) -> dict:
    """Launch keyword for a kernel with a ``GDC`` constexpr: ``{"launch_pdl": True}`` on an sm90+
    GPU whose Triton knows the option, when PDL ``mode`` is on; else ``{}``."""
    if not mode or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return {}
    return {"launch_pdl": True} if _triton_has_pdl() else {}


def gdc_mode(options: dict, mode) -> int:
    """The ``GDC`` constexpr of a kernel launched with ``options`` (from :func:`pdl_options`): 0
    no PDL, 1 trigger the next grid at the program's start, 2 at its end (``mode == "late"``)."""
    if not options:
        return 0
    return 2 if mode == "late" else 1


@functools.lru_cache(maxsize=None)
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@triton.jit
def gdc_start(GDC: tl.constexpr):
    """A PDL kernel's first step: wait until the previous grid's writes are visible (and, in mode
    1, let the next grid be scheduled now)."""
    if GDC:
        tl.extra.cuda.gdc_wait()
    if GDC == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def gdc_end(GDC: tl.constexpr):
    """A PDL kernel's last step in mode 2: this program is done, the next grid may be scheduled."""
    if GDC == 2:
        tl.extra.cuda.gdc_launch_dependents()
