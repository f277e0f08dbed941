"""The embedded SmolLM2-135M-Instruct, patched: exactness within the budget, passkey beyond it."""

import pytest
import torch

from lserve_hf import LServeConfig, patch_model, unpatch_model
from lserve_hf.passkey import answer_matches, passkey_prompt

DEPTHS = (0.25, 0.4, 0.5, 0.6, 0.75)


def generate(model, tok, text, n):
    x = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=n, do_sample=False)
    return out[0, x.input_ids.shape[1]:]


def test_page_selection_only_within_budget_is_exact(embedded):
    model, tok = embedded
    p = passkey_prompt(tok, 700, 0.5, chat=False)
    x = tok(p.text, return_tensors="pt", add_special_tokens=False)
    unpatch_model(model)
    with torch.no_grad():
        ref_logits = model(**x).logits
    ref = generate(model, tok, p.text, 32)
    patch_model(model, LServeConfig(streaming_sparsity=0))    # 700 + 32 tokens < budget 4096
    try:
        with torch.no_grad():
            logits = model(**x).logits
        got = generate(model, tok, p.text, 32)
    finally:
        unpatch_model(model)
    assert torch.equal(got, ref)
    err = (logits - ref_logits).norm() / ref_logits.norm()
    assert err < 1e-5, err


@pytest.mark.slow
def test_passkey_3k_page_selection_only_matches_dense(embedded):
    model, tok = embedded
    prompts = [passkey_prompt(tok, 3000, d, chat=False) for d in DEPTHS]
    unpatch_model(model)
    dense = [tok.decode(generate(model, tok, p.text, 8)) for p in prompts]
    cfg = LServeConfig(streaming_sparsity=0, token_budget=512)
    patch_model(model, cfg)
    try:
        sparse = [tok.decode(generate(model, tok, p.text, 8)) for p in prompts]
        assert model._lserve.plans[0].streaming.sum() == 0
    finally:
        unpatch_model(model)
    dense_ok = [answer_matches(a, p.passkey) for a, p in zip(dense, prompts)]
    sparse_ok = [answer_matches(a, p.passkey) for a, p in zip(sparse, prompts)]
    assert sum(dense_ok) >= 4, dense          # the probe is meaningful only where dense answers
    assert sparse_ok == dense_ok, (dense, sparse)
