import numpy as np
import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, patch_model, unpatch_model


def test_unsupported_model_type_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        patch_model(model, LServeConfig(streaming_sparsity=0))


def test_pattern_shape_mismatch_and_missing_pattern():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*2 layers x 2 KV heads"):
        patch_model(model, head_pattern=np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="calibrate"):
        patch_model(model)                                  # 50% streaming, no pattern known
    assert getattr(model, "_lserve", None) is None


def test_pattern_from_tsv_path(tmp_path):
    from lserve_hf.heads import save_pattern

    path = save_pattern(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), tmp_path)
    model = patch_model(tiny_llama(), LServeConfig(dense_layers=(1,)), head_pattern=path)
    assert model._lserve.streaming.tolist() == [[True, False], [False, False]]


def test_unpatch_restores_dense_output_exactly():
    model = tiny_llama()
    ids = torch.randint(1, 100, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        patch_model(model, LServeConfig(streaming_sparsity=1.0, prefill_sink=2, prefill_local=4))
        assert not torch.allclose(model(ids).logits, ref)   # streaming everywhere changes the output
        unpatch_model(model)
        assert torch.equal(model(ids).logits, ref)
    assert model.config._attn_implementation == "sdpa"


def test_forward_and_generate_use_a_fresh_lserve_cache_each_call():
    model = patch_model(tiny_llama(), LServeConfig(streaming_sparsity=0))
    ids = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        assert isinstance(out.past_key_values, LServeCache)
        g1 = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        g2 = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(g1.past_key_values, LServeCache) and g1.past_key_values is not g2.past_key_values
    assert g1.past_key_values.get_seq_length() == 15 and torch.equal(g1.sequences, g2.sequences)


def test_user_cache_is_honoured():
    model = patch_model(tiny_llama(), LServeConfig(streaming_sparsity=0))
    ids = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    mine = LServeCache(model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=mine,
                             return_dict_in_generate=True)
    assert out.past_key_values is mine and mine.get_seq_length() == 14


def test_continuing_from_returned_cache_matches_one_call():
    """A multi-token chunk appended to a cache (extend) equals feeding the tokens one by one."""
    cfg = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4, token_budget=512,
                       prefill_sink=4, prefill_local=8, decode_sink=4, decode_local=8)
    model = patch_model(tiny_llama(), cfg, head_pattern=[[0.9, 0.1], [0.2, 0.8]])
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = LServeCache(model)
        model(ids[:, :25], past_key_values=a)
        chunk = model(ids[:, 25:40], past_key_values=a).logits
        b = LServeCache(model)
        model(ids[:, :25], past_key_values=b)
        steps = torch.cat([model(ids[:, t:t + 1], past_key_values=b).logits for t in range(25, 40)], 1)
    assert torch.allclose(chunk, steps, atol=1e-5)


def test_packaging_layout():
    import importlib.metadata

    import lserve_hf.calibration
    import lserve_hf.kernels

    # kernels/ and calibration/ live under lserve_hf; a top-level `kernels` would shadow the
    # hub-kernels package that transformers imports
    assert lserve_hf.kernels.__name__ == "lserve_hf.kernels"
    assert lserve_hf.calibration.__name__ == "lserve_hf.calibration"
    tops = {top for top, dists in importlib.metadata.packages_distributions().items() if "lserve-hf" in dists}
    assert tops == {"lserve_hf"}


def test_dense_layers_decode_every_page():
    """A dense layer reads every page at decode, whatever the budget: with every layer dense, a
    budget far below the context still gives the dense model's logits, step after step; the same
    budget without dense layers selects pages and changes them (so the check can fail)."""
    model = tiny_llama(layers=2)
    ids = torch.randint(1, 100, (1, 300), generator=torch.Generator().manual_seed(5))
    small = dict(streaming_sparsity=0, token_budget=64, selector="reuse", selector_interval=1)

    def logits(config):
        if config is not None:
            patch_model(model, config)
        try:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            return torch.stack(out.logits)
        finally:
            unpatch_model(model)

    ref = logits(None)
    torch.testing.assert_close(logits(LServeConfig(dense_layers=(0, 1), **small)), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(LServeConfig(**small)), ref, rtol=1e-4, atol=1e-4)
