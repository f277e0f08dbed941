"""DuoAttention gate training (calibration/gates.py) on tiny random models, and its CLI."""

import json
import random

import pytest
import torch
from conftest import tiny_llama

from lserve_hf.calibration import gate_training_sample, train_gates
from lserve_hf.heads import load_pattern
from lserve_hf.calibration.gates import WORDS, gate_loss, lr_factor
from lserve_hf.calibration.gating import gated

SINK, LOCAL = 4, 16
LENGTHS = (300, 360)


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE trained here, offline (merges inside words, like real tokenizers)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lserve_hf.evaluation.tasks import haystack_sentences

    texts = haystack_sentences("essay", 0, n=300) + [" ".join(WORDS)] * 5 + [
        "There is a long text below with special magic words hidden in it.",
        "What are the special magic words for? The special magic words for are:"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1000, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _model(tok, seed):
    return tiny_llama(vocab=len(tok), seed=seed)


def _train(model, tok, **kw):
    hist = []
    kw = dict(dict(steps=12, lengths=LENGTHS, sink=SINK, local=LOCAL, n_passkeys=2, progress=False,
                   callback=lambda step, info: hist.append(info)), **kw)
    return train_gates(model, tok, **kw), hist


def test_training_lowers_the_loss_and_moves_gates(tok):
    seed = random.randrange(1000)
    model = _model(tok, seed)
    before = model.config._attn_implementation
    req = [p.requires_grad for p in model.parameters()]
    ref = model(input_ids=torch.arange(40)[None]).logits.detach()
    reg = 0.2
    scores, hist = _train(model, tok, steps=20, reg=reg, lr=0.05, seed=seed)
    assert scores.shape == (2, 2) and scores.dtype == torch.float32
    assert 0.0 <= float(scores.min()) and float(scores.max()) < 0.99   # every gate moved from 1
    assert len(hist) == 20
    # alpha = 1: the gated model is the model, so the first loss is the regulariser alone
    assert hist[0]["distill"] == pytest.approx(0.0, abs=1e-10) and hist[0]["loss"] == pytest.approx(reg)
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.95 * hist[0]["loss"]
    assert hist[-1]["distill"] > 0                                     # streaming costs something
    # held-out prompts: the trained gates beat alpha = 1 on the objective they were trained for
    samples = [gate_training_sample(tok, 330, seed=10_000 + seed + k, n_passkeys=2) for k in range(3)]
    with gated(model):
        trained = sum(float(gate_loss(model, s, scores, SINK, LOCAL, reg)[0]) for s in samples) / 3
    assert trained < 0.95 * reg
    # the model is handed back as it came
    assert model.config._attn_implementation == before
    assert [p.requires_grad for p in model.parameters()] == req
    assert not model.training and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model(input_ids=torch.arange(40)[None]).logits, ref)


def test_gradient_matches_finite_difference_inside_the_box(tok):
    """Away from alpha = 1 gradients must flow through both branches of every later layer, and
    through activation checkpointing's recomputation."""
    from lserve_hf.calibration.gates import _checkpointing

    seed = random.randrange(1000)
    model = _model(tok, seed)
    sample = gate_training_sample(tok, 320, seed=seed, n_passkeys=2)
    g = torch.Generator().manual_seed(seed)
    alpha = (0.2 + 0.6 * torch.rand(2, 2, generator=g)).requires_grad_(True)
    with gated(model), _checkpointing(model, True), torch.enable_grad():
        gate_loss(model, sample, alpha, SINK, LOCAL, backward=True)
        grad = alpha.grad.clone()
        eps = 1e-2
        for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            up, dn = alpha.detach().clone(), alpha.detach().clone()
            up[idx] += eps
            dn[idx] -= eps
            fd = (float(gate_loss(model, sample, up, SINK, LOCAL)[0])
                  - float(gate_loss(model, sample, dn, SINK, LOCAL)[0])) / (2 * eps)
            assert fd == pytest.approx(float(grad[idx]), rel=0.05, abs=1e-5)
    assert float(grad.abs().min()) > 0


def test_gates_of_heads_that_stream_for_free_shrink(tok):
    seed = random.randrange(1000)
    # a window covering every prompt: streaming is full attention, only the regulariser acts
    scores, hist = _train(_model(tok, seed), tok, local=1000, reg=0.05, lr=0.05, seed=seed)
    assert float(scores.max()) < 0.9
    assert max(h["distill"] for h in hist) < 1e-10
    assert hist[-1]["loss"] < hist[0]["loss"]
    # KV head 0 reads zero values in every layer (full == stream == 0 for it): it shrinks as
    # above while head 1, whose streaming changes the output, stays high
    model = _model(tok, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[:16] = 0   # head_dim 16: KV head 0's rows
    scores, _ = _train(model, tok, reg=0.02, lr=0.05, seed=seed)
    assert float(scores[:, 0].max()) < 0.9
    assert float(scores[:, 1].min()) > float(scores[:, 0].max()) + 0.2


def test_lr_schedule():
    f = [lr_factor(s, 10) for s in range(10)]
    assert f == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5])
    assert [lr_factor(s, 10, 0.0, 0.0) for s in range(10)] == [1.0] * 10


def test_sample_is_deterministic_and_positions_are_right(tok):
    seed = random.randrange(10**6)
    n = random.randrange(450, 700)
    a = gate_training_sample(tok, n, seed=seed, n_passkeys=3)
    b = gate_training_sample(tok, n, seed=seed, n_passkeys=3)
    c = gate_training_sample(tok, n, seed=seed + 1, n_passkeys=3)
    assert torch.equal(a.input_ids, b.input_ids) and a.passkeys == b.passkeys
    assert torch.equal(a.answer_positions, b.answer_positions)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.numel() == n
    ids = a.input_ids
    hay0, hay1 = a.haystack_span
    needle_tokens = 0
    for (key, words), (s, e), (qs, qe), depth in zip(a.passkeys, a.needle_spans, a.answer_spans, a.depths):
        assert len(words.split()) == 8 and set(words.split()) <= set(WORDS)
        # the needle sits where recorded, at its depth (a sentence boundary near it)
        assert tok.decode(ids[s:e]).strip() == f"The special magic words for {key} are: {words}."
        before = s - hay0 - needle_tokens
        assert abs(before / (hay1 - hay0 - sum(e2 - s2 for s2, e2 in a.needle_spans)) - depth) < 0.1
        needle_tokens += e - s
        # its answer: exactly the words, after the question about its key
        assert tok.decode(ids[qs:qe]).strip() == words
        assert tok.decode(ids[hay1:qs]).endswith(f"for {key} are:")
        assert qs >= hay1
    assert a.answer_positions.tolist() == sorted(p for s, e in a.answer_spans for p in range(s, e))
    assert hay0 < min(s for s, _ in a.needle_spans) and max(e for _, e in a.needle_spans) <= hay1
    with pytest.raises(ValueError):
        gate_training_sample(tok, 100, seed=seed, n_passkeys=3)


def test_sample_from_a_haystack_text(tok):
    text = "Cats sleep a lot. Dogs bark at night. Birds sing early. " * 3
    s = gate_training_sample(tok, 400, seed=random.randrange(1000), n_passkeys=2, haystack_text=text)
    hay = tok.decode(s.input_ids[s.haystack_span[0]:s.needle_spans[0][0]])
    assert any(w in hay for w in ("Cats", "Dogs", "Birds")) and "magic" not in hay


def test_cli_calibrate_duo(tok, tmp_path):
    from lserve_hf.cli import main

    layers, kv = 3, 2
    model_dir = tmp_path / "tiny"
    tiny_llama(layers=layers, kv_heads=kv, vocab=len(tok), seed=random.randrange(1000)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "pattern"
    rc = main(["calibrate", "--method", "duo", "--model", str(model_dir), "--output", str(out),
               "--steps", "3", "--lengths", *map(str, LENGTHS), "--passkeys", "2", "--sink", str(SINK),
               "--local", str(LOCAL), "--reg", "0.1", "--lr", "0.05", "--seed", "3", "--save-every", "2"])
    assert rc == 0
    scores = load_pattern(out)
    assert scores.shape == (layers, kv) and float(scores.max()) < 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "duo" and cfg["steps"] == 3 and cfg["lengths"] == list(LENGTHS)
    assert cfg["n_passkeys"] == 2 and cfg["sink"] == SINK and cfg["seed"] == 3 and cfg["seconds"] >= 0
    assert "steps_done" not in cfg            # the final file replaced the checkpoint of step 2
