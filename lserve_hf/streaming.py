"""Streaming heads: attention sinks plus a local window, stored as a sink buffer and a ring buffer.

Token t (counted from the row's first real token) lives in the sink buffer at slot t when
t < sink, and in the ring buffer at slot t % local while it is among the ``local`` newest tokens.
So the KV memory of a streaming head is ``sink + local`` tokens whatever the context length.
"""

from __future__ import annotations

import torch


def ring_tokens(lengths: torch.Tensor, local: int) -> torch.Tensor:
    """Token index held by each ring slot, ``[B, local]`` (negative: never written)."""
    j = torch.arange(local, device=lengths.device).view(1, local)
    last = lengths.view(-1, 1) - 1
    return last - torch.remainder(last - j, local)


def streaming_decode_slots(lengths: torch.Tensor, sink: int, local: int, window: int | None = None) -> torch.Tensor:
    """Bool ``[B, sink + local]``: which sink/ring slots a streaming head attends to.

    A ring slot whose token also sits in the sink buffer is skipped, so no key counts twice.
    ``window`` (Mistral's sliding window) further hides tokens older than the newest ``window``."""
    s_tok = torch.arange(sink, device=lengths.device).view(1, sink)
    s = s_tok < lengths.view(-1, 1)
    r = ring_tokens(lengths, local)
    r_ok = (r >= sink) & (r >= 0)
    if window is not None:
        oldest = lengths.view(-1, 1) - window
        s, r_ok = s & (s_tok >= oldest), r_ok & (r >= oldest)
    return torch.cat([s, r_ok], dim=1)


def fill_sink_and_ring(keys: torch.Tensor, lengths: torch.Tensor, sink: int, local: int):
    """Sink and ring buffers of a prefill: keys ``[B, H, T, D]`` hold each row's tokens from
    slot 0 (left padding already removed), ``lengths[b]`` of them. Returns (sink_buf, ring_buf)."""
    B, H, T, D = keys.shape
    sink_buf = keys.new_zeros(B, H, sink, D)
    n = min(sink, T)
    sink_buf[:, :, :n] = keys[:, :, :n]
    tok = ring_tokens(lengths, local).clamp(min=0)                       # [B, local]
    ring_buf = torch.gather(keys, 2, tok.clamp(max=T - 1).view(B, 1, local, 1).expand(B, H, local, D))
    return sink_buf, ring_buf
