"""Triton kernels of LServe unified sparse attention.

One file per kernel family, each with its launch wrapper, its launch plan (a frozen dataclass
with one measured default) and a pointer to its torch reference in ``lserve_hf.reference``; each
checked against that reference by ``tests/test_kernels.py``. The kernels take fp16, bf16 and
fp32 tensors (float64 goes to the reference). Importing this package never fails: without
Triton, ``TRITON_AVAILABLE`` is False and the names below are None (use the torch reference).
"""

try:
    import triton  # noqa: F401

    from .block_sparse_prefill import PrefillPlan, block_sparse_prefill, default_prefill_plan
    from .page_cache import PageCachePlan, append_tokens, load_pages, lookup_pages, prime_pages
    from .page_selector import DEFAULT_SELECT_PLAN, SelectPlan, query_drift, select_pages
    from .page_summary import build_page_summaries, update_page_summaries
    from .sparse_decode import DEFAULT_DECODE_PLAN, DecodePlan, sparse_paged_decode

    TRITON_AVAILABLE = True
except ImportError:  # triton missing (or too old to provide what the kernels use)
    block_sparse_prefill = select_pages = query_drift = build_page_summaries = None
    update_page_summaries = sparse_paged_decode = None
    PrefillPlan = default_prefill_plan = SelectPlan = DEFAULT_SELECT_PLAN = None
    DecodePlan = DEFAULT_DECODE_PLAN = None
    PageCachePlan = append_tokens = load_pages = lookup_pages = prime_pages = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "block_sparse_prefill", "build_page_summaries",
           "update_page_summaries", "select_pages", "query_drift", "sparse_paged_decode",
           "DecodePlan", "DEFAULT_DECODE_PLAN", "SelectPlan", "DEFAULT_SELECT_PLAN",
           "PrefillPlan", "default_prefill_plan", "PageCachePlan", "lookup_pages", "load_pages",
           "append_tokens", "prime_pages"]
