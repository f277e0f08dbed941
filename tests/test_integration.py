"""Everything a Transformers user does with a causal LM, on a patched model."""

import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, patch_model, unpatch_model
from lserve_hf.passkey import passkey_prompt

SMALL = dict(page_size=16, logical_page_size=4, token_budget=64, prefill_sink=8, prefill_local=64,
             decode_sink=8, decode_local=32)


@pytest.mark.parametrize("model_type, extra", [
    ("mistral", dict(sliding_window=24)),
    ("qwen2", dict(use_sliding_window=False)),
    ("llama", dict(attention_bias=True)),
])
def test_prefill_with_sparsity_zero_equals_unpatched(model_type, extra):
    model = tiny_llama(model_type=model_type, **extra)
    ids = torch.randint(1, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        patch_model(model, LServeConfig(streaming_sparsity=0))
        got = model(ids).logits
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_mistral_sliding_window_composes_with_decode():
    """Sparsity 0 within the budget: decoding past Mistral's window equals the unpatched model."""
    model = tiny_llama(model_type="mistral", sliding_window=24)
    ids = torch.randint(1, 100, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        patch_model(model, LServeConfig(streaming_sparsity=0))
        got = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.allclose(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5)


def test_beam_search_equals_unpatched_within_budget():
    model = tiny_llama()
    ids = torch.randint(1, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                           # left padding in row 1
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
        patch_model(model, LServeConfig(streaming_sparsity=0))
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(got, want)


def test_sampling_and_return_sequences_run_sparse():
    model = patch_model(tiny_llama(), LServeConfig(streaming_sparsity=0.5, **SMALL),
                        head_pattern=[[0.9, 0.1], [0.2, 0.8]])
    ids = torch.randint(1, 100, (2, 90), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=70, do_sample=True, top_k=20, top_p=0.9,
                             num_return_sequences=2, return_dict_in_generate=True)
    assert out.sequences.shape == (4, 160)
    assert isinstance(out.past_key_values, LServeCache)
    layer = out.past_key_values.layers[0]
    assert layer.selector.pages.shape[0] == 4 and out.past_key_values.lengths.tolist() == [159] * 4


def test_right_padding_forward_is_dense_and_generation_refuses_it_clearly():
    """A forward honours right padding (the dense logits); generation from such a cache needs
    left padding and says so."""
    model = tiny_llama()
    ids = torch.randint(1, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        patch_model(model, LServeConfig(streaming_sparsity=0))
        got = model(ids, attention_mask=mask).logits
        real = mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-5)
        with pytest.raises(ValueError, match="padding_side='left'"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_pipeline_batch_equals_single_prompts(embedded):
    """Left-padded batch through pipeline() gives each prompt's own greedy answer, with contexts
    past the budget and every head streaming, so the sparse paths and padding both run."""
    from transformers import pipeline

    model, tok = embedded
    unpatch_model(model)
    patch_model(model, LServeConfig(streaming_sparsity=0.5, **SMALL),
                head_pattern=torch.rand(30, 3, generator=torch.Generator().manual_seed(0)))
    try:
        prompts = [passkey_prompt(tok, n, 0.5, chat=False).text for n in (120, 260, 400)]
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        kw = dict(max_new_tokens=10, do_sample=False, return_full_text=False)
        single = [pipe(p, **kw)[0]["generated_text"] for p in prompts]
        batch = [o[0]["generated_text"] for o in pipe(prompts, batch_size=3, **kw)]
    finally:
        unpatch_model(model)
    assert batch == single
