"""The masks a prompt can come with, and the attention of prompts whose mask LServe's kernels do
not express.

The fast paths (Triton kernels and the block-wise torch reference) take a causal mask with each
row's left padding (``kv_start``) and Mistral's sliding window. Transformers accepts more, and a
patched model must give the same answer: a 2-D mask with right padding or holes, a custom 4-D
mask, or packed sequences (``position_ids`` restarting at 0, no mask, no cache, as Transformers
detects them). Those prompts are attended here, densely in torch, with LServe's rule on top: a
streaming head sees the first ``sink`` keys its query may see and the ``local`` most recent ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .reference import sdpa


@dataclass(frozen=True)
class PromptMask:
    """What masks a forward's queries, found once per forward by :func:`prompt_mask`.

    kv_start: ``[B]`` each row's left padding (the fast paths), or None.
    key_valid: ``[B, N]`` bool, a 2-D mask that is not left padding (right padding, holes).
    segments: ``[B, N]`` packed sequence ids (queries see keys of their own sequence only).
    custom: a 4-D mask ``[B, 1 or Hq, S, N]`` as given (bool: True attends; float: added).
    why: what makes it general, for messages."""

    kv_start: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    custom: torch.Tensor | None = None
    why: str = ""
    # masks of this forward's query blocks, made by the first layer and reused by the others
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def general(self) -> bool:
        return self.key_valid is not None or self.segments is not None or self.custom is not None


def prompt_mask(attention_mask, position_ids, n_new: int, appending: bool, cached: bool) -> PromptMask:
    """Classify a forward's mask once (a device sync when a 2-D mask is given).

    ``appending``: the forward adds tokens to a stored prompt, whose padding is already known;
    its new tokens must all be real. ``cached``: the forward has a cache (Transformers then does
    not look for packed sequences)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if appending:
            raise ValueError("LServe decodes from its cache with the padding it stored: pass a 2-D "
                             "attention_mask (or none) to forwards that add tokens to a cache.")
        return PromptMask(custom=attention_mask, why="a custom 4-D attention_mask")
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, positions] or 4-D, got {attention_mask.dim()}-D.")
        m = attention_mask.bool()
        if appending:
            if not bool(m[:, -n_new:].all()):
                raise ValueError("A token added to an LServeCache has attention_mask 0: LServe stores padding only "
                                 "on the left of the prompt. Pass 1 for every new token.")
            return PromptMask()
        if bool((m[:, 1:] >= m[:, :-1]).all()):
            kv_start = (~m).sum(1)
            return PromptMask(kv_start=kv_start if bool(kv_start.any()) else None)
        return PromptMask(key_valid=m, why="an attention_mask with right padding or holes")
    if position_ids is not None and not cached and n_new > 1:
        from transformers.masking_utils import find_packed_sequence_indices

        segments = find_packed_sequence_indices(position_ids.view(-1, position_ids.shape[-1]))
        if segments is not None:
            return PromptMask(segments=segments, why="packed sequences (position_ids restarting)")
    return PromptMask()


def _allowed(mask: PromptMask, B: int, q_pos: torch.Tensor, N: int, device, window) -> tuple:
    """(allowed ``[B, 1|H, S, N]`` bool, additive bias or None) of the queries at ``q_pos``."""
    k_pos = torch.arange(N, device=device)
    if mask.custom is not None:
        c = mask.custom.to(device)[..., -q_pos.numel():, -N:]
        if c.dtype == torch.bool:
            return c, None
        return c > torch.finfo(c.dtype).min / 2, c
    ok = (k_pos.view(1, 1, 1, N) <= q_pos.view(1, 1, -1, 1)).expand(B, 1, -1, N)
    if window is not None:
        ok = ok & (q_pos.view(1, 1, -1, 1) - k_pos.view(1, 1, 1, N) < window)
    if mask.kv_start is not None:
        ok = ok & (k_pos.view(1, 1, 1, N) >= mask.kv_start.to(device).view(B, 1, 1, 1))
    if mask.key_valid is not None:
        ok = ok & mask.key_valid.to(device)[:, -N:].view(B, 1, 1, N)
    if mask.segments is not None:
        seg = mask.segments.to(device).expand(B, -1)
        ok = ok & (seg[:, -q_pos.numel():].view(B, 1, -1, 1) == seg.view(B, 1, 1, N))
    return ok, None


def general_prefill(q, k, v, streaming, sink, local, q_offset, mask: PromptMask, scale, window=None,
                    dropout: float = 0.0, query_block: int = 1024, return_weights: bool = False):
    """Prefill attention under a general mask: ``[B, Hq, S, D]`` (and the weights
    ``[B, Hq, S, N]`` with ``return_weights``). A streaming head's sink is the first ``sink`` keys
    its query may see under the mask (a packed sequence's first tokens, a row's first real
    tokens); its window the ``local`` newest positions."""
    B, Hq, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    stream_q = streaming.to(q.device).repeat_interleave(G).view(1, Hq, 1, 1)
    out = torch.empty_like(q)
    weights = q.new_zeros(B, Hq, S, N) if return_weights else None
    k_pos = torch.arange(N, device=q.device)
    for s0 in range(0, S, query_block):
        s1 = min(S, s0 + query_block)
        q_pos = torch.arange(q_offset + s0, q_offset + s1, device=q.device)
        ok, bias = _allowed(mask, B, q_pos, N, q.device, window)
        # a key's rank among the keys its query may see: the first `sink` of them are sinks
        rank = ok.long().cumsum(-1)
        near = (q_pos.view(1, 1, -1, 1) - k_pos.view(1, 1, 1, N)) < local
        ok = ok & (~stream_q | (rank <= sink) | near)
        seen = ok.any(-1, keepdim=True)
        attn = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~ok, float("-inf"))
        if bias is not None:
            attn = attn + bias.to(q.dtype)
        attn = torch.where(seen, attn, 0.0)
        qb = q[:, :, s0:s1]
        if return_weights:
            scores = torch.matmul(qb.float(), k.float().repeat_interleave(G, 1).transpose(-1, -2)) * scale
            p = torch.softmax(scores + attn.float(), dim=-1)
            p = torch.where(seen, p, 0.0)
            if dropout:
                p = F.dropout(p, dropout)
            weights[:, :, s0:s1] = p.to(q.dtype)
            o = torch.matmul(p, v.float().repeat_interleave(G, 1)).to(q.dtype)
        else:
            o = sdpa(qb, k, v, attn, scale, dropout)
        out[:, :, s0:s1] = torch.where(seen, o, 0.0)
    return (out, weights) if return_weights else out
