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


def streaming_decode_slots(lengths: torch.Tensor, sink: int, local: int, window: int | None = None,
                           slots: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool ``[B, sink + local]``: which sink/ring slots a streaming head attends to (of the
    ``slots`` = (sink slots, ring slots) held, when the buffers hold fewer).

    A ring slot whose token also sits in the sink buffer is skipped, so no key counts twice.
    ``window`` (Mistral's sliding window) further hides tokens older than the newest ``window``."""
    n_sink, n_ring = (sink, local) if slots is None else slots
    s_tok = torch.arange(n_sink, device=lengths.device).view(1, n_sink)
    s = s_tok < lengths.view(-1, 1)
    r = ring_tokens(lengths, local)[:, :n_ring]
    r_ok = (r >= sink) & (r >= 0)
    if window is not None:
        oldest = lengths.view(-1, 1) - window
        s, r_ok = s & (s_tok >= oldest), r_ok & (r >= oldest)
    return torch.cat([s, r_ok], dim=1)


def fill_sink_and_ring(keys: torch.Tensor, lengths: torch.Tensor, sink: int, local: int,
                       slots: int | None = None):
    """Sink and ring buffers of a prefill: keys ``[B, H, T, D]`` hold each row's tokens from
    slot 0 (left padding already removed), ``lengths[b]`` of them. Returns (sink_buf, ring_buf).
    ``slots``: the most tokens a row will hold while the buffers last; buffers get only the slots
    such rows can fill (``min(sink, slots)``, ``min(local, slots)``)."""
    B, H, T, D = keys.shape
    n_sink, n_ring = (sink, local) if slots is None else (min(sink, slots), min(local, slots))
    sink_buf = keys.new_zeros(B, H, n_sink, D)
    n = min(n_sink, T)
    sink_buf[:, :, :n] = keys[:, :, :n]
    tok = ring_tokens(lengths, local)[:, :n_ring].clamp(min=0)               # [B, n_ring]
    ring_buf = torch.gather(keys, 2, tok.clamp(max=T - 1).view(B, 1, n_ring, 1).expand(B, H, n_ring, D))
    return sink_buf, ring_buf


class StreamingStore:
    """The streaming heads' KV of one layer: sink buffers ``[B, Hs, sink, D]`` and ring buffers
    ``[B, Hs, local, D]`` for keys and values.

    A short prompt does not reserve the full window: the buffers hold only the slots its rows can
    fill (at most the ``slots`` given at :meth:`fill`) and :meth:`reserve` grows them, up to
    ``sink`` and ``local`` slots. Until the ring is full no token has wrapped around (token t
    sits at slot t), so growing keeps every token in place.

    ``before_chunk`` holds the ring as it was before the current multi-token append (a chunk's
    queries must not see the ring slots its own tokens overwrote). ``undo_k``/``undo_v`` (made by
    :meth:`keep_undo`) keep the ring entries the newest appended tokens overwrote, so that
    :meth:`crop` can give them back (assisted decoding rejects drafted tokens)."""

    UNDO_TOKENS = 64   # rejected draft tokens a crop can roll back

    def __init__(self, sink: int, local: int):
        self.sink, self.local = sink, local
        self.sink_k = self.sink_v = self.ring_k = self.ring_v = None
        self.before_chunk = None
        self.undo_k = self.undo_v = None
        self.undo_from = 0     # tokens stored when the undo log started: crops may not go below

    @property
    def heads(self) -> int:
        return 0 if self.ring_k is None else self.ring_k.shape[1]

    @property
    def slots(self) -> tuple[int, int]:
        """(sink slots, ring slots) held now (at most ``sink`` and ``local``)."""
        return (0, 0) if self.ring_k is None else (self.sink_k.shape[2], self.ring_k.shape[2])

    def fill(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, slots: int,
             record_past: bool = False) -> None:
        """From a prompt ``[B, Hs, T, D]`` whose rows start at slot 0, ``lengths[b]`` tokens each;
        ``slots``: tokens per row to make room for (the prompt's, or what generate() will reach).
        ``record_past``: also log what the prompt's newest tokens overwrote in the ring (the token
        ``local`` places before each), so a crop right after the prompt can give it back."""
        self.sink_k, self.ring_k = fill_sink_and_ring(keys, lengths, self.sink, self.local, slots)
        self.sink_v, self.ring_v = fill_sink_and_ring(values, lengths, self.sink, self.local, slots)
        self.undo_k = self.undo_v = None
        if record_past:
            B, Hs, T, D = keys.shape
            U = self.UNDO_TOKENS
            t = lengths.view(B, 1) - U + torch.arange(U, device=keys.device).view(1, U)   # [B, U]
            src = (t - self.local).clamp(0, T - 1).view(B, 1, U, 1).expand(B, Hs, U, D)
            slot = torch.remainder(t, U).view(B, 1, U, 1).expand(B, Hs, U, D)
            self.undo_k = keys.new_zeros(B, Hs, U, D).scatter_(2, slot, torch.gather(keys, 2, src))
            self.undo_v = values.new_zeros(B, Hs, U, D).scatter_(2, slot, torch.gather(values, 2, src))
            self.undo_from = 0

    def reserve(self, tokens: int) -> bool:
        """Make room for rows of ``tokens`` tokens (doubling, up to the full window). Returns
        whether the buffers moved (captured decode graphs hold their addresses)."""
        if not self.heads:
            return False
        n_sink, n_ring = self.slots
        want_sink, want_ring = min(self.sink, tokens), min(self.local, tokens)
        if want_sink <= n_sink and want_ring <= n_ring:
            return False
        grow_sink = max(n_sink, min(self.sink, max(want_sink, 2 * n_sink)))
        grow_ring = max(n_ring, min(self.local, max(want_ring, 2 * n_ring)))

        def pad(t, n):
            return t if t.shape[2] == n else torch.cat([t, t.new_zeros(*t.shape[:2], n - t.shape[2], t.shape[3])], 2)
        self.sink_k, self.sink_v = pad(self.sink_k, grow_sink), pad(self.sink_v, grow_sink)
        self.ring_k, self.ring_v = pad(self.ring_k, grow_ring), pad(self.ring_v, grow_ring)
        return True

    def keep_undo(self, stored: int) -> bool:
        """Start logging overwritten ring entries; ``stored``: tokens per row now (the host's
        longest). Returns whether a log was made (stores that a captured graph lacks)."""
        if self.undo_k is not None or not self.heads:
            return False
        B, Hs, _, D = self.ring_k.shape
        self.undo_k = self.ring_k.new_zeros(B, Hs, self.UNDO_TOKENS, D)
        self.undo_v = torch.zeros_like(self.undo_k)
        self.undo_from = stored
        return True

    def append(self, ks: torch.Tensor, vs: torch.Tensor, pos: torch.Tensor | None, past_sink: bool,
               at: int | None = None) -> None:
        """Write S new tokens per row at token positions ``pos`` ``[B, S]``. ``past_sink``: every
        row already holds ``sink`` tokens (a host fact), so the sink buffer is not touched.
        ``at``: instead of ``pos``, the one position of every row's single new token (host)."""
        B, Hs, S, D = ks.shape
        self.before_chunk = (self.ring_k.clone(), self.ring_v.clone()) if S > 1 else None
        n_sink = self.sink_k.shape[2]
        if at is not None:
            if at < n_sink:
                self.sink_k[:, :, at].copy_(ks[:, :, 0])
                self.sink_v[:, :, at].copy_(vs[:, :, 0])
            slot = at % self.local
            if self.undo_k is not None:
                self.undo_k[:, :, at % self.UNDO_TOKENS].copy_(self.ring_k[:, :, slot])
                self.undo_v[:, :, at % self.UNDO_TOKENS].copy_(self.ring_v[:, :, slot])
            self.ring_k[:, :, slot].copy_(ks[:, :, 0])
            self.ring_v[:, :, slot].copy_(vs[:, :, 0])
            return
        if n_sink and not past_sink:
            in_sink = (pos < n_sink).view(B, 1, S, 1)
            slot = pos.clamp(max=n_sink - 1).view(B, 1, S, 1).expand(B, Hs, S, D)
            # rows past the sink write a slot's own value back
            self.sink_k.scatter_(2, slot, torch.where(in_sink, ks, self.sink_k.gather(2, slot)))
            self.sink_v.scatter_(2, slot, torch.where(in_sink, vs, self.sink_v.gather(2, slot)))
        n = min(S, self.local)   # only the newest `local` tokens can survive in the ring
        slot = torch.remainder(pos[:, S - n:], self.local).view(B, 1, n, 1).expand(B, Hs, n, D)
        if S > self.local:
            # tokens of this chunk never reach the ring, so no crop could restore them
            self.undo_k = self.undo_v = None
        if self.undo_k is not None:
            u = torch.remainder(pos[:, S - n:], self.UNDO_TOKENS).view(B, 1, n, 1).expand(B, Hs, n, D)
            self.undo_k.scatter_(2, u, self.ring_k.gather(2, slot))
            self.undo_v.scatter_(2, u, self.ring_v.gather(2, slot))
        self.ring_k.scatter_(2, slot, ks[:, :, S - n:])
        self.ring_v.scatter_(2, slot, vs[:, :, S - n:])

    def crop(self, lengths: torch.Tensor, n: int, stored: int) -> None:
        """Drop the newest ``n`` tokens of every row (``lengths`` before the crop, ``stored`` its
        host maximum): ring slots they overwrote get their old tokens back from the undo log."""
        if not self.heads or n == 0:
            return
        if self.undo_k is None or stored - n < max(self.undo_from, stored - self.UNDO_TOKENS):
            raise ValueError(
                f"A streaming ring cannot give back {n} tokens: it keeps the {self.UNDO_TOKENS} newest "
                "overwritten tokens, logged from the first multi-token forward of at most decode_local "
                f"tokens on. Assisted decoding works with drafts of up to {self.UNDO_TOKENS} tokens.")
        B, Hs, _, D = self.ring_k.shape
        for i in range(n):        # newest first: a slot overwritten twice gets its oldest token back
            t = (lengths - 1 - i).view(B, 1, 1, 1).expand(B, Hs, 1, D)
            slot, u = torch.remainder(t, self.local), torch.remainder(t, self.UNDO_TOKENS)
            self.ring_k.scatter_(2, slot, self.undo_k.gather(2, u))
            self.ring_v.scatter_(2, slot, self.undo_v.gather(2, u))

    def tensors(self) -> dict:
        return {n: getattr(self, n) for n in ("sink_k", "sink_v", "ring_k", "ring_v", "undo_k", "undo_v")}

    def apply(self, fn) -> None:
        """Apply a batch operation (reorder, repeat, select rows) to every tensor."""
        for name, t in self.tensors().items():
            if t is not None:
                setattr(self, name, fn(t))

    def stored_bytes(self, stored: int) -> int:
        """Bytes of the live tokens of a row of ``stored`` tokens: its sinks and its window."""
        if not self.heads:
            return 0
        B, Hs, _, D = self.ring_k.shape
        live = min(stored, self.sink) + min(max(stored - self.sink, 0), self.local)
        live = min(live, sum(self.slots))
        return 2 * B * Hs * live * D * self.ring_k.element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)
