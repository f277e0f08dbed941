"""Dynamic block-sparse prefill: the estimator's lists (lserve_hf.dynamic_prefill), the kernel
walking them against the torch reference, the reference against dense prefill, and a patched
model with every block kept against the model without the feature.

Kernels run in Triton's interpreter on CPU (small shapes, small blocks) and compiled with CUDA.
Inputs are random (seeded), never zeros; kernel outputs start as NaN so every element must be
written, and are compared with the reference on float64 copies."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from conftest import interpreted_kernels

CUDA = interpreted_kernels()

from conftest import tiny_llama  # noqa: E402
from lserve_hf import LServeConfig, patch_model  # noqa: E402
from lserve_hf import reference as R  # noqa: E402
from lserve_hf.dynamic_prefill import KeyBlocks, block_ranges, key_blocks, select_blocks  # noqa: E402

triton = pytest.importorskip("triton")
from lserve_hf.kernels.block_sparse_prefill import PrefillPlan, block_sparse_prefill  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SMALL = PrefillPlan(32, 16, 4, 1)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_blocks(B, Hkv, Sq, Skv, block, q_offset=0, kv_start=None, keep=0.4, forced=True, window=None, seed=0):
    """Random key-block lists: each causal block of a query block kept with probability ``keep``,
    with (``forced``) or without the sink and diagonal blocks."""
    g = torch.Generator().manual_seed(seed)
    lo, hi, diag = block_ranges(Sq, Skv, q_offset, kv_start, block, window)
    nq, nk = lo.shape[1], -(-Skv // block)
    mass = torch.rand(B, Hkv, nq, nk, generator=g)
    if forced:   # select_blocks keeps the forced blocks; a random density per list
        return select_blocks(mass, lo, hi, diag, 1 - 1e-9, keep, keep, block)
    j = torch.arange(nk).view(1, 1, 1, nk)
    causal = (j >= lo.view(-1, 1, nq, 1)) & (j <= hi.view(-1, 1, nq, 1))
    chosen = causal & (mass < keep)
    idx = torch.sort(torch.where(chosen, j, nk), -1).values
    return KeyBlocks(torch.where(idx < nk, idx, -1).int(), chosen.sum(-1).int(), block)


def _on(blocks):
    return KeyBlocks(blocks.index.to(DEV), blocks.count.to(DEV), blocks.block)


def check_listed(B, Hq, Hkv, Sq, Skv, D, streaming, sink, local, blocks, q_offset=0, kv_start=None,
                 window=None, dtype=torch.float32, plan=SMALL, tol=None):
    q = _randn(B, Hq, Sq, D, dtype=dtype)
    k, v = _randn(B, Hkv, Skv, D, dtype=dtype), _randn(B, Hkv, Skv, D, dtype=dtype)
    stream = torch.tensor(streaming, device=DEV)
    start = None if kv_start is None else torch.tensor(kv_start, device=DEV)
    blocks = _on(blocks)
    out = torch.full_like(q, float("nan"))
    block_sparse_prefill(q, k, v, stream, sink, local, q_offset, start, None, window, out=out, plan=plan,
                         blocks=blocks)
    assert not torch.isnan(out).any()
    ref = R.prefill_attention(q.double(), k.double(), v.double(), stream, sink, local, q_offset, start,
                              None, window, blocks=blocks)
    err = rel_err(out, ref)
    assert err < (tol or (1e-5 if dtype == torch.float32 else 2e-2)), err
    return q, k, v, stream, start, out, ref


# ------------------------------------------------------------------------------ kernel

@pytest.mark.parametrize("G,D,block", [(1, 64, 16), (4, 128, 32), (8, 64, 64)])
def test_kernel_random_lists_mixed_heads(G, D, block):
    """Streaming and dynamic heads in one launch, odd lengths, list blocks below, at and above the
    plan's key block (walked in 16-key steps)."""
    torch.manual_seed(G)
    Sq = Skv = 147
    blocks = random_blocks(1, 2, Sq, Skv, block, seed=G)
    check_listed(1, 2 * G, 2, Sq, Skv, D, [True, False], 5, 21, blocks)


@pytest.mark.parametrize("tma", [False, True])
def test_kernel_bf16_chunk_offset_and_left_padding(tma):
    """A query chunk at offset 61 into 190 keys, per-row left padding, lists without forced
    blocks (any valid lists are walked exactly), bf16; the TMA path too."""
    torch.manual_seed(3)
    B, Sq, Skv, q_offset = 2, 129, 190, 61
    start = [0, 37]
    blocks = random_blocks(B, 2, Sq, Skv, 32, q_offset, torch.tensor(start), keep=0.5, forced=False, seed=3)
    check_listed(B, 8, 2, Sq, Skv, 64, [False, True], 7, 19, blocks, q_offset, start,
                 dtype=torch.bfloat16, plan=replace(SMALL, tma=tma))


def test_kernel_sliding_window_and_q_heads_subset():
    """A Mistral window on top of the lists; q_heads computes only some query heads (a chunk's
    retrieval store), leaving the others as they were."""
    torch.manual_seed(4)
    B, S, T, D = 1, 70, 150, 64
    q = _randn(B, 8, S, D)
    k, v = _randn(B, 2, T, D), _randn(B, 2, T, D)
    q_heads = torch.tensor([6, 7, 2, 3], device=DEV)                 # the store holds KV heads 3 and 1
    stream = torch.tensor([False, False], device=DEV)
    blocks = _on(random_blocks(B, 2, S, T, 32, T - S, None, keep=0.6, window=50, seed=4))
    out = torch.full_like(q, float("nan"))
    block_sparse_prefill(q, k, v, stream, 0, 1, T - S, None, None, 50, out=out, plan=SMALL, q_heads=q_heads,
                         blocks=blocks)
    ref = R.prefill_attention(q[:, q_heads].double(), k.double(), v.double(), stream, 0, 1, T - S, None,
                              None, 50, blocks=blocks)
    assert rel_err(out[:, q_heads], ref) < 1e-5
    assert torch.isnan(out[:, [0, 1, 4, 5]]).all()


def test_kernel_sink_and_diagonal_only():
    """The sparsest lists the estimator makes (the sink and diagonal band alone)."""
    torch.manual_seed(5)
    S, D = 200, 64
    q, k = _randn(1, 4, S, D), _randn(1, 2, S, D)
    blocks = key_blocks(q, k, block=16, mass=1e-6, min_density=0.0)
    lo, hi, diag = block_ranges(S, S, 0, None, 16)
    forced = ((hi - diag + 1) + (diag > lo).long()).view(1, 1, -1).to(blocks.count.device)
    assert torch.equal(blocks.count.long(), forced.expand_as(blocks.count))
    check_listed(1, 4, 2, S, S, D, [False, True], 4, 16, blocks)


def test_kernel_full_lists_equal_dense_causal():
    torch.manual_seed(6)
    S, D = 111, 128
    q, k, v = _randn(2, 4, S, D), _randn(2, 2, S, D), _randn(2, 2, S, D)
    stream = torch.tensor([False, True], device=DEV)
    start = torch.tensor([0, 21], device=DEV)
    full = key_blocks(q, k, 0, start, block=32, mass=1.0)
    got = block_sparse_prefill(q, k, v, stream, 6, 30, 0, start, plan=SMALL, blocks=full)
    want = block_sparse_prefill(q, k, v, stream, 6, 30, 0, start, plan=SMALL)
    assert rel_err(got, want) < 1e-6
    assert torch.equal(got[1, :, :21], torch.zeros_like(got[1, :, :21]))   # padding queries see nothing


def test_kernel_skips_unlisted_blocks():
    """NaN in the keys and values of unlisted blocks must not reach the output: those blocks are
    not loaded at all (a masked load would still spread NaN through p @ V)."""
    torch.manual_seed(7)
    S, D, block = 160, 64, 32
    q, k, v = _randn(1, 2, S, D), _randn(1, 1, S, D), _randn(1, 1, S, D)
    stream = torch.tensor([False], device=DEV)
    blocks = random_blocks(1, 1, S, S, block, seed=7, keep=0.0)       # the sink and diagonal band only
    assert int(blocks.count[0, 0, -1]) == 3                            # blocks 0, 3, 4 for the last query block
    want = R.prefill_attention(q.double(), k.double(), v.double(), stream, 0, 1, blocks=_on(blocks))
    kp, vp = k.clone(), v.clone()
    kp[:, :, 32:64], vp[:, :, 32:64] = float("nan"), float("nan")       # block 1: listed for query block 1 only
    got = block_sparse_prefill(q[:, :, 96:], kp, vp, stream, 0, 1, 96, plan=SMALL,
                               blocks=KeyBlocks(*(t[:, :, 3:].to(DEV) for t in blocks[:2]), block))
    assert not torch.isnan(got).any() and rel_err(got, want[:, :, 96:]) < 1e-5


def test_kernel_refuses_lists_that_do_not_fit():
    q, k = _randn(1, 2, 40, 64), _randn(1, 1, 40, 64)
    stream = torch.tensor([False], device=DEV)
    good = _on(random_blocks(1, 1, 40, 40, 16))
    with pytest.raises(ValueError, match="n_query_blocks"):
        block_sparse_prefill(q, k, k, stream, 0, 1, blocks=KeyBlocks(good.index[:, :, 1:], good.count[:, :, 1:], 16))
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_prefill(q, k, k, stream, 0, 1, blocks=KeyBlocks(good.index, good.count, 24))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_gpu_default_plan(D):
    torch.manual_seed(8)
    B, Sq, Skv = 1, 1999, 2411
    blocks = random_blocks(B, 4, Sq, Skv, 128, Skv - Sq, torch.tensor([17]), keep=0.3)
    check_listed(B, 16, 4, Sq, Skv, D, [True, False, False, True], 128, 333, blocks, Skv - Sq, [17],
                 dtype=torch.bfloat16, plan=None)


# --------------------------------------------------------------------------- reference

@pytest.mark.parametrize("case", ["plain", "offset_start", "window"])
def test_reference_full_lists_equal_dense(case):
    torch.manual_seed(9)
    S, N, off, start, window = {"plain": (150, 150, 0, None, None),
                                "offset_start": (77, 201, 124, torch.tensor([3, 50]), None),
                                "window": (150, 150, 0, torch.tensor([0, 9]), 40)}[case]
    q = torch.randn(2, 8, S, 64, dtype=torch.float64)
    k, v = torch.randn(2, 2, N, 64, dtype=torch.float64), torch.randn(2, 2, N, 64, dtype=torch.float64)
    stream = torch.tensor([True, False])
    full = key_blocks(q, k, off, start, block=32, mass=1.0, window=window)
    dense = R.prefill_attention(q, k, v, stream, 5, 20, off, start, None, window)
    for query_block in (1024, 16):
        got = R.prefill_attention(q, k, v, stream, 5, 20, off, start, None, window, query_block, blocks=full)
        assert (got - dense).abs().max().item() < 1e-12


# --------------------------------------------------------------------------- estimator

def _prose_like(B, Hq, Hkv, S, N, D, seed):
    """Queries and keys with structure (a few shared directions), so the estimate is not flat."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, D, generator=g)
    q = torch.randn(B, Hq, S, 4, generator=g) @ basis * 2 + torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, N, 4, generator=g) @ basis * 2 + torch.randn(B, Hkv, N, D, generator=g)
    return q, k


@pytest.mark.parametrize("q_offset,start,window", [(0, None, None), (96, [0, 70], None), (40, [5, 0], 100)])
def test_estimator_invariants(q_offset, start, window):
    B, Hq, Hkv, S, block = 2, 8, 2, 200, 16
    N = S + q_offset
    q, k = _prose_like(B, Hq, Hkv, S, N, 64, seed=q_offset)
    start_t = None if start is None else torch.tensor(start)
    lo, hi, diag = block_ranges(S, N, q_offset, start_t, block, window)
    n_causal = (hi - lo + 1).clamp_min(0).view(-1, 1, lo.shape[1])
    counts = []
    for mass in (0.3, 0.6, 0.9, 0.99, 1.0):
        for lo_d, hi_d in ((0.05, 1.0), (0.3, 0.5)):
            kb = key_blocks(q, k, q_offset, start_t, mass=mass, min_density=lo_d, max_density=hi_d,
                            block=block, window=window)
            idx, cnt = kb.index.long(), kb.count.long()
            slot = torch.arange(idx.shape[-1]).view(1, 1, 1, -1)
            listed = slot < cnt.unsqueeze(-1)
            assert kb.index.dtype == torch.int32 == kb.count.dtype
            assert (idx[~listed] == -1).all()
            # ascending, distinct, within the causal range (hence after kv_start and the window)
            assert ((idx[..., 1:] > idx[..., :-1]) | ~listed[..., 1:]).all()
            inside = (idx >= lo.view(-1, 1, lo.shape[1], 1)) & (idx <= hi.view(-1, 1, lo.shape[1], 1))
            assert inside[listed].all()
            if start_t is not None:
                assert ((idx + 1) * block > start_t.view(-1, 1, 1, 1))[listed].all()
            # the sink and the diagonal band are always listed
            has = lambda j: ((idx == j.view(-1, 1, j.shape[1], 1)) & listed).any(-1)  # noqa: E731
            seen = n_causal.expand_as(cnt) > 0
            assert has(lo)[seen].all() and has(hi)[seen].all() and has(diag)[seen].all()
            # the density bounds hold wherever the forced blocks leave room
            forced = (hi - diag + 1 + (diag > lo).long()).clamp_min(0).view(-1, 1, lo.shape[1])
            k_min = torch.ceil(lo_d * n_causal - 1e-6)
            k_max = torch.floor(hi_d * n_causal + 1e-6).clamp_min(1)
            assert (cnt >= torch.minimum(k_min, n_causal)).all()
            assert (cnt <= torch.maximum(k_max, forced)).all()
            if mass == 1.0 and hi_d == 1.0:
                assert torch.equal(cnt, n_causal.expand_as(cnt).int().long())
            counts.append(((lo_d, hi_d), mass, cnt))
    for bounds in ((0.05, 1.0), (0.3, 0.5)):
        seq = [c for b, _, c in counts if b == bounds]
        assert all((b >= a).all() for a, b in zip(seq, seq[1:]))     # more mass never keeps fewer
    assert (counts[0][2] < n_causal).any()                           # and some block was dropped


def test_estimator_finds_the_heavy_block():
    """Keys of one far block aligned with every query: that block is kept at a low mass target."""
    torch.manual_seed(10)
    S, D, block = 256, 64, 16
    q, k = torch.randn(1, 2, S, D), torch.randn(1, 1, S, D)
    d = torch.randn(D)
    q += 4 * d / d.norm()
    k[:, :, 80:96] += 4 * d / d.norm()                               # key block 5
    kb = key_blocks(q, k, block=block, mass=0.5, min_density=0.0)
    idx, cnt = kb.index[0, 0], kb.count[0, 0]
    for i in range(8, S // block):
        assert 5 in idx[i, :cnt[i]].tolist()


# --------------------------------------------------------------------------- config and model

@pytest.mark.parametrize("kwargs, words", [
    (dict(prefill_dynamic=1), ["prefill_dynamic", "True or False"]),
    (dict(prefill_dynamic=True, prefill_chunk_size=1000), ["multiple of dynamic_block=128", "prefill_chunk_size=1024"]),
    (dict(dynamic_dense_tail=-1), ["dynamic_dense_tail"]),
    (dict(dynamic_mass=0.0), ["dynamic_mass", "(0, 1]"]),
    (dict(dynamic_mass=1.5), ["dynamic_mass"]),
    (dict(dynamic_min_density=0.5, dynamic_max_density=0.2), ["dynamic_min_density=0.5", "dynamic_max_density=0.2"]),
    (dict(dynamic_max_density=0.0), ["dynamic_max_density=0.0"]),
    (dict(dynamic_block=96), ["dynamic_block=96", "power of two"]),
    (dict(dynamic_block=8), ["dynamic_block=8"]),
    (dict(dynamic_block=64.0), ["dynamic_block", "integer"]),
])
def test_config_validates_dynamic_fields(kwargs, words):
    with pytest.raises((TypeError, ValueError)) as err:
        LServeConfig(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    c = LServeConfig()
    assert (c.prefill_dynamic, c.dynamic_mass, c.dynamic_min_density, c.dynamic_max_density,
            c.dynamic_block) == (False, 0.95, 0.05, 1.0, 128)


@pytest.mark.parametrize("chunk,kernel", [(None, False), (48, False), (None, True), (48, True)])
def test_patched_model_keeping_every_block_equals_without(chunk, kernel, monkeypatch):
    """prefill_dynamic with dynamic_mass=1.0 lists every causal block: the logits (through the
    torch path or the kernel) are those of the model without the feature on the torch path, in
    one pass and in 48-token chunks, with left padding; lists were made in every layer."""
    from lserve_hf import dynamic_prefill, kernels, ops

    model = tiny_llama(heads=8, kv_heads=4, head_dim=64).to(DEV)
    pattern = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]])
    ids = torch.randint(1, 100, (2, 75), generator=torch.Generator().manual_seed(3)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    made = []
    estimate = dynamic_prefill.prefill_blocks

    def spied(*args, **kwargs):
        made.append(estimate(*args, **kwargs))
        return made[-1]

    base = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4, prefill_sink=4,
                        prefill_local=20, prefill_chunk_size=chunk, backend="torch", cuda_graphs=False,
                        dynamic_block=16)
    logits = {}
    for dynamic in (False, True):
        patch_model(model, dataclasses.replace(base, prefill_dynamic=dynamic, dynamic_mass=1.0), pattern)
        if dynamic:
            monkeypatch.setattr("lserve_hf.attention.prefill_blocks", spied)
        if kernel and dynamic:   # the kernel walks the lists; the torch path without them is the reference
            monkeypatch.setattr(ops, "_kernels_for", lambda cfg, x: kernels)
        with torch.no_grad():
            logits[dynamic] = model(ids, attention_mask=mask).logits.double()
        monkeypatch.undo()
    real = mask.bool()
    assert rel_err(logits[True][real], logits[False][real]) < 1e-5
    lists = [b for b in made if b is not None]
    assert len(made) == (2 if chunk is None else 2 * 2)               # 2 layers (x 2 chunks)
    assert len(lists) == 2            # the first chunk's 48 keys are below MIN_KEY_BLOCKS blocks of 16
    assert all(int(b.count.max()) > 0 for b in lists)


def test_the_prompt_s_last_queries_keep_every_causal_block():
    """dense_tail: the query blocks holding the prompt's last positions list every causal key block
    (above dynamic_max_density), the others are as without it; a chunk before the prompt's end
    holds those rows only where the tail reaches into it, as in one pass."""
    B, Hq, Hkv, S, block = 2, 4, 2, 200, 16
    q, k = _prose_like(B, Hq, Hkv, S, S, 64, seed=11)
    start = torch.tensor([0, 9])
    lo, hi, _ = block_ranges(S, S, 0, start, block)
    n_causal = (hi - lo + 1).view(B, 1, -1)
    kw = dict(mass=0.5, min_density=0.0, max_density=0.2, block=block)
    plain = key_blocks(q, k, 0, start, **kw)
    tail = key_blocks(q, k, 0, start, dense_tail=40, **kw)
    rows = range((S - 40) // block, -(-S // block))          # blocks 10..12 hold positions 160..199
    for r in range(n_causal.shape[-1]):
        if r in rows:
            assert torch.equal(tail.count[..., r].long(), n_causal[..., r].expand(B, Hkv)), r
        else:
            assert torch.equal(tail.count[..., r], plain.count[..., r]), r
            n = int(plain.count[..., r].max())
            assert torch.equal(tail.index[..., r, :n], plain.index[..., r, :n]), r
    assert int(plain.count.max()) < int(n_causal.max())       # the estimate alone drops blocks there
    # the same rows from the chunk ending the prompt (104 queries from block 6 on), and the one before
    for a, b in ((96, 200), (0, 96)):
        part = key_blocks(q[:, :, a:b], k[:, :, :b], a, start, dense_tail=40, prompt_end=S, **kw)
        n = part.count.shape[-1]
        assert torch.equal(part.count, tail.count[..., a // block:a // block + n])


def test_queries_within_the_token_budget_keep_every_block():
    """dense_keys (the patched model passes its token budget): a query block whose queries each see
    at most that many keys lists every causal block, so a prompt within the budget is prefilled
    as without the estimate; later blocks are pruned as before."""
    B, Hq, Hkv, S, block = 1, 4, 2, 300, 16
    q, k = _prose_like(B, Hq, Hkv, S, S, 64, seed=12)
    lo, hi, _ = block_ranges(S, S, 0, None, block)
    n_causal = (hi - lo + 1).view(1, 1, -1)
    kw = dict(mass=0.5, min_density=0.0, block=block)
    plain = key_blocks(q, k, **kw)
    budget = key_blocks(q, k, dense_keys=100, **kw)
    within = (torch.arange(0, S, block) + block) <= 100           # blocks 0..5: queries see <= 96 keys
    assert torch.equal(budget.count[..., within].long(), n_causal[..., within].expand(B, Hkv, -1))
    assert torch.equal(budget.count[..., ~within], plain.count[..., ~within])
    assert (plain.count[..., within].long() < n_causal[..., within]).any()   # the estimate alone prunes there
    whole = key_blocks(q, k, dense_keys=S, **kw)                   # the whole prompt within the budget
    assert torch.equal(whole.count.long(), n_causal.expand(B, Hkv, -1))
