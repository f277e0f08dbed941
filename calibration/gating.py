"""DuoAttention's gated attention, shared by the gate probes (``probe_gates.py``) and gate
training (``gates.py``).

Every layer's attention output becomes ``alpha * full + (1 - alpha) * stream`` per KV head, with
``stream`` the softmax restricted to the first ``sink`` and the last ``local`` keys (the streaming
head the pattern decides about). The gate is an attention function registered with Transformers'
``AttentionInterface``, so any model that routes attention through it (Llama, Mistral, Qwen2, ...)
is gated without touching its code. Which gate applies is a stack (``GATES``): the attention
function has no other way to receive it, and with nothing on the stack it is plain SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lserve_hf.patch import set_attention_implementation

# the name predates gate training; kept so that nothing that switched to it by name breaks
GATE_ATTN = "lserve_probe_gate"


def streaming_blocks(query, key, value, scaling, sink: int, local: int, query_block: int = 512):
    """Streaming attention, a block of query rows at a time: yields ``(s0, s1, rows)`` with
    ``rows`` ``[B, s1 - s0, Hq, D]`` float32, only for the rows whose window misses a key (the
    earlier rows see every key either way, so their streaming output is the full one).

    A block gathers just the sink keys and its own local band, so memory is ``heads x block x
    (sink + local + block)``, never ``heads x S x S``; it is plain autograd, so differentiable
    unless the caller runs it under ``no_grad``. query ``[B, Hq, S, D]``, key/value ``[B, Hkv, K,
    D]``; the queries are the last ``S`` of the ``K`` positions (causal).
    """
    B, Hq, S, D = query.shape
    K = key.shape[2]
    first = max(0, sink + local - (K - S))
    if first >= S:
        return
    g = Hq // key.shape[1]
    k_all = key.float().repeat_interleave(g, dim=1)
    v_all = value.float().repeat_interleave(g, dim=1)
    for s0 in range(first, S, query_block):
        s1 = min(S, s0 + query_block)
        # only the sink keys and the keys of the block's local band can be seen
        band0 = max(sink, s0 + (K - S) - local + 1)
        kpos = torch.cat([torch.arange(min(sink, K), device=query.device),
                          torch.arange(band0, s1 + (K - S), device=query.device)])
        k, v = k_all[:, :, kpos], v_all[:, :, kpos]
        qpos = torch.arange(s0, s1, device=query.device)[:, None] + (K - S)
        kpos = kpos[None, :]
        allowed = (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < local))
        logits = torch.matmul(query[:, :, s0:s1].float(), k.transpose(-1, -2)) * scaling
        w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        yield s0, s1, torch.matmul(w, v).transpose(1, 2)  # [B, rows, Hq, D]


class Gate:
    """Per-(layer, KV head) gate ``alpha`` ``[num_layers, num_kv_heads]`` between full causal
    attention and sink + local streaming attention.

    ``exact=False`` (the probe): written ``full + (alpha - 1) * (full - stream)`` with the
    difference detached: exact in value, and at alpha = 1 exact in gradient too (the streaming
    branch has weight 0 there, so nothing flows through it), so only the full branch
    (memory-efficient SDPA) is differentiated. ``exact=True`` (training): both branches are
    differentiated, as gradients through later layers need once some alpha is below 1.
    """

    def __init__(self, alpha: torch.Tensor, sink: int, local: int, query_block: int = 512,
                 exact: bool = False):
        self.alpha, self.sink, self.local, self.query_block = alpha, sink, local, query_block
        self.exact = exact
        self.seen: set[int] = set()

    @torch.no_grad()
    def stream_minus_full(self, query, key, value, full, scaling):
        """``full - stream`` ``[B, S, Hq, D]`` float32, without gradient."""
        diff = torch.zeros_like(full, dtype=torch.float32)
        for s0, s1, stream in streaming_blocks(query, key, value, scaling, self.sink, self.local,
                                               self.query_block):
            diff[:, s0:s1] = full[:, s0:s1].detach().float() - stream
        return diff

    def stream(self, query, key, value, full, scaling):
        """The streaming output ``[B, S, Hq, D]`` float32, differentiable."""
        blocks = [rows for _, _, rows in streaming_blocks(query, key, value, scaling, self.sink,
                                                          self.local, self.query_block)]
        first = full.shape[1] - sum(b.shape[1] for b in blocks)
        return torch.cat([full[:, :first].float()] + blocks, dim=1)


GATES: list[Gate] = []


@contextmanager
def applied(gate: Gate):
    """``gate`` in force for the forwards (and backwards) inside the block."""
    GATES.append(gate)
    try:
        yield gate
    finally:
        GATES.remove(gate)


def check_seen(gate: Gate, n_layers: int, who: str = "The gates") -> None:
    """A model whose attention bypasses ``AttentionInterface`` would ignore the gate silently."""
    if len(gate.seen) != n_layers:
        raise RuntimeError(f"{who} saw {len(gate.seen)} of {n_layers} attention layers: "
                           "this model does not route attention through AttentionInterface.")


def gate_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    out, w = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if not GATES:
        return out, w
    gate = GATES[-1]
    idx = module.layer_idx
    gate.seen.add(idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    Hq, Hkv = query.shape[1], key.shape[1]
    if not gate.exact and not gate.alpha.requires_grad and bool((gate.alpha[idx] == 1).all()):
        return out, w  # every head of the layer full: the streaming branch has weight 0 (measuring probes)
    a = gate.alpha[idx].to(out.device, torch.float32).repeat_interleave(Hq // Hkv).view(1, 1, Hq, 1)
    if gate.exact:
        stream = gate.stream(query, key, value, out, scale)
        return (stream + a * (out.float() - stream)).to(out.dtype), w
    diff = gate.stream_minus_full(query, key, value, out, scale)
    return out + ((a - 1) * diff).to(out.dtype), w


AttentionInterface.register(GATE_ATTN, gate_attention)
AttentionMaskInterface.register(GATE_ATTN, sdpa_mask)


@contextmanager
def gated(model):
    """The model switched to the gate attention, in eval mode, its weights frozen; its attention
    implementation, mode and ``requires_grad`` flags are restored on exit (the caller's model is
    borrowed, not consumed)."""
    previous = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    set_attention_implementation(model, GATE_ATTN)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        set_attention_implementation(model, previous)
        model.train(was_training)
        for p, rq in zip(model.parameters(), req):
            p.requires_grad_(rq)
