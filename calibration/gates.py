"""DuoAttention's gate training: learn which KV heads may stream.

One trainable gate ``alpha`` per (layer, KV head), starting at 1, mixes each layer's attention
output as ``alpha * full + (1 - alpha) * stream`` (``stream``: the softmax restricted to the first
``sink`` and the last ``local`` keys; ``calibration.gating``). The model's weights stay frozen. The
loss is the MSE between the final hidden states of the gated model and of the unchanged model at
the answer tokens of synthetic multi-passkey prompts, plus ``reg * mean(|alpha|)``: the
regulariser pushes every gate toward streaming, and only heads whose streaming hurts retrieval
keep a high alpha. The trained alphas are the head scores (``full_attention_heads.tsv``).

Compared with the one-shot gradient of ``probe_gates.py`` this optimises the gates jointly (a
head's score accounts for the others streaming) at the cost of ``steps`` forward + backward
passes.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .gating import Gate, applied, check_seen, gated

# passkey words: the NATO alphabet, as DuoAttention; distinct from the haystack's vocabulary so
# that an answer can only come from its needle
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu")

_HEAD = ("There is a long text below with special magic words hidden in it. Memorize them all; "
         "I will ask for them afterwards.\n\n")


@dataclass
class GateSample:
    """One teacher-forced training prompt. Positions are token indices into ``input_ids``.

    passkeys: ``(key, words)`` in the order the needles appear in the text.
    depths: each needle's relative depth in the haystack (0..1), as drawn.
    needle_spans / answer_spans: ``[start, end)`` of each needle / of each answer (the words
        only), aligned with ``passkeys``; the questions are asked in a shuffled order.
    answer_positions: every answer token's position, ascending (where the loss is taken).
    haystack_span: ``[start, end)`` of the haystack, needles included.
    """

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    passkeys: list[tuple[str, str]]
    depths: list[float]
    needle_spans: list[tuple[int, int]]
    answer_spans: list[tuple[int, int]]
    haystack_span: tuple[int, int]
    seed: int = 0
    question_order: list[int] = field(default_factory=list)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (BOS for Llama; none for SmolLM2)."""
    with_sp = list(tokenizer("a", add_special_tokens=True).input_ids)
    bare = _encode(tokenizer, "a")
    i = next((j for j in range(len(with_sp)) if with_sp[j:j + len(bare)] == bare), 0)
    return with_sp[:i]


def gate_training_sample(tokenizer, n_tokens: int, seed: int = 0, n_passkeys: int = 10,
                         haystack_text: str | None = None, n_words: int = 8) -> GateSample:
    """A prompt of exactly ``n_tokens`` tokens: haystack with ``n_passkeys`` needles
    "The special magic words for <key> are: w1 ... wn." at random depths (0.1..0.9, as
    DuoAttention), then for every key (shuffled) a question and its answer, teacher-forced.

    Deterministic in (``n_tokens``, ``seed``, ``n_passkeys``, ``haystack_text``, ``n_words``).
    The pieces are tokenized separately and concatenated so that every position is known
    exactly; the haystack is cut at a token to hit ``n_tokens``. Haystack: seeded synthetic prose
    (``lserve_hf.evaluation.tasks``' "essay"), or the sentences of ``haystack_text`` from a seeded
    starting point, repeated when short.
    """
    from lserve_hf.evaluation.tasks import haystack_sentences, needle_keys, split_sentences

    rng = random.Random(f"gates|{n_tokens}|{seed}|{n_passkeys}|{n_words}")
    keys = needle_keys(rng, n_passkeys)
    passkeys = [(k, " ".join(rng.choice(WORDS) for _ in range(n_words))) for k in keys]
    depths = sorted(rng.uniform(0.1, 0.9) for _ in keys)
    order = list(range(n_passkeys))
    rng.shuffle(order)

    head = _prefix_ids(tokenizer) + _encode(tokenizer, _HEAD)
    needles = [_encode(tokenizer, f" The special magic words for {k} are: {w}.") for k, w in passkeys]
    qa = []  # (question ids, answer ids) in asking order
    for i in order:
        k, w = passkeys[i]
        q = _encode(tokenizer, f"\n\nWhat are the special magic words for {k}? "
                               f"The special magic words for {k} are:")
        qa.append((i, q, _encode(tokenizer, " " + w)))
    fixed = len(head) + sum(map(len, needles)) + sum(len(q) + len(a) for _, q, a in qa)
    budget = n_tokens - fixed
    if budget < 8 * max(1, n_passkeys):
        raise ValueError(f"n_tokens={n_tokens} is too short for {n_passkeys} passkeys of {n_words} "
                         f"words with this tokenizer (needs at least {fixed + 8 * max(1, n_passkeys)}).")

    if haystack_text is None:
        sents = haystack_sentences("essay", seed=rng.randrange(2**31), n=max(64, budget // 8))
    else:
        base = split_sentences(haystack_text)
        if not base:
            raise ValueError("haystack_text holds no sentences.")
        start = rng.randrange(len(base))
        sents = [base[(start + i) % len(base)] for i in range(max(len(base), budget // 8))]
    # whole sentences until the budget is met; the last one is cut at a token
    hay: list[list[int]] = []
    total, i = 0, 0
    while total < budget:
        chunk = tokenizer([" " + s for s in sents[i:i + 64]], add_special_tokens=False).input_ids
        for ids in chunk:
            ids = list(ids)[:budget - total]
            hay.append(ids)
            total += len(ids)
            if total >= budget:
                break
        i = (i + 64) % len(sents)
    bounds = [0]
    for ids in hay:
        bounds.append(bounds[-1] + len(ids))
    # each needle at the sentence boundary nearest its depth (ties: the earlier boundary)
    at = [min(range(len(bounds)), key=lambda b: abs(bounds[b] - d * budget)) for d in depths]

    ids = list(head)
    needle_spans = []
    hay_start = len(ids)
    n = 0
    for b in range(len(hay) + 1):
        while n < len(at) and at[n] == b:
            needle_spans.append((len(ids), len(ids) + len(needles[n])))
            ids += needles[n]
            n += 1
        if b < len(hay):
            ids += hay[b]
    hay_end = len(ids)
    answer_spans = [None] * n_passkeys
    for i, q, a in qa:
        ids += q
        answer_spans[i] = (len(ids), len(ids) + len(a))
        ids += a
    assert len(ids) == n_tokens
    pos = sorted(p for s, e in answer_spans for p in range(s, e))
    return GateSample(input_ids=torch.tensor(ids, dtype=torch.long),
                      answer_positions=torch.tensor(pos, dtype=torch.long), passkeys=passkeys,
                      depths=depths, needle_spans=needle_spans, answer_spans=answer_spans,
                      haystack_span=(hay_start, hay_end), seed=seed, question_order=order)


def lr_factor(step: int, steps: int, warmup: float = 0.2, decay: float = 0.2) -> float:
    """Learning-rate multiplier: linear warm-up over the first ``warmup`` of the steps, constant,
    linear decay over the last ``decay`` (never 0 inside the run)."""
    w = max(1, round(warmup * steps)) if warmup > 0 else 0
    d = max(1, round(decay * steps)) if decay > 0 else 0
    f = 1.0
    if w:
        f = min(f, (step + 1) / w)
    if d:
        f = min(f, (steps - step) / d)
    return f


@contextmanager
def _checkpointing(model, enable: bool):
    """Activation checkpointing of the decoder layers for the duration (restored afterwards).

    Transformers checkpoints a layer only in training mode, so only the modules that carry the
    checkpointing flag are switched to training: their submodules (attention dropout, dropout
    layers) stay in eval mode. Non-reentrant checkpointing, because the gates reach the layers
    through a closure, not as inputs. A model that does not support checkpointing runs without."""
    if not enable or not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    was_on = any(m.gradient_checkpointing for m in flagged)
    had_hooks = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if not was_on:
        on({"use_reentrant": False})
    modes = [(m, m.training) for m in flagged]
    for m, _ in modes:
        m.training = True
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t
        if not was_on:
            off()
            if not had_hooks and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()  # enabling added it for adapters; we need none


def _hidden(model, ids):
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def gate_loss(model, sample: GateSample, alpha: torch.Tensor, sink: int, local: int,
              reg: float = 0.0, backward: bool = False):
    """``(loss, distill)`` for one sample, differentiable in ``alpha`` ``[num_layers,
    num_kv_heads]``; ``backward=True`` also runs the backward pass. The model must be under
    ``gating.gated`` (the gate attention).

    The backward pass runs here, with the gate still in force, because activation checkpointing
    recomputes the layers then and must see the same attention as the forward pass."""
    device = alpha.device
    ids = sample.input_ids.reshape(1, -1).to(device)
    pos = sample.answer_positions.to(device)
    with torch.no_grad():  # no gate on the stack: the unchanged model (alpha = 1 gives the same)
        reference = _hidden(model, ids)[0, pos].float()
    gate = Gate(alpha, sink, local, exact=True)
    with applied(gate):
        h = _hidden(model, ids)[0, pos].float()
        distill = (h - reference).pow(2).mean()
        loss = distill + reg * alpha.abs().mean()
        if backward:
            loss.backward()
    check_seen(gate, model.config.num_hidden_layers)
    return loss.detach(), distill.detach()


def train_gates(model, tokenizer, *, steps: int = 200, lengths: tuple[int, int] = (1000, 3000),
                sink: int = 128, local: int = 256, reg: float = 0.05, lr: float = 0.02,
                warmup: float = 0.2, decay: float = 0.2, n_passkeys: int = 10,
                haystack_file: str | None = None, seed: int = 0, gradient_checkpointing: bool = True,
                device=None, progress: bool = True, callback=None) -> torch.Tensor:
    """Train DuoAttention gates on synthetic multi-passkey prompts; returns the scores.

    Args:
        model: an unpatched Transformers causal LM; its weights are frozen for the run and its
            attention implementation, mode, ``requires_grad`` flags and checkpointing restored.
        tokenizer: the model's tokenizer (sizes and builds the prompts).
        steps: optimisation steps, one prompt each (DuoAttention: 2000 at batch 1).
        lengths: ``(min, max)`` prompt length in tokens, drawn uniformly per step. Should exceed
            ``sink + local`` by far, or streaming changes nothing and every gate goes to 0.
        sink, local: the streaming window the scores are about (LServe's decode window 128 / 256).
        reg: weight of ``mean(|alpha|)``; higher means more heads end low.
        lr, warmup, decay: AdamW learning rate and the fractions of steps of linear warm-up and
            linear decay.
        n_passkeys: needles per prompt (``gate_training_sample``).
        haystack_file: a text file to use as haystack instead of the synthetic prose.
        seed: seeds the prompt lengths and contents.
        gradient_checkpointing: recompute each layer in the backward pass (long prompts fit).
        device: run there (the model is moved with ``model.to``); None: where the model is.
        progress: tqdm bar with the loss and the mean alpha.
        callback: called as ``callback(step, info)`` after each step, ``info`` a dict with
            ``loss``, ``distill``, ``lr``, ``n_tokens``, ``seconds`` (forward + backward) and
            ``alpha`` (a CPU copy after clamping).

    Returns: float32 ``[num_layers, num_kv_heads]`` in [0, 1] (higher means keep the head dense),
    ready for ``save_pattern``.
    """
    if getattr(model, "_lserve", None) is not None:
        raise ValueError("train_gates needs the unpatched model: call unpatch_model(model) first.")
    lo, hi = (int(lengths), int(lengths)) if isinstance(lengths, int) else map(int, lengths)
    if not 0 < lo <= hi:
        raise ValueError(f"lengths={lengths} must be (min, max) with 0 < min <= max.")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    haystack = None
    if haystack_file:
        with open(haystack_file, encoding="utf-8", errors="replace") as f:
            haystack = f.read()
    cfg = model.config
    alpha = torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads, device=device, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, decay))
    rng = random.Random(seed)
    from tqdm.auto import tqdm

    with gated(model), _checkpointing(model, gradient_checkpointing), torch.enable_grad():
        bar = tqdm(range(steps), desc="training gates", disable=not progress)
        for step in bar:
            n = rng.randint(lo, hi)
            sample = gate_training_sample(tokenizer, n, seed=rng.randrange(2**31),
                                          n_passkeys=n_passkeys, haystack_text=haystack)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, distill = gate_loss(model, sample, alpha, sink, local, reg, backward=True)
            step_lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            a = alpha.detach().float().cpu()
            bar.set_postfix(loss=f"{float(loss):.4g}", alpha=f"{float(a.mean()):.3f}", len=n)
            if callback is not None:
                callback(step, {"loss": float(loss), "distill": float(distill), "lr": step_lr,
                                "n_tokens": n, "alpha": a, "seconds": time.perf_counter() - t0})
    return alpha.detach().float().cpu().clamp(0.0, 1.0)
