"""LServeCache bookkeeping on a tiny random model, checked against the keys the layers produced."""

import copy

import torch

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, patch_model
from lserve_hf import reference

CFG = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4, token_budget=32,
                   prefill_sink=4, prefill_local=8, decode_sink=4, decode_local=8, selector_interval=2)
PATTERN = torch.tensor([[0.9, 0.1], [0.2, 0.8]])   # one streaming head in each layer


def record_keys(cache):
    """Wrap each layer's update to keep every key it was given: the ground truth of the stores."""
    seen = [[] for _ in cache.layers]
    for i, layer in enumerate(cache.layers):
        orig = layer.update
        def update(k, v, *a, _orig=orig, _i=i, **kw):
            seen[_i].append(k.detach().clone())
            return _orig(k, v, *a, **kw)
        layer.update = update
    return seen


def run(model, ids, prefill, steps, cache):
    with torch.no_grad():
        model(ids[:, :prefill], past_key_values=cache)
        for t in range(prefill, prefill + steps):
            model(ids[:, t:t + 1], past_key_values=cache)


def test_stores_and_summaries_match_keys_after_page_crossing_appends():
    model = patch_model(tiny_llama(), CFG, PATTERN)
    ids = torch.randint(1, 100, (2, 60), generator=torch.Generator().manual_seed(0))
    cache = LServeCache(model)
    seen = record_keys(cache)
    run(model, ids, prefill=21, steps=39, cache=cache)   # 21 -> 60 tokens: crosses 3 page boundaries
    for layer, keys in zip(cache.layers, seen):
        keys = torch.cat(keys, dim=2)                        # [B, Hkv, 60, D]
        L = keys.shape[2]
        assert cache.get_seq_length() == L and cache.lengths.tolist() == [L, L]
        st, rt = layer.plan.stream_heads, layer.plan.retrieval_heads
        assert torch.equal(layer.pool.pool_k[:, :, :L], keys[:, rt])
        kmax, kmin = reference.page_summaries(layer.pool.pool_k, cache.lengths, CFG.logical_page_size)
        assert torch.equal(layer.pool.kmax, kmax) and torch.equal(layer.pool.kmin, kmin)
        assert torch.equal(layer.streaming.sink_k, keys[:, st, :CFG.decode_sink])
        for slot in range(CFG.decode_local):
            t = L - 1 - ((L - 1 - slot) % CFG.decode_local)
            assert torch.equal(layer.streaming.ring_k[:, :, slot], keys[:, st, t])


def test_streaming_memory_is_constant_and_retrieval_grows_by_pages():
    model = patch_model(tiny_llama(), CFG, PATTERN)
    ids = torch.randint(1, 100, (1, 230), generator=torch.Generator().manual_seed(1))
    cache = LServeCache(model)
    streaming_bytes, pool_bytes = set(), []
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        for t in range(30, 230):
            model(ids[:, t:t + 1], past_key_values=cache)
            streaming_bytes.add(sum(x.numel() * x.element_size() for l in cache.layers
                                    for x in (l.streaming.sink_k, l.streaming.sink_v, l.streaming.ring_k, l.streaming.ring_v)))
            pool_bytes.append(sum(l.pool.capacity for l in cache.layers))
    assert len(streaming_bytes) == 1
    assert all(n % CFG.page_size == 0 for n in pool_bytes)
    assert pool_bytes[-1] >= 2 * 230 and len(set(pool_bytes)) < 20    # grew in page-sized steps
    layer = cache.layers[0]
    assert layer.streaming.sink_k.shape[2] + layer.streaming.ring_k.shape[2] == CFG.decode_sink + CFG.decode_local
    dense_bytes = 2 * 2 * 230 * 16 * 4 * 2          # layers x KV heads x tokens x D x fp32 x (K, V)
    reserved = cache.kv_bytes(reserved=True)
    assert reserved == sum(l.kv_bytes(230, reserved=True) for l in cache.layers) < dense_bytes
    from lserve_hf import kv_bytes
    assert kv_bytes(cache) == cache.kv_bytes() <= reserved and kv_bytes(cache, reserved=True) == reserved


def test_reorder_and_select_rows():
    model = patch_model(tiny_llama(), CFG, PATTERN)
    ids = torch.randint(1, 100, (3, 40), generator=torch.Generator().manual_seed(2))
    cache = LServeCache(model)
    run(model, ids, prefill=33, steps=3, cache=cache)
    before = copy.deepcopy(cache)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for a, b in zip(cache.layers, before.layers):
        assert torch.equal(a.pool.pool_k[0], b.pool.pool_k[2]) and torch.equal(a.streaming.ring_v[1], b.streaming.ring_v[0])
        assert torch.equal(a.selector.pages[0], b.selector.pages[2])


def test_a_short_prompt_holds_no_more_kv_than_dense(embedded):
    """A 50-token chat prompt: the LServe cache stores at most what a dense cache does (its
    streaming buffers hold only the slots the prompt fills, no page summaries within the budget),
    and reserves little more."""
    from lserve_hf import kv_bytes, unpatch_model

    model, tok = embedded
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow, please."}],
                                   tokenize=False, add_generation_prompt=True)
    x = tok(text, return_tensors="pt", add_special_tokens=False)
    unpatch_model(model)
    try:
        with torch.no_grad():
            dense = model.generate(**x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
            patch_model(model)
            sparse = model.generate(**x, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    finally:
        unpatch_model(model)
    assert torch.equal(sparse.sequences, dense.sequences)
    d, s = kv_bytes(dense.past_key_values), kv_bytes(sparse.past_key_values)
    assert s <= d, (s, d)
    # reserved: whole 64-token pages, and sink and window slots both back the first tokens; but not
    # the full 128 + 256 slots of the window
    layer = sparse.past_key_values.layers[0]
    assert sum(layer.streaming.slots) <= 2 * 64 and kv_bytes(sparse.past_key_values, reserved=True) <= 2.5 * d


def test_a_decode_token_at_a_host_position_writes_what_the_scattered_write_does():
    """A CPU decode step of rows that all hold as many tokens writes its token at one host
    position (``at``): the sink, ring, undo log, pool and summaries end as the scattered
    write of the same token leaves them, across the sink's end, ring wrap-arounds and
    page boundaries."""
    from lserve_hf.pages import PagePool
    from lserve_hf.streaming import StreamingStore

    g = torch.Generator().manual_seed(5)
    B, H, D, T = 2, 3, 8, 41
    prompt_k, prompt_v = torch.randn(B, H, 2, D, generator=g), torch.randn(B, H, 2, D, generator=g)
    new = [(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)) for _ in range(T)]
    stores = []
    for host in (False, True):
        s = StreamingStore(sink=4, local=8)
        s.fill(prompt_k, prompt_v, torch.tensor([2, 2]), slots=T + 2)
        s.keep_undo(2)
        p = PagePool(CFG)
        p.allocate(prompt_k, H, T + 2)
        p.write(prompt_k, prompt_v, 0, 2)
        p.summarize(torch.tensor([2, 2]), longest=40)           # past the budget: summaries kept
        for i, (k, v) in enumerate(new):
            at = 2 + i
            pos = None if host else torch.full((B, 1), at)
            s.append(k, v, pos, past_sink=at >= 4, at=at if host else None)
            p.append(k, v, pos, at=at if host else None)
        stores.append({**s.tensors(), **p.tensors()})
    assert stores[0].keys() == stores[1].keys()
    for name in stores[0]:
        assert torch.equal(stores[0][name], stores[1][name]), name
    assert torch.isfinite(stores[1]["kmax"][:, :, :(T + 2) // 4]).all()      # every page summarised
