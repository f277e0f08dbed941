"""The decode step really runs sparse: it reads only the pages its selection names."""

import copy

import torch

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, patch_model

CFG = LServeConfig(streaming_sparsity=0.0, page_size=16, logical_page_size=4, token_budget=48,
                   selector="reuse", selector_interval=8)


def poison_unselected(cache, keep_selected=True):
    """NaN every page of every retrieval pool that the next step will not read (or, with
    keep_selected=False, one page it will read)."""
    for layer in cache.layers:
        B, Hr, T, D = layer.pool.pool_k.shape
        n_pages = T // CFG.page_size
        last = (cache.lengths - 1) // CFG.page_size
        # the next token lands in the newest page or opens the next one
        read = torch.zeros(B, Hr, n_pages, dtype=torch.bool)
        read.scatter_(2, layer.selector.pages.flatten(2).clamp(max=n_pages - 1), True)
        read[torch.arange(B), :, last] = True
        read[torch.arange(B), :, (cache.lengths // CFG.page_size).clamp(max=n_pages - 1)] = True
        if not keep_selected:
            read = ~read
            read[:, :, 0] = True   # poison only page 0, which was selected
            read = ~read
        mask = (~read).repeat_interleave(CFG.page_size, dim=2).unsqueeze(-1)
        layer.pool.pool_k.masked_fill_(mask, float("nan"))
        layer.pool.pool_v.masked_fill_(mask, float("nan"))


def test_decode_reads_only_selected_pages():
    model = patch_model(tiny_llama(), CFG, None)
    ids = torch.randint(1, 100, (2, 200), generator=torch.Generator().manual_seed(0))
    cache = LServeCache(model)
    with torch.no_grad():
        model(ids[:, :190], past_key_values=cache)
        model(ids[:, 190:191], past_key_values=cache)        # first decode step: selection made
        sel = cache.layers[0].selector.pages
        assert sel.shape[-1] == CFG.pages_per_selection == 3
        clean = copy.deepcopy(cache)
        poison_unselected(cache)
        for t in range(191, 195):                             # selection reused for these steps
            got = model(ids[:, t:t + 1], past_key_values=cache).logits
            want = model(ids[:, t:t + 1], past_key_values=clean).logits
            assert torch.isfinite(got).all()
            assert torch.equal(got, want)


def test_poisoning_a_selected_page_does_show():
    """The check above can fail: a NaN in a page that is read reaches the output."""
    model = patch_model(tiny_llama(), CFG, None)
    ids = torch.randint(1, 100, (1, 200), generator=torch.Generator().manual_seed(0))
    cache = LServeCache(model)
    with torch.no_grad():
        model(ids[:, :190], past_key_values=cache)
        model(ids[:, 190:191], past_key_values=cache)
        layer = cache.layers[0]
        p = int(layer.selector.pages[0, 0, 0, 1])                      # a selected page other than the last
        layer.pool.pool_k[0, 0, p * 16] = float("nan")
        assert not torch.isfinite(model(ids[:, 191:192], past_key_values=cache).logits).all()


def test_within_budget_is_dense():
    model = tiny_llama()
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        patch_model(model, CFG)                              # 40 + 6 tokens <= budget 48
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_drift_selector_chooses_afresh_only_for_drifted_query_heads():
    """A query head whose query (before RoPE) stays at cosine >= selector_drift keeps its pages;
    one that drifts gets the fresh selection of its current query; nothing else changes."""
    from lserve_hf import reference
    from lserve_hf.pages import PagePool
    from lserve_hf.selector import PageSelector

    cfg = LServeConfig(page_size=16, logical_page_size=4, token_budget=48, selector_drift=0.8)
    g = torch.Generator().manual_seed(1)
    B, Hr, G, D, T = 2, 2, 3, 16, 160
    pool = PagePool(cfg)
    keys = torch.randn(B, Hr, T, D, generator=g)
    pool.pool_k, pool.pool_v = keys, torch.randn(B, Hr, T, D, generator=g)
    lengths = torch.tensor([150, 131])
    pool.summarize(lengths, 150)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    sel = PageSelector(cfg, dense=False, rope_inv_freq=inv_freq)
    q0 = torch.randn(B, Hr, G, D, generator=g)
    first = sel.read_list(q0, pool, lengths, selects=True)
    before = sel.pages.clone()
    # one step later: the same content rotated to the next position, except one drifted head
    pre = reference.unrope(q0, lengths - 1, inv_freq)
    q1 = pre.clone()
    q1[1, 0, 2] = torch.randn(D, generator=g)
    angle = lengths.float().view(B, 1) * inv_freq.view(1, -1)           # position lengths (was - 1)
    angle = torch.cat([angle, angle], -1).view(B, 1, 1, D)
    rot = torch.cat([-q1[..., D // 2:], q1[..., :D // 2]], -1)
    q1 = q1 * angle.cos() + rot * angle.sin()                            # RoPE at the new position
    sel.read_list(q1, pool, lengths + 1, selects=False)
    fresh = reference.select_pages(q1, pool.kmax, pool.kmin, lengths + 1, 16, 4, cfg.pages_per_selection)
    changed = torch.zeros(B, Hr, G, dtype=torch.bool)
    changed[1, 0, 2] = True
    assert torch.equal(sel.pages[~changed], before[~changed])
    assert torch.equal(sel.pages[1, 0, 2], fresh[1, 0, 2])
    assert first.shape[-1] == cfg.pages_per_selection      # the newest page is added by the decode
