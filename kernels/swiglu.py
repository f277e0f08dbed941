"""SwiGLU's activation in one kernel: ``silu(gate) * up``, the middle of Transformers' Llama /
Mistral / Qwen2 MLP (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``).

Transformers runs it as two kernels, the SiLU writing a full intermediate tensor that the product
reads back: at a 128K-token prefill of Llama-3-8B that tensor is 3.8 GB per layer. Here each
element is read once from each input and written once, with Transformers' rounding: the SiLU in
fp32 (``x / (1 + exp(-x))``, an accurate exponential), rounded to the inputs' dtype, then the
product in fp32, rounded again.

Reference: the Transformers module's own forward (``lserve_hf.fused_modules``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024
# the element count follows the prompt length and batch: a runtime value, so a new length compiles nothing
LENGTH_ARGS = {"_silu_mul_kernel": ["n"]}


@triton.jit(do_not_specialize=LENGTH_ARGS["_silu_mul_kernel"])
def _silu_mul_kernel(GATE, UP, OUT, n, ACCURATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(GATE + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=inside, other=0.0).to(tl.float32)
    if ACCURATE:   # libdevice's expf, the exponential torch's SiLU uses (tl.exp is the fast approximation)
        e = libdevice.exp(-g)
    else:          # the interpreter: numpy's exponential
        e = tl.exp(-g)
    act = (g / (1.0 + e)).to(OUT.dtype.element_ty)
    tl.store(OUT + offs, (act.to(tl.float32) * u).to(OUT.dtype.element_ty), mask=inside)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shape and dtype: fp16, bf16 or fp32) as Transformers computes it."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if gate.dtype == torch.float64:
        raise ValueError("silu_mul takes fp16, bf16 or fp32; float64 runs the Transformers module")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, ACCURATE=gate.is_cuda, BLOCK=BLOCK,
                                                   num_warps=4)
    return out
