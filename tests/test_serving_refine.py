"""Serving refine (calibration/serving_refine.py) on a tiny random Llama with page selection on."""

from dataclasses import replace

import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeConfig, patch_model, unpatch_model
from lserve_hf.calibration import ProbePrompt, served_logprob, serving_refine

# 96-token prompts against a 32-token budget: decode steps select pages; windows of 16 tokens
CFG = LServeConfig(streaming_sparsity=0.5, prefill_sink=4, prefill_local=16, decode_sink=4, decode_local=16,
                   page_size=8, logical_page_size=4, token_budget=32, selector_interval=2, backend="torch")
L, H = 3, 4


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return tiny_llama(layers=L, heads=8, kv_heads=H, seed=3)


def _prompts(n=2, length=96, n_answer=4):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 101, (length + n_answer - 1,), generator=g)
        answer = torch.randint(1, 101, (n_answer,), generator=g)
        ids[length:] = answer[:-1]                  # prompt, then the answer but its last token
        out.append(ProbePrompt(ids, n_query=n_answer, answer=answer.tolist()))
    return out


def _independent_logp(model, prompts, streaming):
    """Mean log p(answer): the patched model's own cache, one forward per answer token."""
    n = int(streaming.sum())
    # any scores that put exactly these heads lowest, with a rank order unlike the refine's 0/1
    scores = torch.where(streaming, 0.1, 0.9) + torch.linspace(0, 0.05, L * H).view(L, H)
    patch_model(model, replace(CFG, streaming_sparsity=n / (L * H)), head_pattern=scores)
    assert torch.equal(model._lserve.streaming, streaming)
    total = 0.0
    try:
        with torch.no_grad():
            for p in prompts:
                a = p.answer
                ids = p.input_ids[: p.input_ids.numel() - len(a) + 1][None]
                out = model(ids, use_cache=True)
                for k, tgt in enumerate(a):
                    total += float(torch.log_softmax(out.logits[0, -1], -1)[tgt])
                    if k + 1 < len(a):
                        out = model(torch.tensor([[tgt]]), past_key_values=out.past_key_values,
                                    use_cache=True)
    finally:
        unpatch_model(model)
    return total / len(prompts)


def test_drops_are_the_served_log_prob_drops_and_scores_permute_the_band(tiny):
    scores = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    prompts = _prompts()
    new, det = serving_refine(tiny, scores=scores, config=CFG, prompts=prompts, band=(0.25, 0.75),
                              progress=False)
    assert getattr(tiny, "_lserve", None) is None
    order = torch.argsort(scores.flatten(), stable=True)
    cand = det["candidates"]
    assert cand.tolist() == order[3:9].tolist() and det["n_base_streaming"] == 3
    assert det["drops"].abs().max() > 1e-3                       # the candidates do matter here

    base = torch.zeros(L * H, dtype=torch.bool)
    base[order[:3]] = True
    ref_base = _independent_logp(tiny, prompts, base.view(L, H))
    assert float(det["base_logp"].mean()) == pytest.approx(ref_base, abs=1e-4)
    for j in (0, len(cand) - 1):
        s = base.clone()
        s[cand[j]] = True
        drop = ref_base - _independent_logp(tiny, prompts, s.view(L, H))
        assert float(det["drops"][j]) == pytest.approx(drop, abs=1e-4)

    flat, nflat = scores.flatten(), new.flatten()
    outside = torch.ones(L * H, dtype=torch.bool)
    outside[cand] = False
    assert torch.equal(nflat[outside], flat[outside])
    assert torch.equal(nflat[cand].sort().values, flat[cand].sort().values)
    # the smallest drop takes the lowest value of the band, the largest the highest
    assert nflat[cand[det["drops"].argmin()]] == flat[cand].min()
    assert nflat[cand[det["drops"].argmax()]] == flat[cand].max()


def test_resume_equals_full_prefill(tiny):
    scores = torch.rand(L, H, generator=torch.Generator().manual_seed(1))
    kw = dict(scores=scores, config=CFG, prompts=_prompts(n=1), n_candidates=4, progress=False)
    a, da = serving_refine(tiny, resume=True, **kw)
    b, db = serving_refine(tiny, resume=False, **kw)
    assert da["candidates"].tolist() == db["candidates"].tolist() and len(da["candidates"]) == 4
    torch.testing.assert_close(da["logp"], db["logp"], rtol=0, atol=1e-5)
    assert torch.equal(a, b)


def test_served_logprob_is_what_generate_scores(tiny):
    p = _prompts(n=1)[0]
    ids = p.input_ids[: p.input_ids.numel() - 3][None]
    patch_model(tiny, CFG, head_pattern=torch.rand(L, H, generator=torch.Generator().manual_seed(2)))
    try:
        with torch.no_grad():
            g = tiny.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
        gen = g.sequences[0, ids.shape[1]:].tolist()
        want = sum(float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(g.scores, gen))
        assert served_logprob(tiny, ids[0], gen) == pytest.approx(want, abs=1e-4)
    finally:
        unpatch_model(tiny)
