"""Training-free head probe: which KV heads retrieve from outside the sink + local window.

DuoAttention learns its head scores with gates trained on synthetic passkey data. This probe gets a
usable pattern in a minute of CPU instead, from one pass (or a few) of the unpatched model over
synthetic passkey prompts at several lengths, depths and seeds, the answer appended
(``prompts.py``). Two mechanisms give the signal per KV head:

- the attention weights at the rows that predict the answer (``probe_attention.py``: metrics
  "mass", "far", "needle", "deviation");
- DuoAttention's gates between full and streaming attention (``probe_gates.py``: "gradient", the
  gate gradient at initialisation, optionally re-ranked near a threshold by measured drops;
  "ablation", the measured drop of streaming each head alone).

Score = the signal averaged over prompts and normalised to [0, 1] (higher: keep the head dense,
a retrieval head), ``[num_layers, num_kv_heads]``. Deterministic for a given seed: the prompts are
seeded, and the forward passes are deterministic on CPU.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch

from .probe_attention import METRICS as ATTENTION_METRICS, attention_scores
from .probe_gates import ablation_drops, gate_gradients, refine_by_gates
from .prompts import ProbePrompt, passkey_probe_prompts

GATE_METRICS = ("gradient", "ablation")


def probe_heads(model, tokenizer=None, *, lengths: Sequence[int] = (2000, 3000),
                depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), sink: int = 128,
                local: int = 256, seed: int = 0, n_seeds: int = 1, metric: str = "gradient",
                needle_weight: float = 0.5, group_reduce: str = "max",
                prompts: Iterable[ProbePrompt | torch.Tensor] | None = None, progress: bool = True,
                return_details: bool = False, grad_reduce: str = "relu", refine: int = 0,
                refine_sparsity: float = 0.5):
    """Score every KV head by how much it retrieves from outside the sink + local window.

    Args:
        model: an unpatched Transformers causal LM (Llama, Mistral, Qwen2, ...); any attention
            implementation, restored afterwards. Run on its own device and dtype.
        tokenizer: builds the passkey prompts (``lengths`` x ``depths`` x ``n_seeds`` of them,
            seeds ``seed .. seed + n_seeds - 1``). Not needed when ``prompts`` is given.
        lengths, depths: prompt lengths in tokens and needle depths (0..1). Lengths should exceed
            ``sink + local`` by far, or no needle is outside the window.
        sink, local: the streaming window the scores are about (the patch's ``decode_sink`` /
            ``decode_local``; LServe's published decode window is 128 / 256).
        metric: "gradient" (default): the gate gradient of the answer's log-prob (one forward +
            backward per prompt, about 3x the cost of the attention metrics); "ablation": the
            measured drop of the answer's log-prob when that KV head alone streams
            (``num_layers x num_kv_heads + 1`` forwards per prompt); "mass": ``needle_weight`` x
            needle mass + (1 - ``needle_weight``) x mass outside the window (each max-normalised;
            the far mass alone when no prompt has a needle); "far" / "needle": one of the two;
            "deviation": how much streaming the head would change the layer's attention output
            at the query rows.
        needle_weight: weight of the needle mass for ``metric="mass"`` (0..1).
        group_reduce: "max" or "mean" over the query heads of a GQA group (attention metrics).
        prompts: pre-tokenized prompts instead of passkey ones: ``ProbePrompt``s or 1-D id tensors
            (for a bare tensor the last 8 positions are the query rows and there is no needle).
        progress: tqdm bar over prompts.
        return_details: also return a dict with the runtime and, for the attention metrics, the
            unnormalised ``far``, ``needle`` and ``deviation`` ``[num_layers, num_kv_heads]``; for
            "gradient": ``gradient`` ``[n_prompts, num_layers, num_kv_heads]``, ``dense_logp``,
            ``signal``, ``refined``; for "ablation": ``drop`` ``[n_prompts, num_layers,
            num_kv_heads]``, ``dense_logp``, ``signal``.
        grad_reduce: "relu" (mean of ``max(g, 0)``) or "mean" (mean of ``g``), for "gradient";
            the same over the measured drops for "ablation".
        refine, refine_sparsity: for "gradient", re-rank the ``refine`` heads nearest the
            ``refine_sparsity`` quantile by the measured drop (``refine`` x ``n_prompts`` extra
            forwards); 0 (default) = first order only.

    Returns: float32 tensor ``[num_layers, num_kv_heads]`` in [0, 1] (higher means keep the head
    dense), ready for ``save_pattern`` / ``patch_model(head_pattern=...)``.
    """
    if metric not in GATE_METRICS + ATTENTION_METRICS:
        raise ValueError(f"metric={metric!r} must be one of {', '.join(GATE_METRICS + ATTENTION_METRICS)}.")
    if grad_reduce not in ("relu", "mean"):
        raise ValueError(f"grad_reduce={grad_reduce!r} must be 'relu' or 'mean'.")
    if not 0.0 <= refine_sparsity <= 1.0:
        raise ValueError(f"refine_sparsity={refine_sparsity} must lie in [0, 1].")
    if group_reduce not in ("max", "mean"):
        raise ValueError(f"group_reduce={group_reduce!r} must be 'max' or 'mean'.")
    if not 0.0 <= needle_weight <= 1.0:
        raise ValueError(f"needle_weight={needle_weight} must lie in [0, 1].")
    if getattr(model, "_lserve", None) is not None:
        raise ValueError("probe_heads needs the unpatched model: call unpatch_model(model) first.")
    if prompts is None:
        if tokenizer is None:
            raise ValueError("probe_heads needs a tokenizer to build passkey prompts, or prompts=.")
        prompts = passkey_probe_prompts(tokenizer, lengths, depths, range(seed, seed + n_seeds))
    prompts = [p if isinstance(p, ProbePrompt) else ProbePrompt(torch.as_tensor(p)) for p in prompts]
    if not prompts:
        raise ValueError("probe_heads got no prompts.")

    if metric in ATTENTION_METRICS:
        score, details = attention_scores(model, prompts, sink, local, metric, needle_weight, group_reduce,
                                          progress)
        return (score, details) if return_details else score
    t0 = time.perf_counter()
    if metric == "ablation":
        per_prompt, dense_logp = ablation_drops(model, prompts, sink, local, progress)
        details = {"drop": per_prompt.float()}
    else:
        per_prompt, dense_logp = gate_gradients(model, prompts, sink, local, progress)
        details = {"gradient": per_prompt.float(), "refined": None}
    signal = (per_prompt.clamp_min(0) if grad_reduce == "relu" else per_prompt).mean(0)
    if metric == "gradient" and refine > 0:
        signal, details["refined"] = refine_by_gates(model, prompts, signal, sink, local, int(refine),
                                                     refine_sparsity, progress)
    score = _normalised(signal, relu=grad_reduce == "relu")
    if return_details:
        return score, {**details, "dense_logp": dense_logp.float(), "signal": signal.float(),
                       "runtime_s": time.perf_counter() - t0, "n_prompts": len(prompts)}
    return score


def _normalised(signal: torch.Tensor, relu: bool) -> torch.Tensor:
    """The signal in [0, 1]: a relu signal (>= 0) scaled by its max, so that a head with no
    signal scores 0; any other min-max scaled."""
    lo, hi = signal.min(), signal.max()
    score = signal.clamp_min(0) / hi.clamp_min(1e-12) if relu else (signal - lo) / (hi - lo).clamp_min(1e-12)
    return score.clamp(0, 1).float()
