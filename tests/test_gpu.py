"""The patched model on CUDA runs the Triton kernels and agrees with the torch path."""

import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeConfig, patch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# selector_max_age=4: the drift selector's refresh every 4 steps, so short runs see both decode
# graphs (a refresh and a drift-checked reuse)
CFG = dict(streaming_sparsity=0.5, page_size=64, logical_page_size=16, token_budget=256,
           prefill_sink=32, prefill_local=256, decode_sink=32, decode_local=128, selector_interval=4,
           selector_max_age=4)


def _model():
    return tiny_llama(layers=3, heads=8, kv_heads=2, head_dim=64, vocab=500, seed=0).cuda()


PATTERN = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))


def _run(backend, ids, mask, steps=24, graphs=False):
    model = _model()
    patch_model(model, LServeConfig(backend=backend, cuda_graphs=graphs, **CFG), head_pattern=PATTERN)
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
    _run("auto", ids, torch.ones_like(ids), steps=6)   # eager decode: every step calls the kernels
    assert calls.get("block_sparse_prefill") == 3 and calls.get("sparse_paged_decode") == 3 * 5
    assert calls.get("select_pages", 0) >= 3


@pytest.mark.parametrize("selector, interval, grow",
                         [("reuse", 4, False), ("reuse", 1, False), ("drift", 4, False), ("reuse", 4, True),
                          ("drift", 4, True)])
def test_graph_decode_equals_eager_token_for_token(selector, interval, grow, monkeypatch):
    from lserve_hf import LServeCache
    from lserve_hf.decode_graph import DecodeGraphs

    monkeypatch.setattr(DecodeGraphs, "GROWTH", 64)
    ids = torch.randint(1, 500, (2, 900), generator=torch.Generator().manual_seed(2)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :50] = 0
    model = _model()
    outs = {}
    # drift: every head chooses afresh every 4 steps too, so both graphs run within the 150 steps
    cfg = dict(CFG, selector=selector, selector_interval=interval)
    for graphs in (False, True):
        patch_model(model, LServeConfig(cuda_graphs=graphs, **cfg), head_pattern=PATTERN)
        # grow: a cache not sized by generate(), so the pools grow (and graphs are re-captured)
        extra = dict(past_key_values=LServeCache(model)) if grow else {}
        with torch.no_grad():
            outs[graphs] = model.generate(ids, attention_mask=mask, max_new_tokens=150, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True, **extra)
    cache = outs[True].past_key_values
    assert LServeConfig(**cfg).refresh_interval == interval
    assert set(cache.decode_graphs.graphs) == ({"select"} if interval == 1 else {"select", "reuse"})
    assert (cache.epoch > len(cache.layers) + 1) == grow
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    assert torch.equal(torch.stack(outs[True].logits), torch.stack(outs[False].logits))


def test_graph_decode_steps_allocate_nothing():
    from lserve_hf import LServeCache

    model = patch_model(_model(), LServeConfig(**CFG), head_pattern=PATTERN)
    ids = torch.randint(1, 500, (1, 700), generator=torch.Generator().manual_seed(3)).cuda()
    steps = torch.randint(1, 500, (40, 1, 1), generator=torch.Generator().manual_seed(4)).cuda()
    cache = LServeCache(model, max_length=700 + 40)
    with torch.no_grad():
        model.model(ids, past_key_values=cache)
        for t in steps[:12]:                        # eager warm-up steps and both captures
            model.model(t, past_key_values=cache)
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        for t in steps[12:]:
            out = model.model(t, past_key_values=cache)
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats()
    assert set(cache.decode_graphs.graphs) == {"select", "reuse"}
    assert cache.get_seq_length() == 740 and int(cache.lengths[0]) == 740
    for key in ("allocation.all.allocated", "segment.all.allocated"):
        assert after[key] == before[key], key
    assert torch.isfinite(out.last_hidden_state).all()


def test_graph_decode_equals_eager_on_the_embedded_model(embedded_on_gpu_box):
    from lserve_hf import unpatch_model
    from lserve_hf.passkey import answer_matches, passkey_prompt

    model, tok = embedded_on_gpu_box
    model = model.cuda()
    p = passkey_prompt(tok, 3000, 0.5, chat=False)
    x = tok(p.text, return_tensors="pt", add_special_tokens=False).to("cuda")
    outs = {}
    try:
        for graphs in (False, True):
            patch_model(model, LServeConfig(token_budget=512, prefill_local=1024, decode_local=256,
                                            cuda_graphs=graphs))
            with torch.no_grad():
                outs[graphs] = model.generate(**x, max_new_tokens=24, do_sample=False)
    finally:
        unpatch_model(model)
        model.cpu()
    assert torch.equal(outs[True], outs[False])
    assert answer_matches(tok.decode(outs[True][0, x.input_ids.shape[1]:]), p.passkey)


@pytest.mark.parametrize("graphs", [False, True])
def test_head_dim_the_kernels_do_not_take_runs_the_torch_path_and_says_so(graphs, caplog):
    """Head dim 96 (not a power of two): prefill, summaries, selection and decode take the torch
    path on CUDA, eager or inside the decode graphs, with a one-time message, and give what
    backend='torch' gives."""
    from lserve_hf import ops

    ops._said.clear()
    ids = torch.randint(1, 500, (1, 700), generator=torch.Generator().manual_seed(6)).cuda()
    outs = []
    for backend in ("auto", "torch"):
        model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=96, vocab=500, seed=0).cuda()
        patch_model(model, LServeConfig(backend=backend, cuda_graphs=graphs, **CFG),
                    head_pattern=PATTERN[:2])
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=12, do_sample=False))
    assert torch.equal(outs[0], outs[1])
    assert "head dim 96" in caplog.text
