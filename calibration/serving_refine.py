"""Serving refine: re-rank the heads near the streaming threshold by what they cost *as served*.

The gate probes (``probe_gates.py``) measure each head against dense attention everywhere else:
their gates stream one head to sink + local while every retrieval head reads the whole context.
A patched model serves differently. At decode, retrieval heads read only the ``token_budget``
tokens of the pages their query selects. Streaming heads prefill through a ``prefill_local``
band and decode from a ``decode_local`` ring. With a small budget and small windows, the heads
that matter near the threshold are not the ones the probe ranks there. On the embedded SmolLM2
at budget 512, windows 256, the shipped ranking answers every test prompt at 30% streaming
heads and misses one at 40-50%.

Serving refine measures those heads with the real patched model and config:

1. Score of a streaming set = mean over prompts of ``log p(answer)`` as ``generate()`` would
   serve it. Patch with the set, prefill the prompt into a fresh ``LServeCache``, then feed the
   answer's tokens one at a time (teacher forcing). The prefill's last logits predict the first
   token; each later token is predicted by a decode step: page selection every
   ``selector_interval`` steps, streaming ring, budget.
2. Candidates: the heads ranked inside ``band`` (quantiles of the current scores' ranking, by
   default 25% to 60%). Base: the heads ranked below the band stream, the rest are retrieval.
3. Drop of a candidate = base score minus the score with that candidate streaming too.
4. The candidates keep their band of score values, reordered by drop: the smallest drop gets the
   lowest value and streams first (``rerank.py``, which the probe's ``refine`` shares with its
   gate-measured drops). Heads outside the band keep their scores.

Cost: ``n_prompts x (n_candidates + 1)`` served prefills plus the answer's decode steps. With
``resume`` (default) a candidate's prefill restarts at its own layer. It reuses the base run's
input to that layer and copies of the lower layers' caches. This is exact: the layers below run
the same plan on the same input. Embedded SmolLM2, 32 candidates x 5 prompts of 3K tokens: 19 min
on 2 shared CPU cores.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from lserve_hf.cache import LServeCache
from lserve_hf.config import LServeConfig
from lserve_hf.decoder import prompt_forward
from lserve_hf.heads import validate_scores
from lserve_hf.patch import patch_model, unpatch_model

from .prompts import ProbePrompt, passkey_probe_prompts
from .rerank import band_heads, quantile_band, reorder, threshold_band
from .resume import LayerInputs, decoder_parts, run_from

# The shipped pattern's calibration prompts: ~3K tokens, no chat template, like the passkey
# test's prompts but another seed and other depths.
DEFAULT_LENGTHS = (3000,)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_SEED = 1


def _split(p: ProbePrompt) -> tuple[torch.Tensor, list[int]]:
    """(prompt ids, answer ids) of a probe prompt whose input holds the answer but its last token."""
    if p.answer is None:
        raise ValueError("serving_refine needs prompts with an answer (ProbePrompt.answer).")
    answer = [int(a) for a in p.answer]
    ids = p.input_ids.reshape(-1)
    return ids[:ids.numel() - (len(answer) - 1)], answer


def _pattern(streaming: torch.Tensor, config: LServeConfig) -> tuple[torch.Tensor, LServeConfig]:
    """Scores and config whose global-quantile rule streams exactly the heads in ``streaming``."""
    n = int(streaming.sum())
    return (~streaming).float(), replace(config, streaming_sparsity=n / streaming.numel())


def _decode_answer(model, cache, first_logits, answer) -> float:
    """Sum of ``log p(answer)``: the first token from the prefill's logits, then one decode step per
    token, fed the answer (teacher forcing)."""
    logp = torch.log_softmax(first_logits.float(), dim=-1)
    total = float(logp[answer[0]])
    device = first_logits.device
    for prev, tgt in zip(answer[:-1], answer[1:]):
        out = model(input_ids=torch.tensor([[prev]], device=device), past_key_values=cache, use_cache=True)
        total += float(torch.log_softmax(out.logits[0, -1].float(), dim=-1)[tgt])
    return total


def _prefill(model, cache, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The prompt stored in ``cache`` as ``generate()`` would; returns the last position's logits."""
    ids = prompt_ids.reshape(1, -1).to(next(model.parameters()).device)
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


@torch.no_grad()
def served_logprob(model, prompt_ids: torch.Tensor, answer: Sequence[int]) -> float:
    """``log p(answer)`` as a patched model serves it: prefill with a fresh cache, then one decode
    step per answer token."""
    cache = LServeCache(model)
    return _decode_answer(model, cache, _prefill(model, cache, prompt_ids), list(answer))


def _copy_layer(layer, plan):
    """A copy of a cache layer, stores and all, under ``plan`` (equal to the layer's own, of
    another patch): the copy's decoding must leave the original as the prompt left it, and the
    copy must belong to the patch it serves under, so plan and config are not copied but
    swapped for that patch's."""
    return copy.deepcopy(layer, memo={id(layer.plan): plan, id(layer.plan.config): plan.config})


class _BaseRun:
    """The base streaming set's prefill of one prompt, kept for resuming at a later layer: each
    layer's cache right after the prefill, every layer's keyword arguments and the inputs of the
    layers that hold candidates. Runs under ``serving_refine``'s ``no_grad``."""

    def __init__(self, model, prompt_ids, answer, keep_layers):
        # nothing to resume (no candidate, or resume=False): no layer input is kept
        self.inputs = LayerInputs(decoder_parts(model) if keep_layers else None, keep_layers)
        cache = LServeCache(model)
        with self.inputs.recording():
            first = _prefill(model, cache, prompt_ids)
        # not resumable after a prefill in chunks, or for a model laid out unlike Llama
        self.resumable = self.inputs.complete
        self.layers = [_copy_layer(layer, layer.plan) for layer in cache.layers] if self.resumable else None
        self.logp = _decode_answer(model, cache, first, answer)

    def resumed_logprob(self, model, start: int, answer) -> float:
        """``served_logprob`` of a model patched like the base but for layers ``start`` and up:
        the layers below keep copies of the base's stores, the others prefill from the base's
        input to layer ``start``, as the patched decoder's one-pass prefill would."""
        cache = LServeCache(model)
        hidden = self.inputs.hidden[start]
        mask = self.inputs.kwargs[start]["lserve_mask"]
        with prompt_forward(cache, mask, hidden.shape[0], hidden.shape[1], hidden.device):
            for j in range(start):
                cache.layers[j] = _copy_layer(self.layers[j], cache.layers[j].plan)
            logits = run_from(decoder_parts(model), self.inputs, start, rows=1, cache=cache)
        return _decode_answer(model, cache, logits[0, -1], answer)


@torch.no_grad()
def serving_refine(model, tokenizer=None, scores=None, config: LServeConfig | None = None,
                   prompts: Sequence[ProbePrompt] | None = None, band: tuple[float, float] = (0.25, 0.6),
                   n_candidates: int | None = None, resume: bool = True, progress: bool = True):
    """Re-rank the heads near the threshold by the answer log-prob the served model loses.

    Args:
        model: a Llama, Mistral or Qwen2 causal LM; left unpatched on return.
        tokenizer: builds the default prompts (``passkey_probe_prompts`` at 3000 tokens, depths
            0.1/0.3/0.5/0.7/0.9, seed 1). Not needed when ``prompts`` is given.
        scores: the current pattern, ``[num_layers, num_kv_heads]`` in [0, 1] (higher = keep
            dense), e.g. ``load_pattern(...)`` of the shipped one.
        config: the serving config to measure under (budget, windows, page sizes, selector
            interval); its ``streaming_sparsity`` is overridden by each measured streaming set.
        prompts: ``ProbePrompt``s with ``answer`` set, input = prompt + answer but its last token
            (what ``passkey_probe_prompts`` builds). Use prompts other than the ones you test on.
        band: quantiles of the current ranking whose heads are candidates (default 25% to 60%,
            around a 50% threshold); heads ranked below stream in every measurement.
        n_candidates: instead of ``band``, the ``n`` heads nearest the ``config.streaming_sparsity``
            threshold, half below it and half above.
        resume: restart each candidate's prefill at its layer from the base run (exact, cheaper);
            False runs every measurement from the first layer.
        progress: tqdm bar over the measurements.

    Returns: ``(new_scores, details)``. ``new_scores``: float32 ``[num_layers, num_kv_heads]``,
    the candidates' values permuted within the band, every other head unchanged. ``details``:
    ``candidates`` (flat head indices, in rank order), ``drops`` (mean log-prob drop per
    candidate), ``base_logp`` ``[n_prompts]``, ``logp`` ``[n_candidates, n_prompts]``,
    ``n_base_streaming``, ``runtime_s``.
    """
    if scores is None:
        raise ValueError("serving_refine needs the current scores to refine (e.g. load_pattern(...)).")
    config = config or LServeConfig()
    scores = validate_scores(scores)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    if tuple(scores.shape) != (L, H):
        raise ValueError(f"scores have shape {tuple(scores.shape)} but the model has {L} layers x "
                         f"{H} KV heads.")
    if n_candidates is not None:
        ranks = threshold_band(scores, config.streaming_sparsity, n_candidates)
    else:
        ranks = quantile_band(scores, *band)
    # heads of dense layers never stream: measuring them would only spend streaming slots
    cand, base = band_heads(scores, ranks, config.dense_layers)
    if prompts is None:
        if tokenizer is None:
            raise ValueError("serving_refine needs a tokenizer to build passkey prompts, or prompts=.")
        prompts = passkey_probe_prompts(tokenizer, DEFAULT_LENGTHS, DEFAULT_DEPTHS, (DEFAULT_SEED,))
    if not prompts:
        raise ValueError("serving_refine got no prompts.")
    split = [_split(p) for p in prompts]

    def plan(streaming):
        s, cfg = _pattern(streaming.view(L, H), config)
        patch_model(model, cfg, head_pattern=s)

    t0 = time.perf_counter()
    logp = torch.zeros(len(cand), len(split), dtype=torch.float64)
    base_logp = torch.zeros(len(split), dtype=torch.float64)
    keep = set((cand // H).tolist())
    bar = tqdm(total=len(split) * (len(cand) + 1), desc="serving refine", disable=not progress)
    try:
        for i, (ids, answer) in enumerate(split):
            plan(base)
            run = _BaseRun(model, ids, answer, keep if resume else set())
            base_logp[i] = run.logp
            bar.update()
            for j, h in enumerate(cand.tolist()):
                s = base.clone()
                s[h] = True
                plan(s)
                if run.resumable:
                    logp[j, i] = run.resumed_logprob(model, h // H, answer)
                else:
                    logp[j, i] = served_logprob(model, ids, answer)
                bar.update()
            del run
    finally:
        bar.close()
        unpatch_model(model)
    drops = base_logp.mean() - logp.mean(1)
    details = {"candidates": cand, "drops": drops, "base_logp": base_logp, "logp": logp,
               "n_base_streaming": int(base.sum()), "runtime_s": time.perf_counter() - t0}
    return reorder(scores, cand, drops).clamp(0, 1).float(), details
