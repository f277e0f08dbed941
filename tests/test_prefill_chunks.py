"""Chunked prefill and preallocated page pools (CPU, torch path): the same results as one pass
and as a growing cache."""

import dataclasses

import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, patch_model

CFG = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4, token_budget=32,
                   prefill_sink=4, prefill_local=24, decode_sink=4, decode_local=8, selector_interval=2,
                   prefill_chunk_size=None)
PATTERN = torch.tensor([[0.9, 0.1], [0.2, 0.8]])   # one streaming head in each layer


def _prefill(model, ids, mask, chunk):
    patch_model(model, dataclasses.replace(CFG, prefill_chunk_size=chunk), PATTERN)
    cache = LServeCache(model)
    announced = []
    begin = cache.step.announce_prompt
    cache.step.announce_prompt = lambda total: (announced.append(total), begin(total))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
    assert announced == ([ids.shape[1]] if chunk else [])      # the chunked path ran, or did not
    return logits, cache


@pytest.mark.parametrize("chunk", [32, 37])
def test_chunked_prefill_equals_one_pass_with_left_padding(chunk):
    model = tiny_llama()
    ids = torch.randint(1, 100, (2, 150), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :45] = 0                                  # row 1's first chunk is all padding
    want, ref = _prefill(model, ids, mask, None)
    got, cache = _prefill(model, ids, mask, chunk)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5), (got[real] - want[real]).abs().max()
    assert cache.step.stored and ref.step.stored and cache.step.seen == ref.step.seen
    assert torch.equal(cache.lengths, ref.lengths) and cache.step.longest == ref.step.longest
    for a, b in zip(cache.layers, ref.layers):
        assert a.prompt_k is None and b.prompt_k is None
        for store, name in [("pool", n) for n in ("pool_k", "pool_v", "kmax", "kmin")] + \
                [("streaming", n) for n in ("sink_k", "sink_v", "ring_k", "ring_v")]:
            x, y = getattr(getattr(a, store), name), getattr(getattr(b, store), name)
            assert torch.allclose(x, y, atol=1e-6), name
    # and decoding goes on from the chunked cache as from the one-pass one
    step = torch.randint(1, 100, (2, 1), generator=torch.Generator().manual_seed(4))
    mask2 = torch.cat([mask, torch.ones_like(step)], 1)
    with torch.no_grad():
        a = model(step, attention_mask=mask2, past_key_values=cache).logits
        patch_model(model, CFG, PATTERN)
        b = model(step, attention_mask=mask2, past_key_values=ref).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_chunked_prefill_streaming_window_spans_chunks():
    """A streaming head's local window reaches back into earlier chunks: with a window wider than
    the chunk, dropping the earlier chunks' keys would change the result."""
    model = tiny_llama()
    ids = torch.randint(1, 100, (1, 96), generator=torch.Generator().manual_seed(5))
    want, _ = _prefill(model, ids, None, None)
    got, _ = _prefill(model, ids, None, 16)          # chunk 16 < prefill_local 24
    assert torch.allclose(got, want, atol=1e-5)
    narrow = dataclasses.replace(CFG, prefill_local=8)
    patch_model(model, narrow, PATTERN)
    with torch.no_grad():
        other = model(ids).logits
    assert not torch.allclose(other, want, atol=1e-3)   # the window matters in this setting


def test_generate_sizes_the_pools_once_and_equals_a_growing_cache():
    model = patch_model(tiny_llama(), CFG, PATTERN)
    ids = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=45, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        sized = model.generate(ids, **kw)
        growing = model.generate(ids, past_key_values=LServeCache(model), **kw)
    assert torch.equal(sized.sequences, growing.sequences)
    assert torch.equal(torch.stack(sized.logits), torch.stack(growing.logits))
    for a, b in zip(sized.past_key_values.layers, growing.past_key_values.layers):
        assert a.pool.pool_k.shape[2] >= 40 + 45 and a.epoch == 1      # allocated once, at prefill
        assert b.epoch > 1                                         # grew while decoding
        L = int(sized.past_key_values.lengths.max())
        assert torch.equal(a.pool.pool_k[:, :, :L], b.pool.pool_k[:, :, :L])
        assert torch.equal(a.pool.kmax[:, :, :L // 4], b.pool.kmax[:, :, :L // 4])
        before = b.epoch
        b.reset()
        assert b.epoch > before and b.pool.pool_k is None        # a reset never repeats an epoch


def test_chunked_prefill_equals_one_pass_on_the_embedded_model(embedded):
    from lserve_hf import unpatch_model
    from lserve_hf.passkey import passkey_prompt

    model, tok = embedded
    x = tok(passkey_prompt(tok, 1200, 0.4, seed=2, chat=False).text, return_tensors="pt",
            add_special_tokens=False)
    runs = []
    for chunk in (None, 300):
        cfg = LServeConfig(streaming_sparsity=0.5, prefill_local=256, decode_local=256, token_budget=512,
                           prefill_chunk_size=chunk)
        patch_model(model, cfg)
        try:
            with torch.no_grad():
                out = model.generate(**x, max_new_tokens=8, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
        finally:
            unpatch_model(model)
        runs.append(out)
    (one, chunked) = runs
    assert torch.equal(chunked.sequences, one.sequences)
    a, b = torch.stack(chunked.logits), torch.stack(one.logits)
    assert ((a - b).norm() / b.norm()) < 1e-5
