"""Pages of the retrieval heads' KV: a page pool that grows by whole physical pages (the unit read
at decode), each split into logical pages summarised by per-channel key max and min
("hierarchical paging")."""

from __future__ import annotations

import torch

from . import ops


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PagePool:
    """The retrieval heads' KV of one layer: ``pool_k``/``pool_v`` ``[B, Hr, capacity, D]``, token
    t of a row at slot t, and the logical-page summaries ``kmax``/``kmin``
    ``[B, Hr, capacity // logical_page_size, D]``. An empty logical page holds -inf / +inf, so
    folding a key in is a plain max / min."""

    # Decode appends grow the pool geometrically (an eighth) up to this many tokens at a time, in
    # whole pages: the concatenations amortise, and a long prompt is not charged a fraction of its
    # own size in unused pages.
    MAX_GROWTH = 1024

    def __init__(self, config):
        self.config = config
        self.pool_k = self.pool_v = self.kmax = self.kmin = None

    @property
    def capacity(self) -> int:
        return 0 if self.pool_k is None else self.pool_k.shape[2]

    @property
    def heads(self) -> int:
        return 0 if self.pool_k is None else self.pool_k.shape[1]

    def allocate(self, like: torch.Tensor, heads: int, tokens: int) -> None:
        """Empty pages for ``tokens`` tokens (rounded up to whole pages) of ``heads`` heads."""
        B, _, _, D = like.shape
        cap = round_up(max(tokens, 1), self.config.page_size)
        self.pool_k = like.new_zeros(B, heads, cap, D)
        self.pool_v = like.new_zeros(B, heads, cap, D)

    def prompt_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a prompt is written while it comes in: the pool itself (an offloaded pool: a
        GPU buffer, sent to host memory once the prompt is stored)."""
        return self.pool_k, self.pool_v

    def write(self, k: torch.Tensor, v: torch.Tensor, a: int, b: int) -> None:
        """Prompt tokens at slots [a, b), rows as given (left padding still in place)."""
        pk, pv = self.prompt_store()
        pk[:, :, a:b], pv[:, :, a:b] = k, v

    def shift_rows(self, idx: torch.Tensor, n: int) -> None:
        """Compact rows past their left padding: slot j of row b takes slot ``idx[b, j]``."""
        pk, pv = self.prompt_store()
        B, Hr, _, D = pk.shape
        gather = idx.view(B, 1, n, 1).expand(B, Hr, n, D)
        pk[:, :, :n] = torch.gather(pk[:, :, :n], 2, gather)
        pv[:, :, :n] = torch.gather(pv[:, :, :n], 2, gather)

    def needs_summaries(self, longest: int) -> bool:
        """Rows longer than the token budget select pages, from the summaries."""
        return longest > self.config.token_budget

    def summarize(self, lengths: torch.Tensor, longest: int) -> None:
        """Summaries of every logical page, once a row is longer than the budget (until then
        every page is read and summaries would only cost memory and updates)."""
        if self.needs_summaries(longest):
            self.kmax, self.kmin = ops.page_summaries(self.pool_k, lengths, self.config)

    def grow(self, needed: int, min_step: int = 0) -> bool:
        """Make room for ``needed`` tokens: grow by whole pages (at least ``min_step`` tokens) and
        extend the summaries with empty logical pages. Returns whether the stores moved."""
        extra = self._growth(needed, min_step)
        if not extra:
            return False
        B, Hr, _, D = self.pool_k.shape
        self.pool_k = torch.cat([self.pool_k, self.pool_k.new_zeros(B, Hr, extra, D)], dim=2)
        self.pool_v = torch.cat([self.pool_v, self.pool_v.new_zeros(B, Hr, extra, D)], dim=2)
        self._grow_summaries(extra)
        return True

    def _growth(self, needed: int, min_step: int) -> int:
        """Tokens to add for ``needed`` (0: they fit)."""
        cap = self.capacity
        if needed <= cap or self.pool_k is None:
            return 0
        step = max(min_step, min(cap // 8, self.MAX_GROWTH))
        return round_up(max(needed, cap + step), self.config.page_size) - cap

    def _grow_summaries(self, extra: int) -> None:
        if self.kmax is not None:
            B, Hr, _, D = self.kmax.shape
            nl = extra // self.config.logical_page_size
            self.kmax = torch.cat([self.kmax, self.kmax.new_full((B, Hr, nl, D), float("-inf"))], dim=2)
            self.kmin = torch.cat([self.kmin, self.kmin.new_full((B, Hr, nl, D), float("inf"))], dim=2)

    def token_range(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens [a, b) of every row, on the model's device (views here)."""
        return self.pool_k[:, :, a:b], self.pool_v[:, :, a:b]

    def decode_view(self, pages: torch.Tensor, lengths: torch.Tensor):
        """What a decode step reads its retrieval heads from: (keys, values, page list, None),
        the pool itself; an offloaded pool gives its GPU page cache and slot ids instead, with
        the lengths and pages that locate their tokens (``offload.HostPagePool.decode_view``)."""
        return self.pool_k, self.pool_v, pages, None

    def append(self, kr: torch.Tensor, vr: torch.Tensor, pos: torch.Tensor | None, at: int | None = None) -> None:
        """Write S new tokens per row at token positions ``pos`` ``[B, S]`` and fold their keys
        into the summaries (the pool must already hold them: :meth:`grow`). ``at``: instead of
        ``pos``, the one position of every row's single new token, known on the host."""
        B, Hr, S, D = kr.shape
        if at is not None:
            self.pool_k[:, :, at].copy_(kr[:, :, 0])
            self.pool_v[:, :, at].copy_(vr[:, :, 0])
            if self.kmax is not None:
                lp = at // self.config.logical_page_size
                new = kr[:, :, 0].to(self.kmax.dtype)
                self.kmax[:, :, lp] = torch.maximum(self.kmax[:, :, lp], new)
                self.kmin[:, :, lp] = torch.minimum(self.kmin[:, :, lp], new)
            return
        idx = pos.view(B, 1, S, 1).expand(B, Hr, S, D)
        self.pool_k.scatter_(2, idx, kr)
        self.pool_v.scatter_(2, idx, vr)
        if self.kmax is not None:
            ops.update_summaries(self.kmax, self.kmin, kr, pos, self.config)

    def crop(self, lengths: torch.Tensor, shortest: int, longest: int) -> None:
        """Forget tokens past ``lengths`` (each row's length after a crop; ``shortest`` its host
        minimum, ``longest`` the host maximum before the crop). Their slots stay as they are
        (nothing past a row's length is read); the logical pages they touched are summarised
        again from the tokens that remain."""
        if not self.heads or longest <= shortest or self.kmax is None:
            return
        lp = self.config.logical_page_size
        a, b = (shortest // lp) * lp, round_up(longest, lp)
        kmax, kmin = ops.page_summaries(self.token_range(a, b)[0], (lengths - a).clamp(min=0), self.config)
        self.kmax[:, :, a // lp:b // lp], self.kmin[:, :, a // lp:b // lp] = kmax, kmin

    def tensors(self) -> dict:
        return {n: getattr(self, n) for n in ("pool_k", "pool_v", "kmax", "kmin")}

    def apply(self, fn) -> None:
        for name, t in self.tensors().items():
            if t is not None:
                setattr(self, name, fn(t))

    def stored_bytes(self, stored: int) -> int:
        """Bytes of ``stored`` tokens per row and of the summaries of their logical pages."""
        if not self.heads:
            return 0
        B, Hr, _, D = self.pool_k.shape
        per = D * self.pool_k.element_size() * B * Hr
        pages = -(-stored // self.config.logical_page_size) if self.kmax is not None else 0
        return 2 * per * stored + 2 * pages * D * self.kmax.element_size() * B * Hr if pages else 2 * per * stored

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)
