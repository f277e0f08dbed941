"""LServe's knobs, each documented with its published default and why it exists."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LServeConfig:
    """Configuration of LServe unified sparse attention (arXiv 2502.14866).

    Static sparsity (streaming heads, from DuoAttention):
        streaming_sparsity: fraction of all KV heads of the model that become streaming heads
            (default 0.5). The threshold is the global quantile of the head scores, so layers
            get uneven counts by design. 0 keeps every head a retrieval head (no pattern needed);
            1 makes every head stream.
        prefill_sink / prefill_local: attention sinks and local window (tokens, the current one
            included) of streaming heads during prefill. Published: 128 / 8192.
        decode_sink / decode_local: the same during decoding. They size the streaming heads'
            constant KV cache (sink buffer + ring buffer). Published: 128 / 256.

    Dynamic sparsity (query-aware page selection on retrieval heads, from Quest):
        page_size: physical KV page in tokens (default 64); the unit of selection and reading.
        logical_page_size: tokens per key min/max summary (default 16). Smaller logical pages give
            tighter upper bounds; ``page_size`` must be a multiple of it ("hierarchical paging").
        token_budget: tokens a retrieval head reads per decode step (default 4096). A context within
            the budget is attended densely. Must be a multiple of ``page_size``.
        selector_interval: decode steps a page selection is reused for (default 4); the newest
            page is attended at every step regardless.
        dense_layers: layer indices kept fully dense (no streaming heads, no page selection).
            Quest keeps layers 0 and 1 dense; LServe exempts none by default.

    Execution:
        backend: "auto" (Triton kernels on CUDA, torch reference elsewhere), "triton" or "torch".
        prefill_query_block: queries per block in the torch reference prefill; bounds its
            activation memory to ``heads * block * context`` scores.
        prefill_chunk_size: a prompt longer than this many tokens is prefilled in chunks of this
            size (each chunk attends to the cache so far), so activation memory stays bounded by the
            chunk, not the prompt. None: one pass. Default 16384.
        cuda_graphs: on CUDA, replay each decode step of the whole decoder as a CUDA graph (two
            graphs: a step that selects pages and a step that reuses them). Removes the Python and
            launch overhead that otherwise dominates time per token. Ignored on CPU.
    """

    streaming_sparsity: float = 0.5
    prefill_sink: int = 128
    prefill_local: int = 8192
    decode_sink: int = 128
    decode_local: int = 256
    page_size: int = 64
    logical_page_size: int = 16
    token_budget: int = 4096
    selector_interval: int = 4
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    backend: str = "auto"
    prefill_query_block: int = 1024
    prefill_chunk_size: int | None = 16384
    cuda_graphs: bool = True

    def __post_init__(self):
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if not 0.0 <= float(self.streaming_sparsity) <= 1.0:
            raise ValueError(
                f"streaming_sparsity={self.streaming_sparsity} is outside [0, 1]: it is the fraction of "
                "KV heads that stream; use e.g. 0.5 (half the heads) or 0 (no streaming heads)."
            )
        for name in ("prefill_sink", "decode_sink"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (number of attention-sink tokens).")
        for name in ("prefill_local", "decode_local", "page_size", "logical_page_size",
                     "selector_interval", "prefill_query_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.page_size % self.logical_page_size:
            raise ValueError(
                f"page_size={self.page_size} is not a multiple of logical_page_size={self.logical_page_size}: "
                f"choose e.g. page_size={self.logical_page_size * max(1, round(self.page_size / self.logical_page_size))}."
            )
        if self.token_budget < self.page_size or self.token_budget % self.page_size:
            fixed = max(1, round(self.token_budget / self.page_size)) * self.page_size
            raise ValueError(
                f"token_budget={self.token_budget} is not a positive multiple of page_size={self.page_size}: "
                f"use token_budget={fixed}."
            )
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size={self.prefill_chunk_size} must be a positive number of "
                             "tokens, or None to prefill in one pass.")
        if any(i < 0 for i in self.dense_layers):
            raise ValueError(f"dense_layers={self.dense_layers} holds a negative layer index.")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend={self.backend!r} is not one of 'auto', 'triton', 'torch'.")

    @property
    def logical_per_page(self) -> int:
        return self.page_size // self.logical_page_size

    @property
    def pages_per_selection(self) -> int:
        """Physical pages a retrieval query head reads when the context exceeds the budget
        (the spec's k + 1: at least 3, the last page included)."""
        return max(3, self.token_budget // self.page_size)
