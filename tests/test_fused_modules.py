"""The fused RMSNorm and SwiGLU kernels against Transformers' own modules, and the patch that
switches those modules (``lserve_hf.fused_modules``). On a machine without CUDA the kernels run in
Triton's interpreter (set up by conftest), on random inputs and weights (never ones or zeros)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from conftest import interpreted_kernels, tiny_llama

CUDA = interpreted_kernels()

pytest.importorskip("triton")

from lserve_hf import LServeConfig, fused_modules, patch_model, unpatch_model  # noqa: E402
from lserve_hf.kernels.rms_norm import rms_norm  # noqa: E402
from lserve_hf.kernels.swiglu import silu_mul  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
MODEL_TYPES = ("llama", "mistral", "qwen2")


def _bound(dtype) -> int:
    """Ulps allowed against Transformers: fp32 keeps the few-ulp differences of a mean's order and
    of rsqrt; a 16-bit rounding absorbs them, bar a tie (1). Triton's CPU interpreter does not round
    bf16 to nearest (72% of its bf16 results are off by 1-3 ulps; fp16 is exact there), so on the
    CPU bf16 gets 4: the GPU checks it at 1."""
    if dtype == torch.float32:
        return 8
    return 4 if dtype == torch.bfloat16 and not CUDA else 1


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two tensors of one float dtype (finite,
    same signs where nonzero): their bit patterns as integers."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return int((a.contiguous().view(ints).long() - b.contiguous().view(ints).long()).abs().max())


def _norm_module(model_type: str, hidden: int, weight_dtype, seed: int):
    cls = fused_modules.transformers_class(fused_modules._FUSABLE[model_type][0])
    norm = cls(hidden, eps=1e-5).to(DEV)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g) * 0.5 + 1.0)
    return norm.to(weight_dtype)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("hidden", [64, 100, 576])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_rms_norm_matches_the_transformers_module(model_type, hidden, dtype, weight_dtype):
    norm = _norm_module(model_type, hidden, weight_dtype, seed=hidden)
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 7, hidden), (1, 1, hidden), (5, hidden)]:
        x = (torch.randn(*shape, generator=g) * 3 + 0.5).to(device=DEV, dtype=dtype)
        with torch.no_grad():
            want = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon)
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.dtype == dtype:
            assert _ulps(got, want) <= _bound(dtype), (shape, dtype, weight_dtype)
        else:   # fp32 weight times the normalised row in x's dtype: compare that row, in x's dtype
            rows = [(t / norm.weight).to(dtype) for t in (got, want)]
            assert _ulps(*rows) <= _bound(dtype), (shape, dtype, weight_dtype)


def test_rms_norm_of_a_strided_view_and_no_rows():
    norm = _norm_module("llama", 48, torch.float32, seed=3)
    x = torch.randn(4, 96, device=DEV)[:, ::2]            # rows of stride 96, columns of stride 2
    with torch.no_grad():
        want = norm(x)
    assert _ulps(rms_norm(x, norm.weight, 1e-5), want) <= 8
    assert rms_norm(x[:0], norm.weight, 1e-5).shape == (0, 48)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, norm.weight[:10], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul_matches_transformers_activation_times_up(dtype):
    from transformers.activations import ACT2FN

    act = ACT2FN["silu"]
    g = torch.Generator().manual_seed(2)
    for shape in [(3, 7, 37), (1, 1, 2051), (2, 1500)]:     # odd sizes, partial last block
        gate = (torch.randn(*shape, generator=g) * 4).to(device=DEV, dtype=dtype)
        up = torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)
        want = act(gate) * up
        got = silu_mul(gate, up)
        assert got.dtype == dtype and got.shape == want.shape
        assert _ulps(got, want) <= _bound(dtype), (shape, dtype)
    with pytest.raises(ValueError, match="differ"):
        silu_mul(gate, up[..., :-1])


def _with_random_norms(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patch_switches_norms_and_mlps_and_unpatch_restores_them(model_type):
    model = tiny_llama(layers=2, model_type=model_type)
    before = [type(m) for m in model.modules()]
    patch_model(model, LServeConfig(streaming_sparsity=0.0))
    fused = [m for m in model.modules() if isinstance(m, (fused_modules.LServeRMSNormMixin,
                                                         fused_modules.LServeMLPMixin))]
    assert len(fused) == 2 * 2 + 1 + 2     # two norms and an MLP per layer, the final norm
    unpatch_model(model)
    assert [type(m) for m in model.modules()] == before
    for config in (LServeConfig(streaming_sparsity=0.0, fused_norm_mlp=False),
                   LServeConfig(streaming_sparsity=0.0, backend="torch")):
        patch_model(model, config)
        assert [type(m) for m in model.modules() if not type(m).__name__.startswith("LServe")] \
            == [t for t in before if not t.__name__.endswith(("Model", "ForCausalLM"))]
        unpatch_model(model)


def test_an_mlp_without_silu_keeps_its_module():
    model = tiny_llama(layers=1, hidden_act="gelu")
    patch_model(model, LServeConfig(streaming_sparsity=0.0))
    assert not isinstance(model.model.layers[0].mlp, fused_modules.LServeMLPMixin)
    assert isinstance(model.model.layers[0].input_layernorm, fused_modules.LServeRMSNormMixin)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fused_forward_equals_the_model_s_own(model_type, monkeypatch):
    """The fused modules' kernel path (forced here on the CPU, where the interpreter runs it) gives
    the unpatched model's logits; a deepcopy and a pickle of the patched model keep the fused
    classes and their output."""
    model = _with_random_norms(tiny_llama(layers=2, model_type=model_type)).to(DEV)
    ids = torch.randint(1, 101, (2, 37), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        want = model(ids).logits
    patch_model(model, LServeConfig(streaming_sparsity=0.0))
    calls = []
    real = fused_modules._kernels_take
    monkeypatch.setattr(fused_modules, "_kernels_take", lambda *t: calls.append(1) or (real(*t) or not CUDA))
    for m in (model, copy.deepcopy(model)):
        with torch.no_grad():
            got = m(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(calls) == 2 * (2 * 2 + 1 + 2)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert isinstance(again.model.norm, fused_modules.LServeRMSNormMixin)


def test_a_recorded_gradient_runs_the_module_s_own_forward():
    weight = torch.nn.Parameter(torch.rand(8, device=DEV) + 0.5)
    x = torch.randn(2, 3, 8, device=DEV)
    assert fused_modules.records_gradient(x, weight)                   # the weight wants its gradient
    assert fused_modules.records_gradient(x.requires_grad_(), weight.detach())   # so does the input
    assert not fused_modules.records_gradient(x.detach(), weight.detach())
    assert not fused_modules._kernels_take(x, weight)
    with torch.no_grad():
        assert not fused_modules.records_gradient(x, weight)
        assert fused_modules._kernels_take(x, weight) == CUDA       # the CPU always runs the module's own


def test_a_long_input_runs_the_mlp_in_token_slices(monkeypatch):
    """Past MLP_SLICE tokens the fused MLP runs slice by slice (a short last slice too) and gives
    the module's own output: rows are independent."""
    model = tiny_llama(layers=1).to(DEV)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 37, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        want = mlp(x)
    patch_model(model, LServeConfig(streaming_sparsity=0.0))
    monkeypatch.setattr(fused_modules, "MLP_SLICE", 8)
    monkeypatch.setattr(fused_modules, "_kernels_take", lambda *t: True)
    rows = []
    fused = fused_modules.LServeMLPMixin._fused
    monkeypatch.setattr(fused_modules.LServeMLPMixin, "_fused", lambda self, xs: rows.append(xs.shape[-2]) or fused(self, xs))
    with torch.no_grad():
        got = model.model.layers[0].mlp(x)
    assert rows == [8, 8, 8, 8, 5]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    unpatch_model(model)
