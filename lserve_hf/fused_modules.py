"""The decoder's RMSNorms and its MLP's SwiGLU activation as one Triton kernel each
(``LServeConfig.fused_norm_mlp``): Transformers' modules, switched to a subclass whose forward
runs the fused kernel (``kernels/rms_norm.py``, ``kernels/swiglu.py``) where it can, and the
module's own forward everywhere else.

Why: next to sparse attention, these elementwise passes are what is left of a layer that is not a
matrix product. At a 128K-token prefill of Llama-3-8B, Transformers' RMSNorm alone moves about 18 GB
per call through eight kernels; in a decode step a norm is eight launches for a 4096-wide row.
The kernels keep Transformers' arithmetic (fp32 statistics, the same roundings), so results agree
with the modules' to the last place, bar the order of a mean's additions.

The fused forward runs for CUDA tensors of 16- or 32-bit floats when Triton is importable and no
gradient is being recorded (the kernels have no backward); otherwise the module's own forward
runs, unchanged. Only the classes listed in ``_FUSABLE`` are switched, and an MLP only when its
activation is SiLU: a model whose code differs keeps its modules.
"""

from __future__ import annotations

import torch
from torch import nn

_FUSABLE = {   # model type: (its RMSNorm class, its MLP class), in transformers.models.<type>.modeling_<type>
    "llama": ("LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("MistralRMSNorm", "MistralMLP"),
    "qwen2": ("Qwen2RMSNorm", "Qwen2MLP"),
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def records_gradient(*tensors) -> bool:
    """Whether autograd would record an operation on these tensors (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _kernels_take(*tensors) -> bool:
    if not tensors[0].is_cuda or any(t.dtype not in _FLOATS for t in tensors) or records_gradient(*tensors):
        return False
    from . import kernels

    return kernels.TRITON_AVAILABLE


class LServeRMSNormMixin:
    """Mixed in front of a Transformers RMSNorm class."""

    def forward(self, hidden_states):
        if _kernels_take(hidden_states, self.weight):
            from .kernels.rms_norm import rms_norm

            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


# Tokens per slice of a long prefill chunk's MLP: the gate, up and activation outputs are
# ``intermediate_size`` wide (3.5x the hidden size in Llama-3-8B), so a 16K-token chunk's MLP
# alone would hold 1.3 GiB of them at once; slices of 4096 tokens hold a quarter of that, and are
# still products large enough to run at the GEMMs' full rate. Rows are independent, so slicing
# changes no result.
MLP_SLICE = 4096


class LServeMLPMixin:
    """Mixed in front of a Transformers gated MLP class with a SiLU activation."""

    def _fused(self, x):
        from .kernels.swiglu import silu_mul

        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype == up.dtype:
            return self.down_proj(silu_mul(gate, up))
        return self.down_proj(self.act_fn(gate) * up)      # projections of two dtypes: as Transformers

    def forward(self, x):
        if not _kernels_take(x, self.gate_proj.weight):
            return super().forward(x)
        if x.dim() < 2 or x.shape[-2] <= MLP_SLICE:
            return self._fused(x)
        out = None
        for a in range(0, x.shape[-2], MLP_SLICE):
            part = self._fused(x[..., a:a + MLP_SLICE, :])
            if out is None:
                out = part.new_empty(x.shape[:-1] + part.shape[-1:])
            out[..., a:a + MLP_SLICE, :] = part
        return out


def transformers_class(name: str):
    """The Transformers class ``name`` of ``_FUSABLE`` (None if this Transformers lacks it)."""
    import importlib

    for mtype, names in _FUSABLE.items():
        if name in names:
            module = importlib.import_module(f"transformers.models.{mtype}.modeling_{mtype}")
            return getattr(module, name, None)
    return None


def mixin_for(cls: type):
    """The mixin that fuses ``cls`` (a ``_FUSABLE`` class), or None."""
    if cls.__name__.endswith("RMSNorm"):
        return LServeRMSNormMixin
    if cls.__name__.endswith("MLP"):
        return LServeMLPMixin
    return None


def fusable(model, model_type: str):
    """(module, mixin) for each module of ``model`` whose class the fused kernels can run."""
    from transformers import activations

    silu = (nn.SiLU,) + ((activations.SiLUActivation,) if hasattr(activations, "SiLUActivation") else ())
    wanted = {transformers_class(n) for n in _FUSABLE.get(model_type, ())} - {None}
    for module in model.modules():
        cls = type(module)
        if cls not in wanted:
            continue
        if cls.__name__.endswith("MLP") and not isinstance(getattr(module, "act_fn", None), silu):
            continue
        yield module, mixin_for(cls)


def fuse(model, model_type: str) -> int:
    """Switch the fusable modules of ``model`` to their fused subclasses; how many were switched."""
    from .decoder import patched_class

    n = 0
    for module, mixin in list(fusable(model, model_type)):
        module.__class__ = patched_class(type(module), mixin)
        n += 1
    return n


def unfuse(model) -> None:
    """Switch every fused module of ``model`` back to its Transformers class."""
    for module in model.modules():
        base = getattr(type(module), "_lserve_base", None)
        if base is not None and issubclass(type(module), (LServeRMSNormMixin, LServeMLPMixin)):
            module.__class__ = base
