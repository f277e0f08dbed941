"""The host side of a cache's forwards: one ``DecodeStep`` per ``LServeCache`` owns everything the
host knows without reading the device, and decides what each forward is.

A forward of a patched decoder is one of:
- ``prefill``: the prompt in one pass (its keys are attended as given, then stored);
- ``chunk``: one chunk of a prompt announced by :meth:`DecodeStep.announce_prompt` (it attends to
  the prompt stored so far with the prefill masks);
- ``decode``: one new token per row (streaming heads read sink + ring, retrieval heads their
  pages; at a *selecting* step the pages are chosen again, else the last choice is reused);
- ``extend``: several tokens appended to a stored prompt (retrieval heads causal over the pool,
  streaming heads as decode would see them token by token).

The device side of a forward (row lengths, stores, selections) changes only inside the forward;
the host side (this object) changes only in :meth:`begin` and :meth:`end`, around it. So a CUDA
graph that replays a decode step replays all of its device work, and the host bookkeeping runs
the same way for an eager step and a replay.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Forward:
    """What one forward does, fixed when it begins."""

    kind: str            # "prefill", "chunk", "decode" or "extend"
    new: int             # tokens per row this forward feeds (padding included)
    before: int          # positions fed before it (generate()'s count)
    longest: int         # host max over rows of tokens stored once it has run
    selects: bool        # a decode step that chooses its pages (else it reuses them)
    uniform: bool = False   # every row held as many tokens before it: row b's new tokens sit at
    #                         token positions longest - new .. longest - 1, a host fact
    # what every layer of this forward computes alike from the row lengths on the torch path
    # (the streaming slots' mask, the drift test's RoPE angles), computed by the first layer that
    # needs it: the torch path's per-layer work is mostly small ops
    memo: dict = field(default_factory=dict, compare=False, repr=False)


class DecodeStep:
    """Host bookkeeping of one cache: positions fed, tokens per row (host bounds), the decode step
    counter and the decision which steps choose every head's pages from scratch (one in
    ``interval``: ``LServeConfig.refresh_interval``; between them a "drift" selector decides per
    head, on the device)."""

    def __init__(self, interval: int):
        self.interval = interval
        self.seen = 0           # positions fed, padding included (what generate() counts)
        self.longest = 0        # host copy of lengths.max(): growth needs no device sync
        self.shortest = 0       # host copy of lengths.min(): past the sink, no sink write
        self.steps = 0          # decode steps since the pages were last chosen from scratch
        self.prompt_total = None  # tokens of the prompt being prefilled in chunks
        self.current: Forward | None = None

    @property
    def stored(self) -> bool:
        """A prompt has been stored (decode and extend forwards may follow)."""
        return self.seen > 0 and self.prompt_total is None

    def announce_prompt(self, total: int) -> None:
        """The next forwards bring a prompt of ``total`` tokens in several chunks."""
        if self.seen:
            raise ValueError("a prompt can be announced only to an empty cache")
        self.prompt_total = total

    def selects_next(self) -> bool:
        return self.steps % self.interval == 0

    def begin(self, new: int) -> Forward:
        """The forward about to run feeds ``new`` positions per row."""
        if self.current is not None:
            raise RuntimeError("LServeCache: a forward began before the previous one ended (a cache "
                               "shared by two forwards at once, e.g. from two threads?)")
        if self.prompt_total is not None:
            kind = "chunk"
            if self.seen + new > self.prompt_total:
                raise ValueError(f"A prompt chunk ends at token {self.seen + new}, past the "
                                 f"{self.prompt_total} tokens announced for this chunked prefill.")
            longest = self.seen + new
        elif self.seen == 0:
            kind, longest = "prefill", new
        else:
            kind, longest = ("decode" if new == 1 else "extend"), self.longest + new
        self.current = Forward(kind, new, self.seen, longest, kind == "decode" and self.selects_next(),
                               uniform=kind in ("decode", "extend") and self.shortest == self.longest)
        return self.current

    @contextmanager
    def segment(self, before: int, new: int):
        """Within the forward of a whole announced prompt (``begin(total)``), the layer about to
        run sees the chunk [before, before + new) as its forward: a prefill run layer by layer
        (``lserve_hf.segmented``), every chunk through one layer before the next layer."""
        whole = self.current
        self.current = Forward("chunk", new, before, before + new, False)
        try:
            yield self.current
        finally:
            self.current = whole

    def end(self, shortest: int | None = None, longest: int | None = None) -> None:
        """The forward ran. A prompt's last forward passes the rows' (shortest, longest) lengths
        once padding is known; other forwards add their tokens to every row."""
        f = self.current
        self.current = None
        self.seen += f.new
        if f.kind in ("prefill", "chunk"):
            if shortest is not None:          # the whole prompt is stored
                self.prompt_total = None
                self.shortest, self.longest, self.steps = shortest, longest, 0
            return
        self.shortest += f.new
        self.longest += f.new
        if f.kind == "decode":
            self.steps += 1
        else:
            self.steps = 0    # an appended chunk: choose pages afresh at the next step

    def abort(self) -> None:
        """A forward raised: forget it (the cache's device state may be partial)."""
        self.current = None

    def crop(self, n: int) -> None:
        """The newest ``n`` positions of every row were dropped."""
        self.seen -= n
        self.shortest -= n
        self.longest -= n
        self.steps = 0

    def select_rows(self, shortest: int, longest: int) -> None:
        self.shortest, self.longest = shortest, longest
