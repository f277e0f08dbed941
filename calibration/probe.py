"""Training-free head probe: which KV heads retrieve from outside the sink + local window.

DuoAttention learns its head scores with gates trained on synthetic passkey data. This probe gets a
usable pattern in a minute of CPU instead, from the attention weights of the unpatched model:

1. Prompts: synthetic passkey prompts (``lserve_hf.passkey``) at several lengths, depths and seeds,
   with the passkey itself appended as the answer (teacher forcing), so one prefill per prompt
   shows the model *while it retrieves*.
2. Rows: only the query positions that predict the answer's tokens (the last prompt token and the
   answer's tokens but the last) are looked at. Their softmax weights are recomputed in float32 from
   the layer's own (post-RoPE) queries and keys, exactly eager attention's weights, inside an
   attention function that otherwise runs SDPA: memory stays ``heads x rows x context`` per layer,
   never the ``heads x context x context`` of ``output_attentions=True``.
3. Signal per query head (``metric``): ``mass`` = ``needle_weight`` x attention mass on
   the needle's tokens + the rest x mass outside the sink + local window. ``deviation`` = what streaming that head alone
   would change in the layer's attention output at those rows: ``||W_o,h (o_full - o_stream)||``
   divided by ``||attention output||``, with ``o_stream`` the softmax restricted to the first
   ``sink`` tokens and the last ``local`` ones (exact for the head, first order for the model).
   ``far`` / ``needle`` = one of the two masses alone. A KV head takes the max over the query heads of its GQA group
   (one retrieving query head makes the whole group need full KV).
   ``gradient`` (default; per KV head): DuoAttention's gate gradient at initialisation. Every layer's attention output
   becomes ``alpha * full + (1 - alpha) * stream`` per KV head (``stream`` = the softmax restricted
   to the first ``sink`` and the last ``local`` keys), with ``alpha = 1`` (so the model is unchanged);
   one forward + backward gives ``g = d log p(answer) / d alpha``, to first order the log-prob the
   answer loses when that head streams. Signal = mean over prompts of ``max(g, 0)`` (``grad_reduce=
   "relu"``) or of ``g`` (``"mean"``). Optionally (``refine=n``) the ``n`` heads nearest the
   ``refine_sparsity`` threshold are re-ranked by the measured log-prob drop of streaming each.
   ``ablation`` (per KV head): the same gates, measured instead of differentiated: stream that
   head alone (``alpha = 0`` for it, 1 elsewhere; sink + local in prefill and decode alike) and
   take the drop of the answer's log-prob, ``log p_dense - log p_streamed``. One forward per
   (KV head, prompt): ``num_layers x num_kv_heads`` times the cost of a plain forward per prompt.
   Signal = mean over prompts of ``max(drop, 0)`` (``grad_reduce="relu"``) or of the drop.
4. Score = the signal averaged over prompts, divided by its maximum: ``[num_layers,
   num_kv_heads]`` in [0, 1], higher = keep dense (retrieval head).

Deterministic for a given seed (prompts are seeded; the forward passes are deterministic on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lserve_hf.patch import set_attention_implementation

from .gating import Gate, applied, check_seen, gated

PROBE_ATTN = "lserve_probe"


@dataclass
class ProbePrompt:
    """One pre-tokenized probe prompt.

    input_ids: 1-D token ids (prompt followed by the answer, if any).
    n_query: how many final positions are the query rows looked at (e.g. the positions that predict
        the answer's tokens).
    needle: token positions of the needle (a slice, or a sequence of indices), or None when the prompt
        has no needle: then only the ``far`` mass is measured.
    answer: the ``n_query`` token ids the query rows should predict (for ``metric="gradient"``);
        None: the fed tokens after each query row, and the model's own greedy token for the last.
    """

    input_ids: torch.Tensor
    n_query: int = 8
    needle: slice | Sequence[int] | None = None
    answer: Sequence[int] | None = None


class _Recorder:
    """Accumulates per-layer, per-query-head masses for the current prompt."""

    def __init__(self, sink: int, local: int):
        self.sink, self.local = sink, local
        self.n_query = 1
        self.needle_idx: torch.Tensor | None = None
        self.far: dict[int, torch.Tensor] = {}
        self.needle: dict[int, torch.Tensor] = {}
        self.dev: dict[int, torch.Tensor] = {}

    def record(self, module, query, key, value, attention_mask, scaling):
        # query [B, Hq, S, D], key [B, Hkv, K, D] (post-RoPE, this forward's full context)
        B, Hq, S, D = query.shape
        Hkv, K = key.shape[1], key.shape[2]
        r = min(self.n_query, S)
        q = query[:, :, S - r:].float()
        k = key.float().repeat_interleave(Hq // Hkv, dim=1)
        scale = scaling if scaling is not None else D ** -0.5
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, r, K]
        q_pos = torch.arange(K - r, K, device=q.device)[:, None]
        k_pos = torch.arange(K, device=q.device)[None, :]
        allowed = k_pos <= q_pos  # causal
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            m = attention_mask[..., -r:, -K:]
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                logits = logits + m.float()
        logits = logits.masked_fill(~allowed, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        near = (k_pos < self.sink) | (k_pos > q_pos - self.local)  # sink + local window (incl. self)
        far = (w * (~near & allowed)).sum(-1).mean(-1)  # [B, Hq]
        idx = module.layer_idx
        self.far[idx] = far.mean(0).cpu()
        # deviation: what streaming this head would change in the layer's output at these rows,
        # ||W_o,h (o_full - o_stream)|| relative to ||attention output of the layer||
        v = value.float().repeat_interleave(Hq // Hkv, dim=1)
        o_full = torch.matmul(w, v)  # [B, Hq, r, D]
        w_near = torch.softmax(logits.masked_fill(~near, float("-inf")), dim=-1)
        delta = o_full - torch.matmul(w_near, v)
        wo = getattr(module, "o_proj", None)
        if wo is not None and wo.weight.shape[1] == Hq * D:
            wo = wo.weight.float().view(-1, Hq, D)  # [hidden, Hq, D]
            per_head = torch.einsum("bhrd,ohd->bhro", delta, wo).norm(dim=-1)  # [B, Hq, r]
            total = torch.einsum("bhrd,ohd->bro", o_full, wo).norm(dim=-1)  # [B, r]
        else:
            per_head, total = delta.norm(dim=-1), o_full.norm(dim=-1).sum(1)
        self.dev[idx] = (per_head / total[:, None].clamp_min(1e-12)).mean(-1).mean(0).cpu()
        if self.needle_idx is not None:
            nd = w[..., self.needle_idx.to(w.device)].sum(-1).mean(-1)
            self.needle[idx] = nd.mean(0).cpu()


_ACTIVE: list[_Recorder] = []


def _probe_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    if _ACTIVE:
        _ACTIVE[-1].record(module, query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(PROBE_ATTN, _probe_attention)
AttentionMaskInterface.register(PROBE_ATTN, sdpa_mask)


def _answer_logprob(model, ids, n_query, answer, alpha_gate):
    """Sum over the query rows of log p(target token); differentiable in the gate's alpha."""
    out = model(input_ids=ids, use_cache=False, logits_to_keep=n_query)
    logp = torch.log_softmax(out.logits[0, -n_query:].float(), dim=-1)  # [r, V]
    if answer is not None:
        tgt = torch.as_tensor(list(answer)[-n_query:], dtype=torch.long, device=logp.device)
    else:  # the fed continuation, and the model's own greedy pick for the last row
        fed = ids[0, ids.shape[1] - n_query + 1:]
        tgt = torch.cat([fed, logp[-1:].detach().argmax(-1)])
    return logp.gather(-1, tgt[:, None]).sum()


def _probe_gradient(model, prompts, sink, local, progress, refine, refine_sparsity, reduce):
    """DuoAttention's gate gradient at initialisation; optional exact re-ranking near the threshold."""
    cfg = model.config
    n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    device = next(model.parameters()).device
    grads = torch.zeros(len(prompts), n_layers, n_kv, dtype=torch.float64)
    dense_logp = torch.zeros(len(prompts), dtype=torch.float64)
    from tqdm.auto import tqdm

    with gated(model):
        for i, p in enumerate(tqdm(prompts, desc="probing heads (gate gradient)", disable=not progress)):
            ids = p.input_ids.reshape(1, -1).to(device)
            r = max(1, int(p.n_query))
            alpha = torch.ones(n_layers, n_kv, dtype=torch.float32, device=device, requires_grad=True)
            with applied(Gate(alpha, sink, local)) as gate, torch.enable_grad():
                lp = _answer_logprob(model, ids, r, p.answer, gate)
                (g,) = torch.autograd.grad(lp, alpha)
            check_seen(gate, n_layers, "The probe")
            grads[i] = g.detach().double().cpu()
            dense_logp[i] = float(lp.detach())
        per_prompt = grads.clamp_min(0) if reduce == "relu" else grads
        signal = per_prompt.mean(0)
        refined = None
        if refine > 0:
            signal, refined = _refine(model, prompts, signal, sink, local, refine, refine_sparsity,
                                      dense_logp, device, progress)
    return signal, grads, dense_logp, refined


@torch.no_grad()
def _refine(model, prompts, signal, sink, local, n, sparsity, dense_logp, device, progress):
    """Exact re-ranking of the ``n`` heads nearest the ``sparsity`` threshold: with the first-order
    streaming set (minus the candidates) streaming, stream each candidate alone and measure the mean
    drop of the answer log-prob over the prompts; candidates keep their rank band, reordered."""
    from tqdm.auto import tqdm

    n_layers, n_kv = signal.shape
    flat = signal.flatten()
    order = torch.argsort(flat, stable=True)  # ascending: the first ones stream
    n_stream = int(round(sparsity * flat.numel()))
    lo, hi = max(0, n_stream - n // 2), min(flat.numel(), n_stream + (n - n // 2))
    cand = order[lo:hi]
    base = torch.ones(flat.numel())
    base[order[:lo]] = 0.0  # surely streaming
    drops = torch.zeros(len(cand), dtype=torch.float64)

    def logp_with(alpha_flat):
        tot = 0.0
        for p in prompts:
            with applied(Gate(alpha_flat.view(n_layers, n_kv).to(device), sink, local)) as gate:
                tot += float(_answer_logprob(model, p.input_ids.reshape(1, -1).to(device),
                                             max(1, int(p.n_query)), p.answer, gate))
        return tot / len(prompts)

    ref = logp_with(base)
    for j, h in enumerate(tqdm(cand.tolist(), desc="refining heads", disable=not progress)):
        a = base.clone()
        a[h] = 0.0
        drops[j] = ref - logp_with(a)
    # candidates keep the score band [lo, hi) of the ranking; order within it by the measured drop
    band = flat[order[lo:hi]].sort().values
    new = flat.clone()
    new[cand[torch.argsort(drops, stable=True)]] = band
    return new.view(n_layers, n_kv), {"candidates": cand, "drops": drops, "base_logp": ref}


def _decoder_parts(model):
    """(decoder layers, final norm, LM head) of a Llama-like causal LM, or None."""
    base = getattr(model, "model", None)
    layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None or len(layers) != model.config.num_hidden_layers:
        return None
    return layers, norm, head


def _answer_logprob_from(parts, start, inputs, n_query, answer, ids):
    """``_answer_logprob`` resumed at decoder layer ``start`` from the recorded layer inputs
    (``inputs[j] = (hidden_states, kwargs)`` of a forward whose layers below ``start`` match)."""
    layers, norm, head = parts
    h = inputs[start][0]
    for j in range(start, len(layers)):
        h = layers[j](h, **inputs[j][1])
        if isinstance(h, tuple):
            h = h[0]
    logp = torch.log_softmax(head(norm(h[:, -n_query:]))[0].float(), dim=-1)
    if answer is not None:
        tgt = torch.as_tensor(list(answer)[-n_query:], dtype=torch.long, device=logp.device)
    else:
        fed = ids[0, ids.shape[1] - n_query + 1:]
        tgt = torch.cat([fed.to(logp.device), logp[-1:].argmax(-1)])
    return float(logp.gather(-1, tgt[:, None]).sum())


@torch.no_grad()
def _probe_ablation(model, prompts, sink, local, progress, reduce):
    """Measured log-prob drop of streaming each KV head alone (the others dense)."""
    from tqdm.auto import tqdm

    cfg = model.config
    n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    device = next(model.parameters()).device
    drops = torch.zeros(len(prompts), n_layers, n_kv, dtype=torch.float64)
    dense_logp = torch.zeros(len(prompts), dtype=torch.float64)
    parts = _decoder_parts(model)
    with gated(model):
        bar = tqdm(total=len(prompts) * (n_layers * n_kv + 1), desc="probing heads (ablation)",
                   disable=not progress)
        for i, p in enumerate(prompts):
            ids = p.input_ids.reshape(1, -1).to(device)
            r = max(1, int(p.n_query))
            ones = torch.ones(n_layers, n_kv, dtype=torch.float32, device=device)
            inputs = {}
            hooks = [] if parts is None else [
                layer.register_forward_pre_hook(
                    lambda m, a, kw, j=j: inputs.__setitem__(j, (a[0] if a else kw["hidden_states"], kw)),
                    with_kwargs=True)
                for j, layer in enumerate(parts[0])]
            try:
                with applied(Gate(ones, sink, local)) as gate:
                    dense_logp[i] = float(_answer_logprob(model, ids, r, p.answer, gate))
            finally:
                for h in hooks:
                    h.remove()
            check_seen(gate, n_layers, "The probe")
            bar.update()
            for layer in range(n_layers):
                for head in range(n_kv):
                    alpha = ones.clone()
                    alpha[layer, head] = 0.0
                    with applied(Gate(alpha, sink, local)) as gate:
                        if parts is not None and len(inputs) == n_layers:
                            # the layers below the streamed head are the dense pass's: start at its layer
                            lp = _answer_logprob_from(parts, layer, inputs, r, p.answer, ids)
                        else:
                            lp = float(_answer_logprob(model, ids, r, p.answer, gate))
                    drops[i, layer, head] = dense_logp[i] - lp
                    bar.update()
        bar.close()
    per_prompt = drops.clamp_min(0) if reduce == "relu" else drops
    return per_prompt.mean(0), drops, dense_logp


def passkey_probe_prompts(tokenizer, lengths: Iterable[int], depths: Iterable[float],
                          seeds: Iterable[int] = (0,)) -> list[ProbePrompt]:
    """Passkey prompts (no chat template) with the answer appended; query rows are the positions
    that predict the answer's tokens; needle = the tokens of the sentence holding the passkey."""
    from lserve_hf.passkey import passkey_prompt

    out = []
    for seed in seeds:
        for n in lengths:
            for d in depths:
                p = passkey_prompt(tokenizer, int(n), float(d), seed=int(seed), chat=False)
                prompt_ids = tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)
                answer_ids = tokenizer(" " + p.passkey, add_special_tokens=False).input_ids
                # the rows that predict the answer: the last prompt token and all answer tokens but
                # the last (which predicts nothing of the answer, so it is not fed)
                ids = list(prompt_ids.input_ids) + list(answer_ids[:-1])
                # needle: "The pass key is N. Remember it. N is the pass key." (first two N's)
                c0 = p.text.index(" The pass key is " + p.passkey)
                c1 = p.text.index(p.passkey + " is the pass key", c0) + len(p.passkey + " is the pass key.")
                needle = [i for i, (a, b) in enumerate(prompt_ids.offset_mapping) if b > c0 and a < c1]
                out.append(ProbePrompt(torch.tensor(ids), n_query=len(answer_ids), needle=needle,
                                       answer=list(answer_ids)))
    return out


def probe_heads(model, tokenizer=None, lengths: Sequence[int] = (2000, 3000),
                depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), sink: int = 128,
                local: int = 256, seed: int = 0, n_seeds: int = 1, metric: str = "gradient",
                needle_weight: float = 0.5, group_reduce: str = "max", prompts: Iterable[ProbePrompt | torch.Tensor] | None = None,
                progress: bool = True, return_details: bool = False, grad_reduce: str = "relu",
                refine: int = 0, refine_sparsity: float = 0.5):
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
        metric: "gradient" (default; see below); "mass": ``needle_weight`` x needle mass + (1 - ``needle_weight``) x mass
            outside the window (each max-normalised; the far mass alone when no prompt has a
            needle); "far" / "needle": one of the two;
            "deviation": how much streaming the head would change the layer's attention output at
            the query rows; "gradient": the gate gradient of the answer's log-prob (module doc,
            step 3; one forward + backward per prompt, about 3x the cost of the others);
            "ablation": the measured drop of the answer's log-prob when that KV head alone streams
            (``num_layers x num_kv_heads + 1`` forwards per prompt).
        needle_weight: weight of the needle mass for ``metric="mass"`` (0..1).
        group_reduce: "max" or "mean" over the query heads of a GQA group.
        prompts: pre-tokenized prompts instead of passkey ones: ``ProbePrompt``s or 1-D id tensors
            (for a bare tensor the last 8 positions are the query rows and there is no needle).
        progress: tqdm bar over prompts.
        return_details: also return a dict with the unnormalised ``far``, ``needle`` and
            ``deviation`` matrices ``[num_layers, num_kv_heads]`` and the runtime (for "gradient":
            ``gradient`` ``[n_prompts, num_layers, num_kv_heads]``, ``dense_logp``, ``signal``,
            ``refined``; for "ablation": ``drop`` ``[n_prompts, num_layers, num_kv_heads]``,
            ``dense_logp``, ``signal``).
        grad_reduce: "relu" (mean of ``max(g, 0)``) or "mean" (mean of ``g``), for "gradient";
            the same over the measured drops for "ablation".
        refine, refine_sparsity: for "gradient", re-rank the ``refine`` heads nearest the
            ``refine_sparsity`` quantile by the measured drop (``refine`` x ``n_prompts`` extra
            forwards); 0 (default) = first order only.

    Returns: float32 tensor ``[num_layers, num_kv_heads]`` in [0, 1] (max-normalised; higher means
    keep the head dense), ready for ``save_pattern`` / ``patch_model(head_pattern=...)``.
    """
    if metric not in ("gradient", "ablation", "deviation", "mass", "far", "needle"):
        raise ValueError(f"metric={metric!r} must be 'gradient', 'ablation', 'deviation', 'mass', 'far' "
                         "or 'needle'.")
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

    if metric in ("ablation", "gradient"):
        t0 = time.perf_counter()
        if metric == "ablation":
            signal, per_prompt, dense_logp = _probe_ablation(model, prompts, sink, local, progress,
                                                             grad_reduce)
            details = {"drop": per_prompt.float()}
            relu = grad_reduce == "relu"
        else:
            signal, per_prompt, dense_logp, refined = _probe_gradient(
                model, prompts, sink, local, progress, int(refine), refine_sparsity, grad_reduce)
            details = {"gradient": per_prompt.float(), "refined": refined}
            relu = grad_reduce == "relu" and refined is None
        runtime = time.perf_counter() - t0
        # relu signals are >= 0: scale by the max so a head with no signal scores 0; others min-max
        lo, hi = signal.min(), signal.max()
        score = signal.clamp_min(0) / hi.clamp_min(1e-12) if relu else (signal - lo) / (hi - lo).clamp_min(1e-12)
        score = score.clamp(0, 1).float()
        if return_details:
            return score, {**details, "dense_logp": dense_logp.float(), "signal": signal.float(),
                           "runtime_s": runtime, "n_prompts": len(prompts)}
        return score
    with torch.no_grad():
        return _probe_attention_metrics(model, prompts, sink, local, metric, needle_weight,
                                        group_reduce, progress, return_details)


def _probe_attention_metrics(model, prompts, sink, local, metric, needle_weight, group_reduce,
                             progress, return_details):
    cfg = model.config
    n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    device = next(model.parameters()).device
    far_sum = torch.zeros(n_layers, n_kv, dtype=torch.float64)
    needle_sum = torch.zeros(n_layers, n_kv, dtype=torch.float64)
    dev_sum = torch.zeros(n_layers, n_kv, dtype=torch.float64)
    n_needle = 0

    def group(x):  # [Hq] -> [Hkv]
        g = x.view(n_kv, -1).double()
        return g.amax(-1) if group_reduce == "max" else g.mean(-1)

    rec = _Recorder(sink, local)
    previous = getattr(cfg, "_attn_implementation", None)
    was_training = model.training
    t0 = time.perf_counter()
    set_attention_implementation(model, PROBE_ATTN)
    _ACTIVE.append(rec)
    model.eval()
    try:
        from tqdm.auto import tqdm

        for p in tqdm(prompts, desc="probing heads", disable=not progress):
            ids = p.input_ids.reshape(1, -1).to(device)
            rec.n_query = max(1, int(p.n_query))
            rec.far.clear()
            rec.needle.clear()
            rec.dev.clear()
            if p.needle is not None:
                nd = torch.arange(ids.shape[1])[p.needle] if isinstance(p.needle, slice) \
                    else torch.as_tensor(list(p.needle), dtype=torch.long)
                rec.needle_idx = nd
            else:
                rec.needle_idx = None
            model(input_ids=ids, use_cache=False)
            if len(rec.far) != n_layers:
                raise RuntimeError(f"The probe saw {len(rec.far)} of {n_layers} attention layers: "
                                   "this model does not route attention through AttentionInterface.")
            for i in range(n_layers):
                far_sum[i] += group(rec.far[i])
                dev_sum[i] += group(rec.dev[i])
                if rec.needle_idx is not None:
                    needle_sum[i] += group(rec.needle[i])
            n_needle += rec.needle_idx is not None
    finally:
        _ACTIVE.remove(rec)
        set_attention_implementation(model, previous)
        model.train(was_training)
    runtime = time.perf_counter() - t0

    far = far_sum / len(prompts)
    dev = dev_sum / len(prompts)
    needle = needle_sum / max(n_needle, 1)
    if metric == "needle" and not n_needle:
        raise ValueError(f"metric={metric!r} needs prompts with a needle.")

    def unit(x):
        return x / x.max().clamp_min(1e-12)

    if metric == "deviation":
        score = unit(dev)
    elif metric == "far":
        score = unit(far)
    elif metric == "needle":
        score = unit(needle)
    else:
        w = needle_weight if n_needle else 0.0  # prompts without a needle: the far mass alone
        score = unit(w * unit(needle) + (1 - w) * unit(far))
    score = score.clamp(0, 1).float()
    if return_details:
        return score, {"far": far.float(), "needle": needle.float(), "deviation": dev.float(),
                       "runtime_s": runtime,
                       "n_prompts": len(prompts)}
    return score
