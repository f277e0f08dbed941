"""Head scores from the attention weights of the unpatched model (``probe_heads``' metrics
"mass", "far", "needle" and "deviation").

Only the query rows (the positions that predict the answer's tokens, ``ProbePrompt.n_query``)
are looked at. Their softmax weights are recomputed in float32 from the layer's own (post-RoPE)
queries and keys, exactly eager attention's weights, inside an attention function that otherwise
runs SDPA: memory stays ``heads x rows x context`` per layer, never the ``heads x context x
context`` of ``output_attentions=True``.

Per query head, at those rows:
- far: the attention mass outside the sink + local window (what streaming the head would drop);
- needle: the mass on the needle's tokens;
- deviation: what streaming that head alone would change in the layer's attention output,
  ``||W_o,h (o_full - o_stream)||`` over ``||attention output||``, with ``o_stream`` the softmax
  restricted to the first ``sink`` tokens and the last ``local`` ones (exact for the head, first
  order for the model).
A KV head takes the max (or mean) over the query heads of its GQA group: one retrieving query
head makes the whole group need full KV.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lserve_hf.patch import set_attention_implementation

PROBE_ATTN = "lserve_probe"
METRICS = ("mass", "far", "needle", "deviation")


class _Recorder:
    """The per-layer, per-query-head far mass, needle mass and deviation of the current prompt."""

    def __init__(self, sink: int, local: int):
        self.sink, self.local = sink, local
        self.n_query = 1
        self.needle_idx: torch.Tensor | None = None
        self.far: dict[int, torch.Tensor] = {}
        self.needle: dict[int, torch.Tensor] = {}
        self.dev: dict[int, torch.Tensor] = {}

    def start(self, prompt, n_tokens: int) -> None:
        self.n_query = prompt.rows
        self.far.clear()
        self.needle.clear()
        self.dev.clear()
        if prompt.needle is None:
            self.needle_idx = None
        elif isinstance(prompt.needle, slice):
            self.needle_idx = torch.arange(n_tokens)[prompt.needle]
        else:
            self.needle_idx = torch.as_tensor(list(prompt.needle), dtype=torch.long)

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


# The recorder of the probe running now: the attention function has no other way to receive it.
_ACTIVE: list[_Recorder] = []


def _probe_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    if _ACTIVE:
        _ACTIVE[-1].record(module, query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(PROBE_ATTN, _probe_attention)
AttentionMaskInterface.register(PROBE_ATTN, sdpa_mask)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.max().clamp_min(1e-12)


@torch.no_grad()
def attention_scores(model, prompts, sink: int, local: int, metric: str, needle_weight: float,
                     group_reduce: str, progress: bool) -> tuple[torch.Tensor, dict]:
    """``(scores, details)``: ``metric`` averaged over ``prompts`` and max-normalised (``mass``:
    ``needle_weight`` x needle mass + the rest x far mass, each max-normalised; the far mass
    alone when no prompt has a needle); ``details`` holds the unnormalised ``far``, ``needle``
    and ``deviation`` ``[num_layers, num_kv_heads]``. The model's attention implementation and
    mode are restored."""
    if metric == "needle" and all(p.needle is None for p in prompts):
        raise ValueError(f"metric={metric!r} needs prompts with a needle.")
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
        for p in tqdm(prompts, desc="probing heads", disable=not progress):
            ids = p.input_ids.reshape(1, -1).to(device)
            rec.start(p, ids.shape[1])
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
    if metric == "deviation":
        score = _unit(dev)
    elif metric == "far":
        score = _unit(far)
    elif metric == "needle":
        score = _unit(needle)
    else:
        w = needle_weight if n_needle else 0.0
        score = _unit(w * _unit(needle) + (1 - w) * _unit(far))
    details = {"far": far.float(), "needle": needle.float(), "deviation": dev.float(),
               "runtime_s": runtime, "n_prompts": len(prompts)}
    return score.clamp(0, 1).float(), details
