"""Each LServe operation once: the Triton kernel (``lserve_hf.kernels``) where it can run, the
torch reference (``lserve_hf.reference``) elsewhere.

``LServeConfig.backend``: "auto" takes a kernel for CUDA tensors it supports and says once when
it cannot (then the reference runs: same semantics, slower); "triton" insists (a clear error
when a kernel cannot run); "torch" never uses them."""

from __future__ import annotations

import logging

import torch

from . import reference

logger = logging.getLogger("lserve_hf")
_said: set[str] = set()


def say_once(msg: str) -> None:
    """Log a message once per process: a patched path that cannot run as asked says so, once."""
    if msg not in _said:
        _said.add(msg)
        logger.warning(msg)


def _kernels_for(cfg, x: torch.Tensor):
    """``lserve_hf.kernels`` when the config lets Triton run on ``x``'s device, else None."""
    if cfg.backend == "torch":
        return None
    from . import kernels

    ok = x.is_cuda and kernels.TRITON_AVAILABLE
    if not ok and cfg.backend == "triton":
        raise RuntimeError(
            "LServeConfig(backend='triton') needs CUDA tensors and an importable `triton` "
            f"(tensor on {x.device}, triton available: {kernels.TRITON_AVAILABLE}); "
            "use backend='auto' or 'torch' on this machine.")
    return kernels if ok else None


def kernels_run(cfg, x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``x`` under ``cfg`` (CUDA, Triton importable, not
    backend='torch')."""
    if cfg.backend == "torch" or not x.is_cuda:
        return False
    from . import kernels

    return kernels.TRITON_AVAILABLE


def _supported(cfg, op: str, x: torch.Tensor, head_dims=None, why: str | None = None) -> bool:
    """Whether ``op``'s kernel takes ``x`` (dtype, head dim; ``why``: a reason of the op's own);
    says once (or raises for backend='triton') when it does not."""
    D = x.shape[-1]
    if why is None and x.dtype == torch.float64:
        why = "float64"
    elif why is None and head_dims is not None and D not in head_dims:
        why = f"head dim {D} (supported: {', '.join(map(str, head_dims))})"
    elif why is None and (D & (D - 1) or D < 16):
        why = f"head dim {D} (a power of two >= 16 is needed)"
    if why is None:
        return True
    if cfg.backend == "triton":
        raise ValueError(f"LServe: the Triton {op} does not take {why}; use LServeConfig(backend='auto') "
                         "to run the torch path there.")
    say_once(f"LServe: the Triton {op} does not take {why}; {op} runs the torch path "
             "(same semantics, slower).")
    return False


def prefill(q, k, v, streaming, sink, local, q_offset, kv_start, scale, sliding_window, cfg,
            out=None, q_heads=None, memo=None, blocks=None):
    """Block-sparse prefill of q ``[B, Hq, S, D]`` against k, v ``[B, Hkv, N, D]``; with
    ``q_heads`` only those query heads of q (G per KV head of k) are computed, into ``out``.
    ``memo``: the forward's mask memo (``PromptMask.memo``) for the torch path; ``blocks``:
    key-block lists of the dense heads (``dynamic_prefill.KeyBlocks``)."""
    kernels = _kernels_for(cfg, q)
    if kernels is not None and _supported(cfg, "prefill", q, head_dims=(64, 128)):
        return kernels.block_sparse_prefill(q, k, v, streaming, sink, local, q_offset, kv_start, scale,
                                            sliding_window, out=out, q_heads=q_heads, blocks=blocks)
    if q_heads is None:
        o = reference.prefill_attention(q, k, v, streaming, sink, local, q_offset, kv_start, scale,
                                        sliding_window, cfg.prefill_query_block, memo, blocks)
        if out is None:
            return o
        out.copy_(o)
        return out
    o = reference.prefill_attention(q.index_select(1, q_heads), k, v, streaming, sink, local, q_offset,
                                    kv_start, scale, sliding_window, cfg.prefill_query_block, memo, blocks)
    out[:, q_heads] = o
    return out


def page_summaries(pool_k, lengths, cfg):
    kernels = _kernels_for(cfg, pool_k)
    if kernels is not None and _supported(cfg, "page summaries", pool_k):
        return kernels.build_page_summaries(pool_k, lengths, cfg.logical_page_size)
    return reference.page_summaries(pool_k, lengths, cfg.logical_page_size)


def update_summaries(kmax, kmin, new_k, positions, cfg) -> None:
    """Fold new keys ``[B, Hr, S, D]`` at token positions ``[B, S]`` into the summaries in place."""
    kernels = _kernels_for(cfg, new_k)
    if new_k.shape[2] == 1 and kernels is not None and _supported(cfg, "page summaries", new_k):
        kernels.update_page_summaries(kmax, kmin, new_k[:, :, 0], positions[:, 0], cfg.logical_page_size)
        return
    reference.update_page_summaries(kmax, kmin, new_k, positions, cfg.logical_page_size)


def select_pages(q, kmax, kmin, lengths, n_select, cfg, need=None, out=None) -> torch.Tensor:
    """Pages per retrieval query head, ``[B, Hr, G, n_select]`` (``reference.select_pages``).
    With ``need`` (bool ``[B, Hr, G]``) only those query heads choose, into ``out``; the others
    keep what ``out`` holds (the kernels skip their work)."""
    kernels = _kernels_for(cfg, q)
    if kernels is not None:
        from .kernels.page_selector import unsupported

        why = unsupported(q, cfg.page_size, cfg.logical_page_size) if q.dtype != torch.float64 else None
        if _supported(cfg, "page selection", q, why=why):
            if need is not None and out is None:
                raise ValueError("select_pages(need=...) writes into out")
            return kernels.select_pages(q, kmax, kmin, lengths, cfg.page_size, cfg.logical_page_size, n_select,
                                        need=need, out=out)
    if need is not None and q.device.type == "cpu" and not bool(need.any()):
        return out    # no head chooses: on the CPU the check costs nothing (on a GPU, a host sync)
    fresh = reference.select_pages(q, kmax, kmin, lengths, cfg.page_size, cfg.logical_page_size, n_select)
    if out is None:
        return fresh
    out.copy_(fresh if need is None else torch.where(need.unsqueeze(-1).bool(), fresh, out))
    return out


def query_drift(q, q_ref, lengths, inv_freq, tau, refresh, cfg, memo=None) -> torch.Tensor:
    """Which query heads drifted from the query that chose their pages (``reference.query_drift``);
    ``q_ref`` keeps the flagged heads' new queries. ``memo``: the forward's memo
    (``step.Forward.memo``), where the torch path keeps the step's RoPE angles for every layer."""
    kernels = _kernels_for(cfg, q)
    if kernels is not None and _supported(cfg, "drift test", q):
        return kernels.query_drift(q, q_ref, lengths, inv_freq, tau, refresh)
    rotation = None
    if memo is not None:
        key = ("rope rotation", inv_freq.data_ptr(), inv_freq.numel(), lengths.data_ptr())
        rotation = memo.get(key)
        if rotation is None:
            rotation = memo[key] = reference.rope_rotation(lengths - 1, inv_freq)
    return reference.query_drift(q, q_ref, lengths, inv_freq, tau, refresh, rotation)


def decode(q_s, sink_k, sink_v, ring_k, ring_v, q_r, pool_k, pool_v, pages, lengths, cfg, scale,
           out_s, out_r, window=None, longest=0, located=None, stream_slots=None) -> None:
    """Decode attention of streaming heads (sink + ring) and retrieval heads (the ``pages`` of
    their selection, and the row's newest page), into ``out_s`` ``[B, Hs, G, D]`` and ``out_r``
    ``[B, Hr, G, D]``. ``longest``: the host's longest
    row, to know whether Mistral's ``window`` can hide a token (the kernel has no window).
    ``located``: (slot lengths, physical pages) when ``pool_k``/``pool_v`` are an offloaded
    pool's page cache and ``pages`` its slots (``HostPagePool.decode_view``): the newest page is
    then the last slot, which the slot lengths end in. ``stream_slots``: the torch path's
    ``streaming_decode_slots`` of this step, when the caller has them."""
    q = q_s if q_s.shape[1] else q_r
    kernels = _kernels_for(cfg, q)
    if kernels is not None and window is not None and longest > window:
        say_once("LServe: the Triton decode has no sliding window; past the window, decode runs the "
                 "torch path (same semantics, slower).")
        kernels = None
    if kernels is not None and _supported(cfg, "decode", q):
        # one length per row: a page cache's retrieval heads read by slot lengths, so a second launch
        parts = [(q_s, q_r, pages, lengths)] if located is None else \
            [(q_s, q_r[:, :0], pages[:, :0], lengths), (q_s[:, :0], q_r, pages, located[0])]
        for qs, qr, pg, n in parts:
            kernels.sparse_paged_decode(qs, sink_k, sink_v, ring_k, ring_v, qr, pool_k, pool_v, pg, n,
                                        cfg.decode_sink, cfg.decode_local, cfg.page_size, scale,
                                        out_stream=out_s, out_retr=out_r, newest_page=True)
        return
    # finite=True: the stores are zero-initialised and hold only the model's keys and values, so
    # the slots a query does not see need masking, not zeroing
    if q_s.shape[1]:
        out_s.copy_(reference.streaming_decode(q_s, sink_k, sink_v, ring_k, ring_v, lengths, cfg.decode_sink,
                                               cfg.decode_local, scale, window, finite=True, valid=stream_slots))
    if q_r.shape[1]:
        at = None
        if located is not None:   # the same column added to the slots (by slot lengths) and the pages
            at = reference.with_newest_page(located[1], lengths, cfg.page_size)
        pages = reference.with_newest_page(pages, lengths if located is None else located[0], cfg.page_size)
        out_r.copy_(reference.paged_decode(q_r, pool_k, pool_v, pages, lengths, cfg.page_size, scale, window, at,
                                           finite=True))
