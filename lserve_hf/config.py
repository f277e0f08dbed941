"""LServe's knobs, each documented with its published default and why it exists."""

from __future__ import annotations

import dataclasses
import logging
import numbers
from dataclasses import dataclass, field

logger = logging.getLogger("lserve_hf")

# Published defaults (LServe, arXiv 2502.14866): they assume contexts of 128K tokens and more.
PUBLISHED = dict(prefill_local=8192, token_budget=4096)


@dataclass
class LServeConfig:
    """Configuration of LServe unified sparse attention (arXiv 2502.14866). Immutable: use
    ``dataclasses.replace(config, field=value)`` for a variant, then ``patch_model`` again.

    Static sparsity (streaming heads, from DuoAttention):
        streaming_sparsity: fraction of all KV heads of the model that become streaming heads
            (default 0.5). The threshold is the global quantile of the head scores, so layers
            get uneven counts by design. 0 keeps every head a retrieval head (no pattern needed);
            1 makes every head stream.
        prefill_sink / prefill_local: attention sinks and local window (tokens, the current one
            included) of streaming heads during prefill. Published: 128 / 8192. ``prefill_local``
            None (default): the published 8192, scaled down for models with a short context (an
            eighth of ``max_position_embeddings``, at least 256), so that a model's own prompts
            run sparse; ``patch_model`` logs the value it chose.
        decode_sink / decode_local: the same during decoding. They size the streaming heads'
            constant KV cache (sink buffer + ring buffer). Published: 128 / 256.

    Dynamic sparsity (query-aware page selection on retrieval heads, from Quest):
        page_size: physical KV page in tokens (default 64); the unit of selection and reading.
        logical_page_size: tokens per key min/max summary (default 16). Smaller logical pages give
            tighter upper bounds; ``page_size`` must be a multiple of it ("hierarchical paging").
        token_budget: tokens a retrieval head reads per decode step. A context within the budget
            is attended densely. A multiple of ``page_size``. None (default): the published 4096,
            scaled down for short-context models (a sixteenth of ``max_position_embeddings``, at
            least 4 pages); ``patch_model`` logs the value it chose.
        selector: how a page selection is kept between decode steps. "drift" (default): each
            retrieval query head keeps its selection while its query stays close to the query
            that made it (cosine of the two queries taken before RoPE, so that the position step
            does not count, at least ``selector_drift``), and chooses its pages afresh as soon as
            it drifts; every head chooses afresh every ``selector_max_age`` steps. On real prose
            this keeps the answers of a fresh selection at every step while choosing afresh in
            about a quarter of the head-steps (EVAL.md). "reuse": LServe's rule, every head
            reuses the selection for ``selector_interval`` steps (it loses answers on real prose:
            the query right after the prompt often looks elsewhere than the next ones).
        selector_drift: the cosine under which a query head chooses its pages afresh (default
            0.8; 1 re-selects at every step).
        selector_max_age: the most steps a "drift" selection is kept (default 16).
        selector_interval: decode steps a selection is reused for with ``selector="reuse"``
            (default 4, LServe's); the newest page is attended at every step regardless.
        dense_layers: layer indices kept fully dense (no streaming heads, no page selection).
            Quest keeps layers 0 and 1 dense; LServe exempts none by default.

    Execution:
        backend: "auto" (Triton kernels on CUDA, torch reference elsewhere), "triton" or "torch".
        prefill_query_block: queries per block in the torch reference prefill (default 256); bounds
            its activation memory to ``heads * block * context`` scores, and a streaming head's
            block reads only its sink and the window of the block's queries, so smaller blocks
            waste less of its work (CPU timings: BENCHMARKS.md, ``benchmarks/bench_cpu.py``).
        prefill_chunk_size: a prompt longer than this many tokens is prefilled in chunks of this
            size (each chunk attends to the cache so far), so activation memory stays bounded by the
            chunk, not the prompt. None: one pass. Default 16384.
        cuda_graphs: on CUDA, replay each decode step of the whole decoder as a CUDA graph (two
            graphs: a step that selects pages and a step that reuses them). Removes the Python and
            launch overhead that otherwise dominates time per token. Ignored on CPU.
        fused_norm_mlp: on CUDA with Triton (and backend not "torch"), run each RMSNorm and the
            MLP's SiLU-and-multiply of the decoder as one kernel each (``lserve_hf.fused_modules``)
            instead of Transformers' eight and two: Transformers' arithmetic, so results agree to
            the last place bar the order of a mean's additions. Default True; False keeps
            Transformers' modules. Training (a recorded gradient) and the CPU always run them.

    Dynamic block-sparse prefill (retrieval heads; MInference / FlexPrefill / XAttention style):
        prefill_dynamic: estimate, per retrieval KV head and query block, which key blocks hold
            the attention mass, and attend only to those at prefill (``lserve_hf.dynamic_prefill``).
            Off by default. On the embedded model's real-prose needles it gives as many answers
            as LServe without it at the default threshold (37 and 36 of 56, at most one case
            apart per length and seed; EVAL.md), but the default's accuracy and speed figures
            are measured without it. Dense layers (``dense_layers``), prompts of at most a few
            blocks and queries that see at most ``token_budget`` keys stay dense.
        dynamic_mass: estimated attention mass (cumulative, in (0, 1]) that the kept key blocks of
            a query block must hold (default 0.95). The first key block (attention sinks) and the
            diagonal band (the query block's own key blocks and the one before) are always kept.
        dynamic_min_density / dynamic_max_density: bounds (in [0, 1]) on the fraction of a query
            block's causal key blocks that is kept (defaults 0.05 / 1.0); the sink and diagonal
            blocks are kept even above the maximum.
        dynamic_dense_tail: a prompt's last this many queries (default 128; 0: none) keep every
            causal key block, whatever the estimate and ``dynamic_max_density``: a prompt's
            question usually sits at its end, and the first answer token is read from its last
            query. At long prompts that is one or two block rows of hundreds.
        dynamic_block: queries and keys per block of the estimate and of the key-block lists
            (default 128; a power of two >= 16). The kernel walks a listed block in its own key
            steps.

    Offload (SparseServe's hierarchical KV memory, ``lserve_hf.offload``):
        offload: None (default: every page in GPU memory) or "host": the retrieval heads' pages live
            in pinned host memory, and each (row, retrieval KV head) keeps the pages decode reads in
            a GPU page cache, loaded on a miss by a kernel that reads host memory directly. GPU
            memory then no longer grows with the context (summaries aside: 1/8 of the keys at 16-token
            logical pages). Dense layers keep their pages on the GPU (they read all of them).
        hbm_pages: pages per (row, retrieval KV head) in the GPU page cache, the newest page
            included (at most 65,535). None: 2x ``pages_per_selection``. Raised, if lower, to what
            one step can read (G query heads per KV head: ``G * pages_per_selection + 1``), so a
            step always fits. ``lserve_hf.hbm_pages_for(model, context, memory_bytes)`` gives the
            largest that fits a GPU memory budget; a large cache costs no more a step (victims
            come from a fixed-size window of slots) and starts primed with the newest pages.
        offload_policy: which cached page a miss replaces: "lru" (default: least recently read) or
            "frequency" (least often read since loaded, then least recently). They tie on the
            embedded model's selections; frequency misses less only where queries jump between
            selections (docs/offload.md).
    """

    streaming_sparsity: float = 0.5
    prefill_sink: int = 128
    prefill_local: int | None = None
    decode_sink: int = 128
    decode_local: int = 256
    page_size: int = 64
    logical_page_size: int = 16
    token_budget: int | None = None
    selector: str = "drift"
    selector_drift: float = 0.8
    selector_max_age: int = 16
    selector_interval: int = 4
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    backend: str = "auto"
    prefill_query_block: int = 256
    prefill_chunk_size: int | None = 16384
    cuda_graphs: bool = True
    fused_norm_mlp: bool = True
    prefill_dynamic: bool = False
    dynamic_mass: float = 0.95
    dynamic_min_density: float = 0.05
    dynamic_max_density: float = 1.0
    dynamic_block: int = 128
    dynamic_dense_tail: int = 128
    offload: str | None = None
    hbm_pages: int | None = None
    offload_policy: str = "lru"

    def __setattr__(self, name, value):
        if self.__dict__.get("_validated"):
            raise dataclasses.FrozenInstanceError(
                f"LServeConfig is immutable (cannot set {name}): use dataclasses.replace(config, "
                f"{name}=...) and patch the model again with the new config.")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"LServeConfig is immutable (cannot delete {name}).")

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "streaming_sparsity", _number("streaming_sparsity", self.streaming_sparsity))
        if not 0.0 <= self.streaming_sparsity <= 1.0:
            raise ValueError(
                f"streaming_sparsity={self.streaming_sparsity} is outside [0, 1]: it is the fraction of "
                "KV heads that stream; use e.g. 0.5 (half the heads) or 0 (no streaming heads).")
        for name, low in (("prefill_sink", 0), ("decode_sink", 0), ("prefill_local", 1),
                          ("decode_local", 1), ("page_size", 1), ("logical_page_size", 1),
                          ("selector_interval", 1), ("selector_max_age", 1), ("prefill_query_block", 1),
                          ("token_budget", 1), ("prefill_chunk_size", 1)):
            value = getattr(self, name)
            if value is None and name in ("prefill_local", "token_budget", "prefill_chunk_size"):
                continue
            set_(self, name, _integer(name, value, low))
        if self.page_size % self.logical_page_size:
            raise ValueError(
                f"page_size={self.page_size} is not a multiple of logical_page_size={self.logical_page_size}: "
                f"choose e.g. page_size={self.logical_page_size * max(1, round(self.page_size / self.logical_page_size))}.")
        if self.token_budget is not None and (self.token_budget < self.page_size
                                              or self.token_budget % self.page_size):
            fixed = max(1, round(self.token_budget / self.page_size)) * self.page_size
            raise ValueError(
                f"token_budget={self.token_budget} is not a positive multiple of page_size={self.page_size}: "
                f"use token_budget={fixed}.")
        if isinstance(self.dense_layers, (str, bytes)) or not _iterable(self.dense_layers):
            raise TypeError(f"dense_layers={self.dense_layers!r} must be a tuple of layer indices, "
                            "e.g. dense_layers=(0, 1).")
        layers = tuple(_integer("dense_layers", i, 0) for i in self.dense_layers)
        set_(self, "dense_layers", layers)
        if self.selector not in ("drift", "reuse"):
            raise ValueError(f"selector={self.selector!r} is not one of 'drift' (default) or 'reuse' (LServe's).")
        set_(self, "selector_drift", _number("selector_drift", self.selector_drift))
        if not -1.0 <= self.selector_drift <= 1.0:
            raise ValueError(f"selector_drift={self.selector_drift} is a cosine: choose it in [-1, 1] (e.g. 0.8).")
        if not isinstance(self.backend, str) or self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend={self.backend!r} is not one of 'auto', 'triton', 'torch'.")
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs={self.cuda_graphs!r} must be True or False.")
        if not isinstance(self.fused_norm_mlp, bool):
            raise TypeError(f"fused_norm_mlp={self.fused_norm_mlp!r} must be True or False.")
        self._check_dynamic()
        if self.offload not in (None, "host"):
            raise ValueError(f"offload={self.offload!r} is not None or 'host'.")
        if self.hbm_pages is not None:
            set_(self, "hbm_pages", _integer("hbm_pages", self.hbm_pages, 1))
            if self.hbm_pages > 65535:     # lserve_hf.page_cache.SLOT_BITS: a slot id fits 16 bits
                raise ValueError(f"hbm_pages={self.hbm_pages} is more than the page cache's 65535 slots per row "
                                 "and KV head (at 64-token pages, 4M tokens); lower it.")
        if self.offload_policy not in ("lru", "frequency"):
            raise ValueError(f"offload_policy={self.offload_policy!r} is not one of 'lru', 'frequency'.")
        set_(self, "_validated", True)

    def _check_dynamic(self):
        if not isinstance(self.prefill_dynamic, bool):
            raise TypeError(f"prefill_dynamic={self.prefill_dynamic!r} must be True or False.")
        for name in ("dynamic_mass", "dynamic_min_density", "dynamic_max_density"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if not 0.0 < self.dynamic_mass <= 1.0:
            raise ValueError(f"dynamic_mass={self.dynamic_mass} is outside (0, 1]: it is the share of the "
                             "estimated attention mass the kept key blocks hold; use e.g. 0.95.")
        lo, hi = self.dynamic_min_density, self.dynamic_max_density
        if not 0.0 <= lo <= hi <= 1.0 or hi == 0.0:
            raise ValueError(f"dynamic_min_density={lo} and dynamic_max_density={hi} must satisfy "
                             "0 <= min <= max <= 1 with max > 0 (fractions of the causal key blocks kept).")
        block = _integer("dynamic_block", self.dynamic_block, 1)
        if block < 16 or block & (block - 1):
            raise ValueError(f"dynamic_block={block} must be a power of two >= 16 (the kernel's "
                             "query and key blocks divide it); use e.g. 128.")
        object.__setattr__(self, "dynamic_block", block)
        object.__setattr__(self, "dynamic_dense_tail", _integer("dynamic_dense_tail", self.dynamic_dense_tail, 0))
        chunk = self.prefill_chunk_size
        if self.prefill_dynamic and chunk is not None and chunk % block:
            fixed = max(1, round(chunk / block)) * block
            raise ValueError(f"prefill_chunk_size={chunk} is not a multiple of dynamic_block={block}: with "
                             "prefill_dynamic a chunk would split query blocks that a prefill in one pass keeps "
                             f"whole, and the two would differ; use prefill_chunk_size={fixed}.")

    def __hash__(self):
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @property
    def refresh_interval(self) -> int:
        """Decode steps between two selections of every head from scratch."""
        return self.selector_max_age if self.selector == "drift" else self.selector_interval

    @property
    def logical_per_page(self) -> int:
        return self.page_size // self.logical_page_size

    @property
    def pages_per_selection(self) -> int:
        """Physical pages a retrieval query head reads when the context exceeds the budget
        (the spec's k + 1: at least 3, the last page included)."""
        return max(3, self._budget() // self.page_size)

    def _budget(self) -> int:
        if self.token_budget is None:
            raise ValueError("token_budget is not resolved yet: patch_model resolves it for the model "
                             "(or call config.resolved(max_context)).")
        return self.token_budget

    def resolved(self, max_context: int | None) -> LServeConfig:
        """This config with the fields left to None filled for a model whose context is
        ``max_context`` tokens (None: unknown, the published values)."""
        auto = {}
        if self.prefill_local is None:
            auto["prefill_local"] = PUBLISHED["prefill_local"] if not max_context else \
                max(256, min(PUBLISHED["prefill_local"], max_context // 8))
        if self.token_budget is None:
            budget = PUBLISHED["token_budget"] if not max_context else \
                min(PUBLISHED["token_budget"], max_context // 16)
            auto["token_budget"] = max(4, budget // self.page_size) * self.page_size
        return dataclasses.replace(self, **auto) if auto else self

    def unresolved_fields(self) -> tuple[str, ...]:
        return tuple(n for n in ("prefill_local", "token_budget") if getattr(self, n) is None)


def _iterable(x) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True


def _integer(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``; floats, strings and bools are refused by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer (got {type(value).__name__}).")
    value = int(value)
    if value < low:
        what = "an integer >= 0" if low == 0 else "a positive integer"
        raise ValueError(f"{name}={value} must be {what}.")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number (got {type(value).__name__}).")
    return float(value)
