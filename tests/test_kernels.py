"""The Triton kernels against their torch references (lserve_hf.reference).

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here
before Triton is imported) on small shapes; with CUDA the same tests run compiled, and the
``gpu`` tests add larger shapes. Inputs are random (seeded), never zeros; kernels run in fp32 or
bf16 and are compared with the reference on float64 copies by relative norm error.
"""

from __future__ import annotations

from dataclasses import astuple, replace

import pytest
import torch

from conftest import interpreted_kernels

CUDA = interpreted_kernels()

pytest.importorskip("triton")

from lserve_hf import reference as R  # noqa: E402
from lserve_hf.kernels import page_selector as PS  # noqa: E402
from lserve_hf.kernels.block_sparse_prefill import (PrefillPlan, block_sparse_prefill,  # noqa: E402
                                                    default_prefill_plan)
from lserve_hf.kernels.page_selector import SelectPlan  # noqa: E402
from lserve_hf.kernels.page_summary import build_page_summaries, update_page_summaries  # noqa: E402
from lserve_hf.kernels.sparse_decode import DecodePlan, sparse_paged_decode  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# Small blocks so that tiny CPU shapes still span many key / query blocks.
SMALL = PrefillPlan(32, 16, 4, 1)


@pytest.fixture
def kernels_everywhere(monkeypatch):
    """Route every LServe operation the kernels take to them, CPU tensors included (the
    interpreter runs them there), whatever the config's backend."""
    from lserve_hf import kernels, ops

    monkeypatch.setattr(ops, "_kernels_for", lambda cfg, x: kernels)
    return monkeypatch


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-2


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEV).to(dtype)


# --------------------------------------------------------------------------------- prefill

def _check_prefill(B, Hq, Hkv, Sq, Skv, D, streaming, sink, local, q_offset=0, kv_start=None,
                   sliding_window=None, dtype=torch.float32, plan=SMALL, scale=None):
    q = _randn(B, Hq, Sq, D, dtype=dtype)
    k = _randn(B, Hkv, Skv, D, dtype=dtype)
    v = _randn(B, Hkv, Skv, D, dtype=dtype)
    stream = torch.tensor(streaming, device=DEV)
    start = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    out = torch.full_like(q, float("nan"))                      # poisoned: every element must be written
    got = block_sparse_prefill(q, k, v, stream, sink, local, q_offset, start, scale, sliding_window,
                               out=out, plan=plan)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert not torch.isnan(out).any()
    ref = R.prefill_attention(q.double(), k.double(), v.double(), stream, sink, local, q_offset,
                              start, scale, sliding_window)
    err = rel_err(out, ref)
    assert err < _tol(dtype), err
    return q, k, v, stream, start, out, ref


@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (8, 64)])
def test_prefill_gqa_mixed_heads(G, D):
    torch.manual_seed(10 + G)
    # odd lengths; sink 5 and local 21 cut through 16-key blocks
    _check_prefill(1, 2 * G, 2, 75, 75, D, [True, False], sink=5, local=21)


def test_prefill_offset_kv_start_chunked():
    torch.manual_seed(1)
    # a query chunk at offset 61 into a 131-key cache, left padding per row
    _check_prefill(2, 8, 2, 70, 131, 64, [True, False], sink=7, local=19, q_offset=61,
                   kv_start=[0, 13])


def test_prefill_all_streaming_and_all_dense():
    torch.manual_seed(2)
    _check_prefill(1, 4, 4, 67, 67, 64, [True] * 4, sink=3, local=29, kv_start=[9])
    _check_prefill(1, 4, 4, 67, 67, 64, [False] * 4, sink=3, local=29, kv_start=[9])


def test_prefill_sliding_window_and_no_sink():
    torch.manual_seed(3)
    _check_prefill(2, 4, 2, 53, 53, 128, [True, False], sink=0, local=11, sliding_window=23,
                   kv_start=[4, 0], scale=0.07)


def test_prefill_bf16_default_blocks():
    torch.manual_seed(4)
    # the tuned (Hopper) block sizes, with a local window that is not a block multiple
    _check_prefill(1, 4, 2, 150, 150, 64, [True, False], sink=9, local=70, dtype=torch.bfloat16,
                   plan=None)


@pytest.mark.parametrize("case", ["gqa8_d64", "gqa4_d128_offset_start", "gqa1_window_all_streaming"])
def test_prefill_tma_path(case):
    """Tiles moved by tensor descriptors (Hopper's copy engine; the interpreter emulates it): keys
    past the cache and query rows past the chunk come back as zeros, output rows past it are
    clipped, so odd lengths, chunk offsets and padding give the reference result."""
    torch.manual_seed(40 + len(case))
    kw = dict(dtype=torch.bfloat16, plan=replace(SMALL, tma=True))
    if case == "gqa8_d64":
        _check_prefill(1, 16, 2, 75, 75, 64, [True, False], sink=5, local=21, **kw)
    elif case == "gqa4_d128_offset_start":
        _check_prefill(2, 8, 2, 70, 131, 128, [False, True], sink=7, local=19, q_offset=61,
                       kv_start=[0, 13], **kw)
    else:
        _check_prefill(2, 3, 3, 53, 53, 64, [True] * 3, sink=0, local=11, sliding_window=23,
                       kv_start=[4, 0], **kw)


def test_prefill_tma_refuses_unaligned_layouts():
    stream = torch.tensor([False, True], device=DEV)
    q = _randn(1, 2, 8, 64, dtype=torch.float32)                     # 4-byte elements
    with pytest.raises(ValueError, match="tma=True"):
        block_sparse_prefill(q, q, q, stream, 4, 4, plan=default_prefill_plan(64, tma=True))
    flat = _randn(2 * 8 * 64 + 1, dtype=torch.bfloat16)
    shifted = flat[1:].view(1, 2, 8, 64)                              # base 2 bytes off alignment
    with pytest.raises(ValueError, match="tma=True"):
        block_sparse_prefill(shifted, shifted, shifted, stream, 4, 4, plan=replace(SMALL, tma=True))


@pytest.mark.parametrize("dtype,tma", [(torch.float32, False), (torch.bfloat16, True)])
def test_prefill_q_heads_subset(dtype, tma):
    """q_heads: only the listed query heads are computed (against a store holding just their KV
    heads) and written; the other heads of the output keep what they held."""
    torch.manual_seed(50)
    B, Hq, G, S, T, D = 2, 8, 2, 37, 90, 64
    q = _randn(B, Hq, S, D, dtype=dtype)
    kv_heads = torch.tensor([3, 1], device=DEV)                  # the store holds KV heads 3 and 1
    k = _randn(B, 2, T, D, dtype=dtype)
    v = _randn(B, 2, T, D, dtype=dtype)
    q_heads = (kv_heads[:, None] * G + torch.arange(G, device=DEV)).flatten()
    stream = torch.tensor([True, False], device=DEV)
    start = torch.tensor([0, 9], device=DEV)
    out = torch.full_like(q, float("nan"))
    block_sparse_prefill(q, k, v, stream, 5, 13, T - S, start, out=out, q_heads=q_heads,
                         plan=replace(SMALL, tma=tma))
    ref = R.prefill_attention(q[:, q_heads].double(), k.double(), v.double(), stream, 5, 13, T - S, start)
    assert rel_err(out[:, q_heads], ref) < _tol(dtype)
    others = [h for h in range(Hq) if h not in q_heads.tolist()]
    assert torch.isnan(out[:, others]).all()


@pytest.mark.parametrize("sparsity", [0.5, 1.0])
def test_chunked_prefill_through_the_kernel_equals_torch_path(sparsity, monkeypatch):
    """A patched model's chunked prefill through the kernel (one launch per head kind, queries
    and output in place) gives the torch path's logits: left padding, chunks of 29 tokens."""
    from conftest import tiny_llama
    from lserve_hf import LServeConfig, kernels, ops, patch_model

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("q_heads") is not None)
        return block_sparse_prefill(*args, **kwargs)

    model = tiny_llama(heads=8, kv_heads=4, head_dim=64).to(DEV)
    pattern = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]])
    ids = torch.randint(1, 100, (2, 75), generator=torch.Generator().manual_seed(3)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    logits = {}
    for kernel in (False, True):
        cfg = LServeConfig(streaming_sparsity=sparsity, page_size=16, logical_page_size=4,
                           prefill_sink=4, prefill_local=20, prefill_chunk_size=29,
                           backend="torch", cuda_graphs=False)
        patch_model(model, cfg, pattern)
        if kernel:
            monkeypatch.setattr(ops, "_kernels_for", lambda cfg, x: kernels)
            monkeypatch.setattr(kernels, "block_sparse_prefill", counted)
        with torch.no_grad():
            logits[kernel] = model(ids, attention_mask=mask).logits.double()
        monkeypatch.undo()
    # every prefill call went through the chunk path's per-store launch
    assert calls and all(calls), calls
    assert rel_err(logits[True], logits[False]) < 1e-5


def test_prefill_unseen_queries_get_zeros():
    torch.manual_seed(5)
    # row 1's first 20 positions are padding: those queries see no key at all
    _, _, _, _, _, out, ref = _check_prefill(2, 2, 1, 40, 40, 64, [False], sink=4, local=8,
                                             kv_start=[0, 20])
    assert torch.equal(out[1, :, :20], torch.zeros_like(out[1, :, :20]))
    assert torch.equal(ref[1, :, :20], torch.zeros_like(ref[1, :, :20]))


def test_prefill_streaming_heads_skip_far_blocks():
    """NaN in the keys/values of blocks a streaming head never needs must not reach the output:
    those blocks are not loaded at all (a masked load would still spread NaN through p @ V)."""
    torch.manual_seed(6)
    B, Hq, Hkv, S, D, sink, local = 1, 2, 1, 192, 64, 16, 16
    bm, bn = 32, 16
    q = _randn(B, Hq, S, D, dtype=torch.float32)
    k = _randn(B, Hkv, S, D, dtype=torch.float32)
    v = _randn(B, Hkv, S, D, dtype=torch.float32)
    stream = torch.tensor([True], device=DEV)
    ref = R.prefill_attention(q.double(), k.double(), v.double(), stream, sink, local)
    # Keys in [sink, q_lo - local) for the last query block are never visible to it; poison keys
    # 32..95, which no query block from position 128 on may visit.
    kp, vp = k.clone(), v.clone()
    kp[:, :, 32:96] = float("nan")
    vp[:, :, 32:96] = float("nan")
    out = block_sparse_prefill(q[:, :, 128:], kp, vp, stream, sink, local, q_offset=128,
                               plan=PrefillPlan(bm, bn, 4, 1))
    assert not torch.isnan(out).any()
    assert rel_err(out, ref[:, :, 128:]) < 1e-5


@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_gpu_default_config(D):
    torch.manual_seed(7)
    _check_prefill(1, 8, 2, 1999, 2411, D, [True, False], sink=128, local=333, q_offset=412,
                   kv_start=[17], dtype=torch.bfloat16, plan=None)
    _check_prefill(2, 8, 8, 1500, 1500, D, [True, False] * 4, sink=64, local=700,
                   dtype=torch.float16, plan=None, sliding_window=1100)


# --------------------------------------------------------------------------- page summaries

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_page_summaries(dtype):
    torch.manual_seed(20)
    keys = _randn(3, 2, 96, 64, dtype=dtype)
    lengths = torch.tensor([0, 37, 96], device=DEV)
    kmax, kmin = build_page_summaries(keys, lengths, 16)
    rmax, rmin = R.page_summaries(keys, lengths, 16)
    assert torch.equal(kmax, rmax) and torch.equal(kmin, rmin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_page_summaries(dtype):
    torch.manual_seed(21)
    B, H, T, D, lp = 3, 2, 64, 128, 16
    keys = _randn(B, H, T, D, dtype=dtype)
    lengths = torch.tensor([0, 17, 40], device=DEV)
    kmax, kmin = R.page_summaries(keys, lengths, lp)
    new = _randn(B, H, D, dtype=dtype)
    pos = torch.tensor([0, 17, 40], device=DEV)
    rmax, rmin = kmax.clone(), kmin.clone()
    R.update_page_summaries(rmax, rmin, new, pos, lp)
    update_page_summaries(kmax, kmin, new, pos, lp)
    assert torch.equal(kmax, rmax) and torch.equal(kmin, rmin)
    # the update equals rebuilding with the token appended
    keys2 = keys.clone()
    keys2[torch.arange(B, device=DEV), :, pos] = new
    bmax, bmin = R.page_summaries(keys2, lengths + 1, lp)
    assert torch.equal(rmax, bmax) and torch.equal(rmin, bmin)
    # a position past the pages changes nothing
    before = kmax.clone()
    update_page_summaries(kmax, kmin, new, torch.tensor([T, T + 5, 10 * T], device=DEV), lp)
    assert torch.equal(kmax, before)


# ---------------------------------------------------------------------------- page selector

def _summaries(B, Hkv, T, D, lengths, lp, dtype, integer, repeat_pages=0, page_size=16):
    if integer:
        keys = torch.randint(-2, 3, (B, Hkv, T, D), device=DEV).to(dtype)
    else:
        keys = _randn(B, Hkv, T, D, dtype=dtype)
    if repeat_pages:  # pages r .. 3r - 1 repeat pages 0 .. r - 1: exact ties between pages
        pages = keys.view(B, Hkv, T // page_size, page_size, D)
        pages[:, :, repeat_pages:3 * repeat_pages] = pages[:, :, :repeat_pages].repeat(1, 1, 2, 1, 1)
    return R.page_summaries(keys, torch.tensor(lengths, device=DEV), lp)


@pytest.mark.parametrize("chunk,dtype", [(16, torch.float32), (512, torch.bfloat16)])
@pytest.mark.parametrize("partial", [False, True])
def test_select_pages_exact_with_ties(chunk, dtype, partial):
    """Integer-valued q and keys make every sum exact and ties frequent: the selection must equal
    the reference's stable sort element for element (last page first, ties to the lower page).
    Chunks of 16 keys: several top-k chunks and a merge round; 512 (the default): one round."""
    if partial and not hasattr(PS.tl, "topk"):
        pytest.skip("partial sorting needs Triton's tl.topk")
    plan = SelectPlan(chunk=chunk, partial_sort=partial)
    torch.manual_seed(30)
    # one KV head: each (row, query head) is a program of the same code (the interpreter runs them
    # one by one); several KV heads per row are the flagged-heads and random-float tests' own
    B, Hkv, G, D, T, ps, lp = 2, 1, 2, 64, 768, 16, 4
    lengths = [757, 161]
    kmax, kmin = _summaries(B, Hkv, T, D, lengths, lp, dtype, integer=True, repeat_pages=3)
    q = torch.randint(-1, 2, (B, Hkv, G, D), device=DEV).to(dtype)
    L = torch.tensor(lengths, device=DEV)
    for n_select in (1, 5, 12):
        got = PS.select_pages(q, kmax, kmin, L, ps, lp, n_select, plan=plan)
        ref = R.select_pages(q, kmax, kmin, L, ps, lp, n_select)
        assert got.dtype == torch.int64 and torch.equal(got, ref), n_select
    scores = R.page_scores(q, kmax, kmin, L, ps, lp)
    assert torch.equal(scores[..., :3], scores[..., 3:6]) and torch.equal(scores[..., :3], scores[..., 6:9])


def test_select_pages_runs_one_topk_variant_at_every_length(monkeypatch):
    """Contexts of one chunk of keys, of several (two rounds) and of more (three): the reference's
    selection each time, through launches that share every compile-time argument, so a longer
    prompt compiles nothing new."""
    plan = SelectPlan(chunk=16)
    real, variants, launches = PS._topk_kernel, set(), []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                variants.add(tuple(sorted((k, v) for k, v in kw.items() if k.isupper())))
                launches[-1] += 1
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(PS, "_topk_kernel", Recorder())
    B, Hkv, G, D, ps, lp = 1, 1, 2, 64, 16, 4
    for T, n in ((128, 100), (1024, 1001), (4096, 4003)):          # 7, 63 and 251 pages
        kmax, kmin = _summaries(B, Hkv, T, D, [n], lp, torch.float32, integer=False)
        q = _randn(B, Hkv, G, D, dtype=torch.float32)
        L = torch.tensor([n], device=DEV)
        launches.append(0)
        got = PS.select_pages(q, kmax, kmin, L, ps, lp, 2, plan=plan)
        assert torch.equal(got, R.select_pages(q, kmax, kmin, L, ps, lp, 2)), T
    assert launches == [1, 2, 3] and len(variants) == 1, (launches, variants)    # rounds: 1, 2, 3


@pytest.mark.parametrize("chunk", [16, 512])
def test_select_pages_only_for_the_flagged_query_heads(chunk):
    """need/out (the drift selector): flagged query heads get the reference's fresh selection,
    the others keep what out held; a KV head with no flagged query head is skipped entirely (its
    out rows are left as they were, whatever its scores would be)."""
    torch.manual_seed(36)
    B, Hkv, G, D, T, ps, lp = 2, 3, 4, 64, 768, 16, 4
    L = torch.tensor([757, 301], device=DEV)
    kmax, kmin = _summaries(B, Hkv, T, D, L.tolist(), lp, torch.float32, integer=True, repeat_pages=2)
    q = torch.randint(-2, 3, (B, Hkv, G, D), device=DEV).float()
    fresh = R.select_pages(q, kmax, kmin, L, ps, lp, 7)
    need = torch.rand(B, Hkv, G, device=DEV) < 0.5
    need[0, 1] = False
    need[1, 2] = True
    old = torch.randint(0, 40, (B, Hkv, G, 7), device=DEV)
    out = old.clone()
    got = PS.select_pages(q, kmax, kmin, L, ps, lp, 7, plan=SelectPlan(chunk=chunk), need=need, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.where(need.unsqueeze(-1), fresh, old))
    with pytest.raises(ValueError, match="out"):
        PS.select_pages(q, kmax, kmin, L, ps, lp, 7, need=need)


def test_select_pages_fewer_pages_than_slots_and_empty_row():
    torch.manual_seed(31)
    B, Hkv, G, D, T, ps, lp = 3, 1, 2, 64, 64, 16, 4
    lengths = [60, 5, 0]
    kmax, kmin = _summaries(B, Hkv, T, D, lengths, lp, torch.float32, integer=True)
    q = torch.randint(-2, 3, (B, Hkv, G, D), device=DEV).float()
    L = torch.tensor(lengths, device=DEV)
    got = PS.select_pages(q, kmax, kmin, L, ps, lp, 7)     # 4 pages in the pool, 7 slots
    ref = R.select_pages(q, kmax, kmin, L, ps, lp, 7)
    assert torch.equal(got, ref)
    assert torch.equal(got[..., 4:], torch.arange(4, 7, device=DEV).expand(B, Hkv, G, 3))


def test_select_pages_random_float():
    """Random floats: the kernel's scores match the reference's to rounding, and its ranking is
    exactly the reference's stable sort of those scores (whatever the summation order)."""
    plan = SelectPlan(chunk=32)
    torch.manual_seed(32)
    B, Hkv, G, D, T, ps, lp = 2, 2, 4, 128, 1024, 16, 4
    lengths = [1001, 333]
    kmax, kmin = _summaries(B, Hkv, T, D, lengths, lp, torch.float32, integer=False)
    q = _randn(B, Hkv, G, D, dtype=torch.float32)
    L = torch.tensor(lengths, device=DEV)
    scores = PS.page_scores(q, kmax, kmin, L, ps, lp, plan=plan)
    ref_scores = R.page_scores(q.double(), kmax.double(), kmin.double(), L, ps, lp)
    fin = torch.isfinite(ref_scores)
    assert torch.equal(fin, torch.isfinite(scores))
    assert torch.allclose(scores[fin].double(), ref_scores[fin], rtol=1e-5, atol=1e-4)
    got = PS.select_pages(q, kmax, kmin, L, ps, lp, 9, plan=plan)
    n_pages = (L + ps - 1) // ps
    last = torch.arange(scores.shape[-1], device=DEV).view(1, -1) == (n_pages - 1).view(-1, 1)
    ranked = torch.sort(scores.masked_fill(last.view(B, 1, 1, -1), float("inf")), dim=-1,
                        descending=True, stable=True).indices[..., :9]
    assert torch.equal(got, ranked)


@gpu
@pytest.mark.parametrize("pdl,partial", [(False, False), (True, False), ("late", False), ("late", True)])
def test_select_pages_gpu_long_context(pdl, partial):
    """128K context on the GPU, under each PDL mode and with partial sorting."""
    plan = SelectPlan(pdl=pdl, partial_sort=partial)
    torch.manual_seed(33)
    B, Hkv, G, D, ps, lp = 1, 8, 4, 128, 64, 16
    T = 128 * 1024
    lengths = [T - 37]
    kmax, kmin = _summaries(B, Hkv, T, D, lengths, lp, torch.bfloat16, integer=True)
    q = torch.randint(-2, 3, (B, Hkv, G, D), device=DEV).to(torch.bfloat16)
    L = torch.tensor(lengths, device=DEV)
    ref = R.select_pages(q, kmax, kmin, L, ps, lp, 64)
    assert torch.equal(PS.select_pages(q, kmax, kmin, L, ps, lp, 64, plan=plan), ref)


# ---------------------------------------------------------------------------------- decode

def _decode_inputs(B, Hs, Hr, G, D, sink, local, T, ps, K, lengths, dtype):
    L = torch.tensor(lengths, device=DEV)
    qs, qr = _randn(B, Hs, G, D, dtype=dtype), _randn(B, Hr, G, D, dtype=dtype)
    sk, sv = _randn(B, Hs, sink, D, dtype=dtype), _randn(B, Hs, sink, D, dtype=dtype)
    rk, rv = _randn(B, Hs, local, D, dtype=dtype), _randn(B, Hs, local, D, dtype=dtype)
    pk, pv = _randn(B, Hr, T, D, dtype=dtype), _randn(B, Hr, T, D, dtype=dtype)
    P = T // ps
    # distinct pages per head, some slots empty (-1) or past the pool (P, P + 1)
    pages = torch.stack([torch.randperm(P + 3)[:K] - 1 for _ in range(B * Hr * G)] or
                        [torch.zeros(0, K, dtype=torch.long)]).view(B, Hr, G, K).to(DEV)
    # tokens past a row's length (and pages nobody selected) may hold garbage: poison them
    tok = torch.arange(T, device=DEV).view(1, 1, T, 1)
    pk = torch.where(tok < L.view(B, 1, 1, 1), pk, float("nan")).to(dtype)
    pv = torch.where(tok < L.view(B, 1, 1, 1), pv, float("nan")).to(dtype)
    if Hr:
        hits = torch.zeros(B, Hr, P, dtype=torch.long, device=DEV)
        ok = (pages >= 0) & (pages < P)
        hits.scatter_add_(2, pages.clamp(0, P - 1).flatten(2), ok.flatten(2).long())
        unsel = (hits == 0).repeat_interleave(ps, dim=2).unsqueeze(-1)
        pk, pv = pk.masked_fill(unsel, float("nan")), pv.masked_fill(unsel, float("nan"))
    return L, qs, sk, sv, rk, rv, qr, pk, pv, pages


def _check_decode(B, Hs, Hr, G, D, sink, local, T, ps, K, lengths, dtype=torch.float32, **kw):
    L, qs, sk, sv, rk, rv, qr, pk, pv, pages = _decode_inputs(B, Hs, Hr, G, D, sink, local, T, ps,
                                                              K, lengths, dtype)
    scale = D ** -0.5
    out_s = torch.full_like(qs, float("nan"))
    out_r = torch.full_like(qr, float("nan"))
    got_s, got_r = sparse_paged_decode(qs, sk, sv, rk, rv, qr, pk, pv, pages, L, sink, local, ps,
                                       scale, out_stream=out_s, out_retr=out_r, **kw)
    assert got_s.data_ptr() == out_s.data_ptr() and got_r.data_ptr() == out_r.data_ptr()
    assert got_s.shape == (B, Hs, G, D) and got_r.shape == (B, Hr, G, D)
    if Hs:
        ref = R.streaming_decode(qs.double(), sk.double(), sv.double(), rk.double(), rv.double(), L,
                                 sink, local, scale)
        assert not torch.isnan(out_s).any()
        assert rel_err(out_s, ref) < _tol(dtype)
    if Hr:
        ref = R.paged_decode(qr.double(), pk.double(), pv.double(), pages, L, ps, scale)
        assert not torch.isnan(out_r).any()
        assert rel_err(out_r, ref) < _tol(dtype)


@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (8, 64)])
def test_decode_mixed_heads(G, D):
    torch.manual_seed(40 + G)
    # lengths cross page boundaries (partial last pages), one short row, ring wrapped in row 0
    _check_decode(2, 2, 2, G, D, sink=5, local=13, T=96, ps=16, K=4, lengths=[91, 9])


@pytest.mark.parametrize("n_split", [1, 3, None])
def test_decode_splits(n_split):
    torch.manual_seed(50)
    _check_decode(3, 1, 2, 2, 64, sink=4, local=24, T=128, ps=16, K=6, lengths=[128, 45, 17],
                  plan=DecodePlan(n_split=n_split))


def test_decode_only_retrieval_or_only_streaming():
    torch.manual_seed(51)
    split2 = DecodePlan(n_split=2)
    _check_decode(2, 0, 3, 4, 64, sink=4, local=8, T=80, ps=16, K=4, lengths=[70, 33], plan=split2)
    _check_decode(2, 3, 0, 4, 64, sink=4, local=8, T=80, ps=16, K=4, lengths=[70, 3], plan=split2)
    _check_decode(2, 2, 0, 2, 64, sink=0, local=8, T=80, ps=16, K=4, lengths=[70, 3])


def test_decode_bf16_odd_page():
    torch.manual_seed(52)
    # page of 24 tokens (not a power of two), bf16
    _check_decode(2, 2, 2, 2, 128, sink=6, local=10, T=96, ps=24, K=3, lengths=[95, 30],
                  dtype=torch.bfloat16)


@pytest.mark.parametrize("n_split", [1, 3, None])
def test_decode_bf16_gqa4_splits(n_split):
    """bf16 with a GQA group of 4: partial last pages, empty slots, poisoned tokens past the
    length and unselected pages, with one split (output written directly), three, or automatic."""
    torch.manual_seed(54)
    _check_decode(2, 2, 2, 4, 64, sink=5, local=21, T=160, ps=16, K=5, lengths=[157, 40],
                  dtype=torch.bfloat16, plan=DecodePlan(n_split=n_split))


def test_pdl_only_on_hopper_gpus(monkeypatch):
    """Programmatic dependent launch is asked for only on an sm90+ GPU and only when the plan's
    mode is on; the interpreter and older GPUs launch plainly."""
    from lserve_hf.kernels import launch
    assert launch.pdl_options(torch.device("cpu"), True) == {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert launch.pdl_options(torch.device("cuda", 0), True) == {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(launch, "_triton_has_pdl", lambda: True)
    assert launch.pdl_options(torch.device("cuda", 0), True) == {"launch_pdl": True}
    assert launch.pdl_options(torch.device("cuda", 0), False) == {}
    assert launch.gdc_mode({}, True) == 0
    assert launch.gdc_mode({"launch_pdl": True}, True) == 1
    assert launch.pdl_options(torch.device("cuda", 0), "late") == {"launch_pdl": True}
    assert launch.gdc_mode({"launch_pdl": True}, "late") == 2
    monkeypatch.setattr(launch, "_triton_has_pdl", lambda: False)
    assert launch.pdl_options(torch.device("cuda", 0), True) == {}


@pytest.mark.parametrize("make", [
    lambda: DecodePlan(pdl="Late"), lambda: SelectPlan(pdl="on"), lambda: SelectPlan(pdl=None),
    lambda: DecodePlan(n_split=0), lambda: DecodePlan(block_t=48), lambda: DecodePlan(block_t=8),
    lambda: DecodePlan(num_warps=3), lambda: DecodePlan(target_programs=0),
    lambda: SelectPlan(chunk=48), lambda: SelectPlan(score_dot_rows=0),
    lambda: SelectPlan(partial_sort="yes"), lambda: PrefillPlan(128, 48, 8, 3),
    lambda: PrefillPlan(8, 16, 4, 1), lambda: PrefillPlan(32, 16, 4, 0),
    lambda: PrefillPlan(32, 16, 4, 1, tma="auto")])
def test_invalid_plans_raise(make):
    with pytest.raises(ValueError, match="Plan"):
        make()


def test_plans_are_frozen_with_documented_defaults():
    from lserve_hf import kernels
    with pytest.raises(AttributeError):
        kernels.DEFAULT_DECODE_PLAN.n_split = 3
    # compared field by field: the modules may have been reloaded for the interpreter (above)
    assert astuple(kernels.DEFAULT_DECODE_PLAN) == astuple(DecodePlan()) and DecodePlan().pdl is True
    assert astuple(kernels.DEFAULT_SELECT_PLAN) == astuple(SelectPlan()) and SelectPlan().pdl == "late"
    assert astuple(default_prefill_plan(128, True)) == astuple(PrefillPlan(128, 128, 8, 3, tma=True))
    assert astuple(default_prefill_plan(128, False)) == astuple(PrefillPlan(128, 64, 8, 3, tma=False))
    with pytest.raises(ValueError, match="head dim 96"):
        default_prefill_plan(96, False)


def test_float64_inputs_raise_naming_the_reference():
    """The kernels compute on tensor cores in fp32 at most: each wrapper refuses float64 and names
    the torch reference that takes it."""
    f64 = dict(dtype=torch.float64, device=DEV)
    q = torch.randn(1, 1, 2, 64, **f64)
    kv = torch.randn(1, 1, 64, 64, **f64)
    L = torch.tensor([40], device=DEV)
    pages = torch.zeros(1, 1, 2, 1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="reference.paged_decode"):
        sparse_paged_decode(q, kv[:, :, :4], kv[:, :, :4], kv[:, :, :8], kv[:, :, :8], q, kv, kv, pages,
                            L, 4, 8, 64, 0.125)
    with pytest.raises(ValueError, match="reference.prefill_attention"):
        block_sparse_prefill(kv, kv, kv, torch.tensor([False], device=DEV), 4, 8)
    kmax, kmin = R.page_summaries(kv, L, 4)
    with pytest.raises(ValueError, match="reference.select_pages"):
        PS.select_pages(q, kmax, kmin, L, 16, 4, 2)
    with pytest.raises(ValueError, match="reference.select_pages"):
        PS.page_scores(q, kmax, kmin, L, 16, 4)
    with pytest.raises(ValueError, match="reference.page_summaries"):
        build_page_summaries(kv, L, 16)
    with pytest.raises(ValueError, match="reference.update_page_summaries"):
        update_page_summaries(kmax, kmin, q[:, :, 0], L, 4)


def test_select_pages_refuses_what_the_dot_scorer_cannot_take():
    """Three logical pages per physical page, or D < 16: a clear error naming the reference."""
    torch.manual_seed(34)
    L = torch.tensor([40], device=DEV)
    kmax, kmin = _summaries(1, 1, 48, 64, [40], 8, torch.float32, integer=True)
    q = _randn(1, 1, 2, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two number of logical pages.*reference.select_pages"):
        PS.select_pages(q, kmax, kmin, L, 24, 8, 2)
    kmax, kmin = _summaries(1, 1, 48, 8, [40], 4, torch.float32, integer=True)
    with pytest.raises(ValueError, match="head dim.*reference.select_pages"):
        PS.select_pages(_randn(1, 1, 2, 8, dtype=torch.float32), kmax, kmin, L, 16, 4, 2)


def test_serving_select_falls_back_to_the_reference(kernels_everywhere):
    """lserve_hf.ops.select_pages sends what the kernel refuses (float64, three logical pages per
    page) to reference.select_pages, and the rest to the kernel."""
    from lserve_hf import LServeConfig, kernels, ops

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return PS.select_pages(*args, **kwargs)

    kernels_everywhere.setattr(kernels, "select_pages", counted)
    torch.manual_seed(35)
    L = torch.tensor([90, 41], device=DEV)
    for page, lp, dtype, kernel in ((16, 4, torch.float32, True), (16, 4, torch.float64, False),
                                    (24, 8, torch.float32, False)):
        cfg = LServeConfig(page_size=page, logical_page_size=lp, token_budget=3 * page)
        kmax, kmin = _summaries(2, 2, 96, 64, L.tolist(), lp, dtype, integer=True, page_size=page)
        q = torch.randint(-2, 3, (2, 2, 2, 64), device=DEV).to(dtype)
        n = len(calls)
        got = ops.select_pages(q, kmax, kmin, L, cfg.pages_per_selection, cfg)
        assert torch.equal(got, R.select_pages(q, kmax, kmin, L, page, lp, cfg.pages_per_selection))
        assert (len(calls) > n) == kernel


@pytest.mark.parametrize("D, kernel", [(64, True), (96, False)])
def test_serving_drift_test_falls_back_to_the_reference(kernels_everywhere, D, kernel):
    """lserve_hf.ops.query_drift runs the kernel for a head dim it takes and the reference for
    one it does not (96: its halves are not a power of two), with the same flags and queries."""
    from lserve_hf import LServeConfig, kernels, ops

    calls = []
    kernels_everywhere.setattr(kernels, "query_drift", lambda *a, **k: calls.append(1) or PS.query_drift(*a, **k))
    torch.manual_seed(39)
    q = _randn(2, 2, 3, D, dtype=torch.float32)
    L = torch.tensor([500, 37], device=DEV)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, D, 2, device=DEV).float() / D))).contiguous()
    ref0 = torch.nn.functional.normalize(torch.randn(2, 2, 3, D, device=DEV), dim=-1)
    a, b = ref0.clone(), ref0.clone()
    got = ops.query_drift(q, a, L, inv_freq, 0.8, False, LServeConfig())
    want = R.query_drift(q, b, L, inv_freq, 0.8, False)
    assert torch.equal(got.bool(), want) and torch.allclose(a, b, atol=1e-5)
    assert bool(calls) == kernel


def test_float64_model_never_reaches_a_kernel(monkeypatch):
    """With the kernels switched on, a float64 model's chunked prefill and decode steps (page
    selection past the budget included) take the torch path, so no kernel raises and the logits
    are the torch backend's."""
    from conftest import tiny_llama
    from lserve_hf import LServeCache, LServeConfig, kernels, ops, patch_model

    model = tiny_llama(heads=8, kv_heads=4, head_dim=64).to(DEV).double()
    pattern = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]])
    ids = torch.randint(1, 100, (2, 76), generator=torch.Generator().manual_seed(4)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits = {}
    for kernel in (False, True):
        patch_model(model, LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4,
                                        token_budget=32, prefill_sink=4, prefill_local=20,
                                        prefill_chunk_size=29, decode_sink=4, decode_local=8,
                                        backend="torch", cuda_graphs=False), pattern)
        if kernel:
            monkeypatch.setattr(ops, "_kernels_for", lambda cfg, x: kernels)
        cache = LServeCache(model)
        with torch.no_grad():
            out = [model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache).logits]
            out.append(model(ids[:, -1:], attention_mask=mask, past_key_values=cache).logits)
        logits[kernel] = torch.cat(out, 1)
        monkeypatch.undo()
    assert logits[True].dtype == torch.float64
    assert torch.equal(logits[True], logits[False])


@gpu
@pytest.mark.parametrize("pdl", [False, True, "late"])
def test_decode_gpu_budget_shape(pdl):
    torch.manual_seed(53)
    plan = DecodePlan(pdl=pdl)
    _check_decode(2, 4, 4, 4, 128, sink=128, local=256, T=16384, ps=64, K=64,
                  lengths=[16384 - 5, 9000], dtype=torch.bfloat16, plan=plan)
    _check_decode(1, 4, 4, 8, 128, sink=128, local=256, T=16384, ps=64, K=64,
                  lengths=[7777], dtype=torch.float32, plan=plan)


@pytest.mark.parametrize("sparsity", [0.5, 0.0, 1.0])
def test_patched_decode_step_kernel_equals_torch_path(sparsity, monkeypatch):
    """The attention's decode step through the kernel (heads sorted by kind, one launch) equals
    the torch path on the same cache: left padding, a context past the budget."""
    import copy

    from conftest import tiny_llama
    from lserve_hf import LServeCache, LServeConfig, kernels, ops, patch_model
    from lserve_hf import attention as A
    from lserve_hf.step import Forward

    cfg = LServeConfig(streaming_sparsity=sparsity, page_size=16, logical_page_size=4, token_budget=32,
                       prefill_sink=4, prefill_local=24, decode_sink=4, decode_local=8, backend="torch")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = patch_model(tiny_llama(heads=8, kv_heads=4).to(dev), cfg,
                        torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]]))
    ids = torch.randint(1, 100, (2, 83), generator=torch.Generator().manual_seed(7)).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    cache = LServeCache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        model(ids[:, :1], attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1), past_key_values=cache)
    # the step as the cache's DecodeStep would begin it, a selecting one (lengths already count it)
    fwd = Forward("decode", 1, cache.step.seen - 1, cache.step.longest, selects=True)
    for layer in cache.layers:
        plan = layer.plan
        q = torch.randn(2, 8, 1, 16, generator=torch.Generator().manual_seed(plan.layer_idx)).to(dev)
        a, b = copy.deepcopy(layer), copy.deepcopy(layer)
        want, _ = A._decode(q, a, cache, fwd, plan, plan.config, 0.25, None)
        monkeypatch.setattr(ops, "_kernels_for", lambda cfg, x: kernels)
        got, _ = A._decode(q, b, cache, fwd, plan, plan.config, 0.25, None)
        monkeypatch.undo()
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        if plan.n_retrieval:
            assert torch.equal(a.selector.pages, b.selector.pages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_drift_matches_the_reference(dtype):
    """The drift test of the default selector: the flags and the kept queries of the kernel equal
    the reference's (queries either unchanged content, cosine 1, or unrelated, cosine ~0), also
    at a 128K position, where the RoPE angles reach 1.3e5 rad."""
    torch.manual_seed(37)
    B, Hkv, G, D = 3, 3, 4, 64
    q = _randn(B, Hkv, G, D, dtype=dtype)
    L = torch.tensor([1000, 37, 131072], device=DEV)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, D, 2, device=DEV).float() / D))).contiguous()
    pre = R.unrope(q, L - 1, inv_freq)
    pre = pre / pre.norm(dim=-1, keepdim=True)
    other = torch.randn(B, Hkv, G, D, device=DEV)
    keep = torch.rand(B, Hkv, G, device=DEV) < 0.5
    ref0 = torch.where(keep.unsqueeze(-1), pre, other / other.norm(dim=-1, keepdim=True)).contiguous()
    for refresh in (False, True):
        a, b = ref0.clone(), ref0.clone()
        want = R.query_drift(q, a, L, inv_freq, 0.8, refresh)
        got = PS.query_drift(q, b, L, inv_freq, 0.8, refresh)
        assert torch.equal(got.bool(), want)
        assert torch.equal(want, torch.ones_like(want) if refresh else ~keep)
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("Hs", [0, 2])
def test_decode_reads_the_newest_page_besides_the_list(Hs):
    """newest_page=True: each retrieval query head also reads its row's newest page unless the
    list holds it, as reference.with_newest_page says."""
    torch.manual_seed(38)
    B, Hr, G, D, T, ps, K = 2, 2, 2, 64, 160, 16, 4
    L, qs, sk, sv, rk, rv, qr, pk, pv, pages = _decode_inputs(B, Hs, Hr, G, D, 4, 8, T, ps, K, [150, 70],
                                                              torch.float32)
    pk = torch.randn_like(pk)                # every page readable: the newest one is not poisoned
    pv = torch.randn_like(pv)
    tok = torch.arange(T, device=DEV).view(1, 1, T, 1)
    pk = torch.where(tok < L.view(B, 1, 1, 1), pk, float("nan"))
    pv = torch.where(tok < L.view(B, 1, 1, 1), pv, float("nan"))
    pages[0, 0, 0, 1] = (150 - 1) // ps      # one head already lists its newest page
    out_r = torch.full_like(qr, float("nan"))
    sparse_paged_decode(qs, sk, sv, rk, rv, qr, pk, pv, pages, L, 4, 8, ps, D ** -0.5, out_retr=out_r,
                        newest_page=True)
    full = R.with_newest_page(pages, L, ps)
    ref = R.paged_decode(qr.double(), pk.double(), pv.double(), full, L, ps, D ** -0.5)
    assert not torch.isnan(out_r).any() and rel_err(out_r, ref) < 1e-5
