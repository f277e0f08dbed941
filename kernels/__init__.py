"""Triton kernels of LServe unified sparse attention (lserve_hf.kernels)."""

TRITON_AVAILABLE = False
