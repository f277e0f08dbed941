"""Head scores from DuoAttention's gates (``probe_heads``' metrics "gradient" and "ablation").

Under the gates (``gating.py``) every layer's attention output is ``alpha * full + (1 - alpha) *
stream`` per KV head, ``stream`` the softmax restricted to the first ``sink`` and the last
``local`` keys. At ``alpha = 1`` the model is unchanged.

- gradient: one forward + backward per prompt at ``alpha = 1`` gives ``g = d log p(answer) /
  d alpha``: to first order, the log-prob the answer loses when that head streams.
  :func:`refine_by_gates` re-ranks the heads nearest a threshold by the measured drop instead.
- ablation: the same gates, measured instead of differentiated: stream one head alone (``alpha
  = 0`` for it, 1 elsewhere; sink + local in prefill and decode alike) and take ``log p_dense -
  log p_streamed``. One forward per (KV head, prompt), each resumed at the streamed head's layer
  from the dense pass (``resume.py``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .gating import Gate, applied, check_seen, gated
from .prompts import ProbePrompt, answer_logprob
from .rerank import band_heads, reorder, threshold_band
from .resume import LayerInputs, decoder_parts, run_from


def _device(model):
    return next(model.parameters()).device


def forward_logprob(model, prompt: ProbePrompt) -> torch.Tensor:
    """``log p(answer)`` of ``prompt`` in one forward without a cache, under whatever attention
    the model runs (the gate in force, inside ``gated``); differentiable."""
    ids = prompt.input_ids.reshape(1, -1).to(_device(model))
    out = model(input_ids=ids, use_cache=False, logits_to_keep=prompt.rows)
    return answer_logprob(out.logits[0], prompt)


def gate_gradients(model, prompts, sink: int, local: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, dense_logp)``: the gate gradient at ``alpha = 1`` per prompt ``[n_prompts,
    num_layers, num_kv_heads]`` float64, and each prompt's ``log p(answer)``."""
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    grads = torch.zeros(len(prompts), n_layers, n_kv, dtype=torch.float64)
    dense_logp = torch.zeros(len(prompts), dtype=torch.float64)
    with gated(model):
        for i, p in enumerate(tqdm(prompts, desc="probing heads (gate gradient)", disable=not progress)):
            alpha = torch.ones(n_layers, n_kv, dtype=torch.float32, device=_device(model), requires_grad=True)
            with applied(Gate(alpha, sink, local)) as gate, torch.enable_grad():
                lp = forward_logprob(model, p)
                (g,) = torch.autograd.grad(lp, alpha)
            check_seen(gate, n_layers, "The probe")
            grads[i] = g.detach().double().cpu()
            dense_logp[i] = float(lp.detach())
    return grads, dense_logp


@torch.no_grad()
def refine_by_gates(model, prompts, signal: torch.Tensor, sink: int, local: int, n: int,
                    sparsity: float, progress: bool) -> tuple[torch.Tensor, dict]:
    """``signal`` with the ``n`` heads nearest the ``sparsity`` threshold re-ranked
    (``rerank.py``) by the drop of the mean ``log p(answer)`` that streaming each one costs
    under the gates, the heads ranked below them streaming and every other head dense. Returns
    the new signal and ``{"candidates", "drops", "base_logp"}``."""
    n_layers, n_kv = signal.shape
    candidates, base = band_heads(signal, threshold_band(signal, sparsity, n))

    def mean_logp(streaming):
        alpha = (~streaming).float().view(n_layers, n_kv).to(_device(model))
        with applied(Gate(alpha, sink, local)):
            return sum(float(forward_logprob(model, p)) for p in prompts) / len(prompts)

    drops = torch.zeros(len(candidates), dtype=torch.float64)
    with gated(model):
        ref = mean_logp(base)
        for j, h in enumerate(tqdm(candidates.tolist(), desc="refining heads", disable=not progress)):
            streaming = base.clone()
            streaming[h] = True
            drops[j] = ref - mean_logp(streaming)
    return reorder(signal, candidates, drops), {"candidates": candidates, "drops": drops, "base_logp": ref}


@torch.no_grad()
def ablation_drops(model, prompts, sink: int, local: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drops, dense_logp)``: per prompt, the drop of ``log p(answer)`` when each KV head alone
    streams, ``[n_prompts, num_layers, num_kv_heads]`` float64, and the dense ``log p(answer)``."""
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    drops = torch.zeros(len(prompts), n_layers, n_kv, dtype=torch.float64)
    dense_logp = torch.zeros(len(prompts), dtype=torch.float64)
    parts = decoder_parts(model)
    ones = torch.ones(n_layers, n_kv, dtype=torch.float32, device=_device(model))
    with gated(model):
        bar = tqdm(total=len(prompts) * (n_layers * n_kv + 1), desc="probing heads (ablation)",
                   disable=not progress)
        for i, p in enumerate(prompts):
            inputs = LayerInputs(parts)
            with inputs.recording(), applied(Gate(ones, sink, local)) as gate:
                dense_logp[i] = float(forward_logprob(model, p))
            check_seen(gate, n_layers, "The probe")
            bar.update()
            for layer in range(n_layers):
                for head in range(n_kv):
                    alpha = ones.clone()
                    alpha[layer, head] = 0.0
                    with applied(Gate(alpha, sink, local)):
                        if inputs.complete:
                            # the layers below the streamed head are the dense pass's: start at its layer
                            lp = answer_logprob(run_from(parts, inputs, layer, p.rows)[0], p)
                        else:
                            lp = forward_logprob(model, p)
                    drops[i, layer, head] = dense_logp[i] - float(lp)
                    bar.update()
        bar.close()
    return drops, dense_logp
