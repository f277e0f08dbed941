"""The patched model on CUDA runs the Triton kernels and agrees with the torch path."""

import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeConfig, patch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = dict(streaming_sparsity=0.5, page_size=64, logical_page_size=16, token_budget=256,
           prefill_sink=32, prefill_local=256, decode_sink=32, decode_local=128, selector_interval=4)


def _run(backend, ids, mask, steps=24):
    model = tiny_llama(layers=3, heads=8, kv_heads=2, head_dim=64, vocab=500, seed=0).cuda()
    pattern = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    patch_model(model, LServeConfig(backend=backend, **CFG), head_pattern=pattern)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def test_triton_backend_matches_torch_backend_through_generate():
    ids = torch.randint(1, 500, (2, 900), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :77] = 0                                    # left padding
    tri, ref = _run("triton", ids, mask), _run("torch", ids, mask)
    a, b = torch.stack(tri.logits).float(), torch.stack(ref.logits).float()
    err = (a - b).norm() / b.norm()
    assert err < 1e-3, err
    assert (tri.sequences == ref.sequences).float().mean() > 0.95


def test_triton_backend_is_used_on_cuda(monkeypatch):
    from lserve_hf import kernels

    calls = {}
    for name in ("block_sparse_prefill", "sparse_paged_decode", "select_pages"):
        fn = getattr(kernels, name)
        def wrapped(*a, _fn=fn, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setattr(kernels, name, wrapped)
    ids = torch.randint(1, 500, (1, 700), generator=torch.Generator().manual_seed(0)).cuda()
    _run("auto", ids, torch.ones_like(ids), steps=6)
    assert calls.get("block_sparse_prefill") == 3 and calls.get("sparse_paged_decode") == 3 * 5
    assert calls.get("select_pages", 0) >= 3
