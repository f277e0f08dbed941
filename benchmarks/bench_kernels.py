"""Kernel benchmark on Llama-3-8B attention shapes (32 query heads, 8 KV heads, D=128, bf16, B=1).

Prefill (8K / 32K / 128K; 0% streaming, and 50% streaming with sink 128 and local 1024 or 8192):
the block-sparse Triton kernel against ``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`` (dense: what the model would run without LServe) and against compiled
``flex_attention`` given the identical block mask (same mask_mod semantics, enable_gqa=True).

Decode, per layer (32K / 128K / 512K context; token budget 4096, page 64, logical page 16): page
selection is amortised over a selector interval of 4, so a layer costs ``select / 4 + decode``;
against SDPA dense decode over the whole cache. Inputs rotate over several layers' worth of
tensors, so that the L2 cache does not hold one layer's pages from call to call. Decode is timed
eagerly and from a CUDA graph (how a serving loop runs it: no launch overhead).

Times are ``triton.testing.do_bench`` medians (ms). The run also checks the kernels against SDPA /
flex at a real shape and prints the errors. ``--out FILE`` writes every figure as JSON.

    python -m lserve_hf.benchmarks.bench_kernels --out bench.json      (or: lserve-hf bench kernels)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DTYPE = torch.bfloat16
PREFILL_SINK = 128
DECODE_SINK, DECODE_LOCAL = 128, 256
PAGE, LOGICAL, BUDGET, INTERVAL = 64, 16, 4096, 4
DEVICE = "cuda"
ROTATE = 4  # decode input sets cycled through (distinct "layers")
SWEEP_PREFILL, SWEEP_DECODE, SWEEP_SELECT = 32768, 131072, 524288  # context lengths of --sweep


def _kernels():
    from lserve_hf.kernels import (block_sparse_prefill, build_page_summaries, select_pages,
                                   sparse_paged_decode, update_page_summaries)
    return block_sparse_prefill, build_page_summaries, select_pages, sparse_paged_decode, \
        update_page_summaries


def _kernel_modules():
    """The kernel modules themselves (the package re-exports functions of the same names), and
    the PDL switches (kernels/launch.py)."""
    from importlib import import_module
    return tuple(import_module("lserve_hf.kernels." + m)
                 for m in ("block_sparse_prefill", "page_selector", "sparse_decode", "launch"))


def _bench(fn, rep=100):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def _graph_time(fn, n_inner):
    """Median ms of one of the n_inner calls that ``fn`` makes, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return _bench(g.replay) / n_inner


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item(), (a - b).abs().max().item()


def _streaming_mask(frac):
    n = round(HKV * frac)
    # alternate kinds across KV heads (what the calibrated patterns look like), n streaming
    s = torch.zeros(HKV, dtype=torch.bool)
    s[torch.linspace(0, HKV - 1, n).round().long()] = True if n else False
    return s


def _flex_parts(device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def block_mask(n, streaming, sink, local):
        st = streaming.to(device)
        sk = torch.tensor(sink, device=device)
        lo = torch.tensor(local, device=device)

        def mask_mod(b, h, q_idx, kv_idx):  # the semantics of reference.prefill_mask, kv_start 0
            causal = kv_idx <= q_idx
            window = (kv_idx < sk) | (q_idx - kv_idx < lo)
            return causal & (~st[h // G] | window)

        return create_block_mask(mask_mod, 1, HQ, n, n, device=device, _compile=True)

    return flex, block_mask


def bench_prefill(lengths, locals_, rows, checks, device, config=None, with_flex=True, tma=None,
                  rep=100):
    block_sparse_prefill = _kernels()[0]
    flex, make_mask = _flex_parts(device) if with_flex else (None, None)
    for n in lengths:
        torch.manual_seed(0)
        q = torch.randn(1, HQ, n, D, device=device, dtype=DTYPE)
        k = torch.randn(1, HKV, n, D, device=device, dtype=DTYPE)
        v = torch.randn(1, HKV, n, D, device=device, dtype=DTYPE)
        out = torch.empty_like(q)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        t_sdpa = _bench(sdpa, rep)
        cases = [(0.0, 0)] + [(0.5, loc) for loc in locals_]
        for frac, local in cases:
            streaming = _streaming_mask(frac).to(device)
            loc = local if frac else 1
            tri = lambda: block_sparse_prefill(q, k, v, streaming, PREFILL_SINK, loc, out=out,  # noqa: E731
                                               config=config, tma=tma)
            t_tri = _bench(tri, rep)
            t_flex = None
            if with_flex:
                bm = make_mask(n, streaming, PREFILL_SINK, loc)
                fx = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
                t_flex = _bench(fx, rep)
                if n == lengths[0]:
                    tri()
                    e_rel, e_abs = _rel(out, fx())
                    checks.append({"what": f"prefill {n} streaming {frac:.0%} local {local}: triton vs flex",
                                   "rel_norm_err": e_rel, "max_abs_err": e_abs})
                del bm
            if frac == 0 and n == lengths[0]:
                tri()
                e_rel, e_abs = _rel(out, sdpa())
                checks.append({"what": f"prefill {n} dense: triton vs SDPA", "rel_norm_err": e_rel,
                               "max_abs_err": e_abs})
            causal_flops = 4 * HQ * D * n * (n + 1) / 2
            rows.append({"kind": "prefill", "tokens": n, "streaming": frac, "local": local,
                         "triton_ms": t_tri, "sdpa_ms": t_sdpa, "flex_ms": t_flex,
                         "speedup_vs_sdpa": t_sdpa / t_tri,
                         "speedup_vs_flex": (t_flex / t_tri) if t_flex else None,
                         "sdpa_tflops": causal_flops / t_sdpa * 1e-9,
                         "triton_dense_equiv_tflops": causal_flops / t_tri * 1e-9})
            print(_fmt_row(rows[-1]), flush=True)
        del q, k, v, out
        torch.cuda.empty_cache()


def _decode_sets(n, frac, device, n_select):
    """ROTATE independent layers of decode inputs for a context of n tokens."""
    _, build, _, _, _ = _kernels()
    streaming = _streaming_mask(frac)
    hs = int(streaming.sum())
    hr = HKV - hs
    T = -(-n // PAGE) * PAGE
    sets = []
    for _ in range(ROTATE):
        k = torch.randn(1, HKV, T, D, device=device, dtype=DTYPE)
        v = torch.randn(1, HKV, T, D, device=device, dtype=DTYPE)
        q = torch.randn(1, HKV, G, D, device=device, dtype=DTYPE)
        lengths = torch.full((1,), n, device=device, dtype=torch.int32)
        pool_k, pool_v = k[:, hs:], v[:, hs:]          # retrieval heads: the full cache
        kmax, kmin = build(pool_k, lengths, LOGICAL)
        sets.append(dict(
            k=k, v=v, q_full=q.reshape(1, HQ, 1, D), lengths=lengths,
            q_stream=q[:, :hs].contiguous(), q_retr=q[:, hs:].contiguous(),
            sink_k=torch.randn(1, hs, DECODE_SINK, D, device=device, dtype=DTYPE),
            sink_v=torch.randn(1, hs, DECODE_SINK, D, device=device, dtype=DTYPE),
            ring_k=torch.randn(1, hs, DECODE_LOCAL, D, device=device, dtype=DTYPE),
            ring_v=torch.randn(1, hs, DECODE_LOCAL, D, device=device, dtype=DTYPE),
            pool_k=pool_k, pool_v=pool_v, kmax=kmax, kmin=kmin,
            pages=torch.zeros(1, hr, G, n_select, device=device, dtype=torch.int64),
            out_s=torch.empty(1, hs, G, D, device=device, dtype=DTYPE),
            out_r=torch.empty(1, hr, G, D, device=device, dtype=DTYPE),
            new_k=torch.randn(1, hr, D, device=device, dtype=DTYPE),
            pos=torch.full((1,), n - 1, device=device, dtype=torch.int64)))
    return sets


def bench_decode(lengths, fracs, rows, checks, device, decode_kw=None):
    _, _, select_pages, decode, update = _kernels()
    decode_kw = decode_kw or {}
    n_select = BUDGET // PAGE
    scale = D ** -0.5
    for n in lengths:
        for frac in fracs:
            torch.manual_seed(1)
            sets = _decode_sets(n, frac, device, n_select)
            it = {"i": 0}

            def nxt():
                it["i"] = (it["i"] + 1) % ROTATE
                return sets[it["i"]]

            def sel(s=None):
                s = s or nxt()
                return select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL,
                                    n_select)

            def dec(s=None, pages=None):
                s = s or nxt()
                decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"], s["q_retr"],
                       s["pool_k"], s["pool_v"], s["pages"] if pages is None else pages, s["lengths"],
                       DECODE_SINK, DECODE_LOCAL, PAGE, scale, out_stream=s["out_s"],
                       out_retr=s["out_r"], **decode_kw)

            def interval():
                # One selector interval of every layer, as a model runs it: each layer selects and
                # decodes, then decodes INTERVAL - 1 more times with that selection; the other
                # ROTATE - 1 layers run in between, so a layer's pages are not still in L2.
                chosen = []
                for s in sets:
                    chosen.append(sel(s))
                    dec(s, chosen[-1])
                for _ in range(INTERVAL - 1):
                    for s, pages in zip(sets, chosen):
                        dec(s, pages)

            def upd(s=None):
                s = s or nxt()
                update(s["kmax"], s["kmin"], s["new_k"], s["pos"], LOGICAL)

            def sdpa(s=None):
                s = s or nxt()
                F.scaled_dot_product_attention(s["q_full"], s["k"], s["v"], enable_gqa=True)

            for s in sets:
                s["pages"] = sel(s)
            torch.cuda.synchronize()
            t = {name: _bench(fn) for name, fn in (("select", sel), ("decode", dec), ("update", upd),
                                                   ("sdpa", sdpa))}
            # A replay's own launch costs a few microseconds; a model step replays one graph for
            # all its layers, so each graph here makes INTERVAL passes over the ROTATE layers (16
            # calls). "graph_4" keeps the earlier tables' method: one pass, 4 calls per replay.
            g, g4 = {}, {}
            for name, fn in (("select", sel), ("decode", dec), ("update", upd), ("sdpa", sdpa)):
                g[name] = _graph_time(lambda fn=fn: [fn(s) for _ in range(INTERVAL) for s in sets],
                                      ROTATE * INTERVAL)
                g4[name] = _graph_time(lambda fn=fn: [fn(s) for s in sets], ROTATE)
            row = {"kind": "decode", "tokens": n, "streaming": frac, "budget": BUDGET,
                   "eager": {k_: v_ * 1e3 for k_, v_ in t.items()},
                   "graph": {k_: v_ * 1e3 for k_, v_ in g.items()},
                   "graph_4": {k_: v_ * 1e3 for k_, v_ in g4.items()}}
            # per layer and step, measured over whole intervals in one graph (the select-to-decode
            # launch overlap included), next to the sum of the parts timed apart
            row["graph"]["interval_layer"] = _graph_time(interval, ROTATE * INTERVAL) * 1e3
            for mode in ("eager", "graph", "graph_4"):
                x = row[mode]
                x["layer"] = x["select"] / INTERVAL + x["decode"]
                x["layer_with_update"] = x["layer"] + x["update"]
                x["speedup_vs_sdpa"] = x["sdpa"] / x["layer"]
            rows.append(row)
            print(_fmt_row(row), flush=True)
            if n == lengths[0]:
                _check_decode(sets[0], frac, checks, decode, select_pages, scale)
            del sets
            torch.cuda.empty_cache()


def _check_decode(s, frac, checks, decode, select_pages, scale):
    """Every page selected (budget >= context): retrieval heads must equal dense SDPA decode."""
    from lserve_hf import reference as R

    hs = s["q_stream"].shape[1]
    P = s["pool_k"].shape[2] // PAGE
    pages = select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL, P)
    out_s, out_r = decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"], s["q_retr"],
                          s["pool_k"], s["pool_v"], pages, s["lengths"], DECODE_SINK, DECODE_LOCAL,
                          PAGE, scale)
    n = int(s["lengths"][0])
    dense = F.scaled_dot_product_attention(s["q_retr"].reshape(1, -1, 1, D), s["pool_k"][:, :, :n],
                                           s["pool_v"][:, :, :n],
                                           enable_gqa=True, scale=scale).reshape(out_r.shape)
    e_rel, e_abs = _rel(out_r, dense)
    checks.append({"what": f"decode {n} streaming {frac:.0%}: all pages selected vs SDPA",
                   "rel_norm_err": e_rel, "max_abs_err": e_abs})
    if hs:
        ref = R.streaming_decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"],
                                 s["lengths"], DECODE_SINK, DECODE_LOCAL, scale)
        e_rel, e_abs = _rel(out_s, ref)
        checks.append({"what": "decode streaming heads vs reference.streaming_decode",
                       "rel_norm_err": e_rel, "max_abs_err": e_abs})
    sel = select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL, BUDGET // PAGE)
    ref = R.select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL, BUDGET // PAGE)
    checks.append({"what": "select_pages vs reference (bf16, real shape): equal", "equal": bool(torch.equal(sel, ref)),
                   "same_sets": bool(torch.equal(sel.sort(-1).values, ref.sort(-1).values))})


def _fmt_row(r):
    if r["kind"] == "prefill":
        flex = f"{r['flex_ms']:9.2f}" if r["flex_ms"] else "        -"
        sx = f"{r['speedup_vs_flex']:5.2f}x" if r["speedup_vs_flex"] else "     -"
        return (f"prefill {r['tokens']:>7} stream {r['streaming']:>4.0%} local {r['local']:>5} | "
                f"triton {r['triton_ms']:9.2f} ms  sdpa {r['sdpa_ms']:9.2f}  flex {flex} | "
                f"vs sdpa {r['speedup_vs_sdpa']:5.2f}x  vs flex {sx}")
    e, g = r["eager"], r["graph"]
    return (f"decode  {r['tokens']:>7} stream {r['streaming']:>4.0%} | graph: select {g['select']:6.1f} us "
            f"decode {g['decode']:6.1f} update {g['update']:5.1f} layer {g['layer']:6.1f} "
            f"(interval {g.get('interval_layer', float('nan')):5.1f}) sdpa {g['sdpa']:7.1f} "
            f"({g['speedup_vs_sdpa']:5.1f}x) | 4 calls a replay: layer {r.get('graph_4', g)['layer']:6.1f} | "
            f"eager: layer {e['layer']:6.1f} sdpa {e['sdpa']:7.1f}")


def sweep(device, parts=("prefill", "decode", "select")):
    """Launch-parameter sweep on this GPU: prefill block sizes (32K, dense + 50% local 1024), the
    decode plan (128K, 50% streaming) and the selection plan (512K, 50%). Returns the timings and
    the fastest setting of each; ``--tune`` applies those before benchmarking."""
    bsp, sel_mod, dec_mod, launch_mod = _kernel_modules()  # noqa: F841
    default_pdl = dict(launch_mod.PDL)

    out = {"prefill": [], "decode": [], "select": []}
    best = {}
    # (tma, config): per-thread loads and tensor-copy-engine (TMA) loads, each over block shapes.
    prefill_cands = [(False, (128, 64, 8, 3))] + [
        (True, c) for c in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2),
                            (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2)]]
    for tma, cfg in prefill_cands if "prefill" in parts else []:
        rows = []
        try:
            bench_prefill([SWEEP_PREFILL], [1024], rows, [], device, config=cfg, with_flex=False, tma=tma)
        except Exception as exc:  # noqa: BLE001 - a config may not fit shared memory
            print("  prefill config", tma, cfg, "failed:", type(exc).__name__, str(exc)[:160], flush=True)
            continue
        total = sum(r["triton_ms"] for r in rows)
        out["prefill"].append({"tma": tma, "config": cfg, "dense_ms": rows[0]["triton_ms"],
                               "stream50_ms": rows[1]["triton_ms"], "sdpa_ms": rows[0]["sdpa_ms"]})
        print(f"  ^ prefill tma={tma} config {cfg}: dense + 50% = {total:.2f} ms", flush=True)
        key = "prefill_tma" if tma else "prefill"
        if key not in best or total < best[key][1]:
            best[key] = (cfg, total)
    if "prefill" in parts and out["prefill"]:
        # The three fastest at 32K (and the fastest pointer-load one) again at 128K, where the
        # kernel spends its time in long loops.
        ranked = sorted(out["prefill"], key=lambda r: r["dense_ms"] + r["stream50_ms"])[:3]
        pointer = next((r for r in out["prefill"] if not r["tma"]), None)
        if pointer is not None and pointer not in ranked:
            ranked.append(pointer)
        for r in ranked:
            rows = []
            bench_prefill([131072], [1024], rows, [], device, config=r["config"], with_flex=False,
                          tma=r["tma"], rep=1500)
            out["prefill"].append({"tma": r["tma"], "config": r["config"], "tokens": 131072,
                                   "dense_ms": rows[0]["triton_ms"], "stream50_ms": rows[1]["triton_ms"],
                                   "sdpa_ms": rows[0]["sdpa_ms"]})
            print(f"  ^ 128K prefill tma={r['tma']} config {r['config']}: dense {rows[0]['triton_ms']:.1f}"
                  f" ms, 50% {rows[1]['triton_ms']:.1f} ms (SDPA {rows[0]['sdpa_ms']:.1f})", flush=True)

    _, _, select_pages, decode, _ = _kernels()
    n_select = BUDGET // PAGE
    scale = D ** -0.5
    sets = _decode_sets(SWEEP_DECODE, 0.5, device, n_select)
    for s in sets:
        s["pages"] = select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL, n_select)

    def dec_all():
        for s in sets:
            decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"], s["q_retr"],
                   s["pool_k"], s["pool_v"], s["pages"], s["lengths"], DECODE_SINK, DECODE_LOCAL,
                   PAGE, scale, out_stream=s["out_s"], out_retr=s["out_r"])

    default_plan = dict(dec_mod.DECODE_PLAN)
    fma = [{"mma": False, "target_programs": 1024, "min_split_tokens": 128, "num_stages": 1}]
    # tensor-core decode, with and without programmatic dependent launch (kernels/launch.py)
    # PDL: False, True (the next grid scheduled at each program's start) or "late" (at its end)
    base = {"mma": True, "tma": False, "prefetch_pages": True, "target_programs": 128,
            "min_split_tokens": 512, "num_stages": 3}
    mma = [dict(base, prefetch_pages=False, target_programs=256, min_split_tokens=256, num_stages=2,
                pdl=True)]                                            # the plan before prefetching
    mma += [dict(base, pdl=pdl) for pdl in (True, False, "late")]
    mma += [dict(base, tma=True, pdl=True), dict(base, fused_combine=True, pdl=True)]
    # page numbers loaded before the loop: over split sizes, pipeline depths and steps of two pages
    # (128 programs of 8 pages plus the streaming ones fill the 132 multiprocessors once)
    mma += [dict(base, target_programs=tp, min_split_tokens=mt, num_stages=st, pdl=True)
            for tp, mt, st in ((96, 512, 3), (128, 512, 4), (256, 256, 3))]
    mma += [dict(base, block_t=128, num_warps=w, num_stages=2, pdl=True) for w in (4, 8)]
    for var in fma + mma if "decode" in parts else []:
        dec_mod.DECODE_PLAN.update(default_plan)
        launch_mod.PDL["decode"] = var.get("pdl", default_pdl["decode"])
        dec_mod.DECODE_PLAN.update({k: v for k, v in var.items() if k != "pdl"})
        try:
            t = _graph_time(dec_all, ROTATE) * 1e3
        except Exception as exc:  # noqa: BLE001
            print("  decode plan", var, "failed:", type(exc).__name__, str(exc)[:160], flush=True)
            continue
        out["decode"].append({"plan": dict(dec_mod.DECODE_PLAN), "pdl": launch_mod.PDL["decode"],
                              "decode_us": t})
        print(f"  decode 128K 50% plan {var}: {t:.1f} us", flush=True)
        if "decode" not in best or t < best["decode"][1]:
            best["decode"] = (dict(dec_mod.DECODE_PLAN), t)
            best["pdl_decode"] = (launch_mod.PDL["decode"], t)
    dec_mod.DECODE_PLAN.update(default_plan)
    launch_mod.PDL.update(default_pdl)
    del sets
    torch.cuda.empty_cache()

    default_sel = dict(sel_mod.SELECT_PLAN)
    # 128K first (the per-layer target), then 512K (the growth target); the best is the lowest
    # sum of the two.
    sets = _decode_sets(SWEEP_DECODE, 0.5, device, n_select)
    sel128 = {}
    sel_vars = [{"partial_sort": False, "sort_warps": 4, "pdl": False}]  # the plan before partial sorting
    sel_vars += [{"partial_sort": True, "chunk": c, "sort_warps": w, "pdl": "late"}
                 for c in (512, 1024) for w in (4, 8)]
    sel_vars += [{"partial_sort": True, "pdl": pdl} for pdl in (False, True)]
    sel_vars += [{"partial_sort": True, "score_dot_rows": r, "score_dot_warps": w, "pdl": "late"}
                 for r, w in ((64, 4), (32, 4))]
    for var in sel_vars if "select" in parts else []:
        sel_mod.SELECT_PLAN.update(default_sel)
        launch_mod.PDL["select"] = var.get("pdl", default_pdl["select"])
        sel_mod.SELECT_PLAN.update({k: v for k, v in var.items() if k != "pdl"})
        try:
            t = _graph_time(lambda: [select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE,
                                                  LOGICAL, n_select) for s in sets], ROTATE) * 1e3
        except Exception as exc:  # noqa: BLE001
            print("  select plan", var, "failed:", type(exc).__name__, str(exc)[:160], flush=True)
            continue
        sel128[json.dumps(var, sort_keys=True)] = t
        print(f"  select 128K 50% plan {var}: {t:.1f} us", flush=True)
    sel_mod.SELECT_PLAN.update(default_sel)
    del sets
    torch.cuda.empty_cache()
    sets = _decode_sets(SWEEP_SELECT, 0.5, device, n_select)

    def score_all():
        for s in sets:
            sel_mod._scores(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL, pack=True)

    def sel_all():
        for s in sets:
            select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL, n_select)

    for var in sel_vars if "select" in parts else []:
        sel_mod.SELECT_PLAN.update(default_sel)
        launch_mod.PDL["select"] = var.get("pdl", default_pdl["select"])
        sel_mod.SELECT_PLAN.update({k: v for k, v in var.items() if k != "pdl"})
        try:
            t_score = _graph_time(score_all, ROTATE) * 1e3
            t = _graph_time(sel_all, ROTATE) * 1e3
        except Exception as exc:  # noqa: BLE001
            print("  select plan", var, "failed:", type(exc).__name__, str(exc)[:160], flush=True)
            continue
        t128 = sel128.get(json.dumps(var, sort_keys=True), float("inf"))
        out["select"].append({"plan": dict(sel_mod.SELECT_PLAN), "pdl": launch_mod.PDL["select"],
                              "select_us": t, "score_only_us": t_score,
                              "select_128k_us": t128})
        print(f"  select 512K 50% plan {var}: {t:.1f} us (scores alone {t_score:.1f} us)", flush=True)
        if "select" not in best or t + t128 < best["select"][1]:
            best["select"] = (dict(sel_mod.SELECT_PLAN), t + t128)
            best["pdl_select"] = (launch_mod.PDL["select"], t + t128)
    sel_mod.SELECT_PLAN.update(default_sel)
    launch_mod.PDL.update(default_pdl)
    del sets
    torch.cuda.empty_cache()
    out["best"] = {k: v[0] for k, v in best.items()}
    print("  best:", out["best"], flush=True)
    return out


def prefill_parts(device, n=131072, local=1024):
    """Where the 50%-streaming prefill time goes: the dense half alone (16 query / 4 KV heads),
    all heads streaming, and the mix, in both launch orders (``head_major``)."""
    block_sparse_prefill = _kernels()[0]
    torch.manual_seed(0)
    res = []

    def run(hq, hkv, streaming, head_major, label):
        q = torch.randn(1, hq, n, D, device=device, dtype=DTYPE)
        k = torch.randn(1, hkv, n, D, device=device, dtype=DTYPE)
        v = torch.randn(1, hkv, n, D, device=device, dtype=DTYPE)
        out = torch.empty_like(q)
        st = torch.tensor(streaming, device=device)
        t = _bench(lambda: block_sparse_prefill(q, k, v, st, PREFILL_SINK, local, out=out,
                                                head_major=head_major), 1500)
        res.append({"what": label, "head_major": head_major, "ms": t})
        print(f"  prefill {n} {label:<32} head_major={head_major!s:<5} {t:8.2f} ms", flush=True)

    mix = _streaming_mask(0.5).tolist()
    for hm in (False, True):
        run(HQ, HKV, [False] * HKV, hm, "dense 32/8")
        run(HQ, HKV, mix, hm, "50% streaming 32/8")
    run(HQ // 2, HKV // 2, [False] * (HKV // 2), False, "dense half only 16/4")
    run(HQ, HKV, [True] * HKV, False, "all streaming 32/8")
    q = torch.randn(1, HQ, n, D, device=device, dtype=DTYPE)
    k = torch.randn(1, HKV, n, D, device=device, dtype=DTYPE)
    v = torch.randn_like(k)
    t = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 1500)
    res.append({"what": "sdpa dense", "ms": t})
    print(f"  prefill {n} sdpa dense {t:8.2f} ms", flush=True)
    return res


def compare(before_path, after_path):
    """Before/after table of two --out files (rows matched by kind, tokens, streaming, local)."""
    def load(p):
        with open(p) as f:
            d = json.load(f)
        return d, {(r["kind"], r["tokens"], r["streaming"], r.get("local")): r for r in d["rows"]}

    (db, before), (da, after) = load(before_path), load(after_path)
    print(f"before/after: {da['device']}, {da['date'][:16]}, torch {da['torch']}, triton {da['triton']}")
    print("prefill ms         | before  after |  sdpa   flex | after/sdpa  sdpa/after  flex/after")
    for key, a in after.items():
        if key[0] != "prefill":
            continue
        b = before.get(key)
        bt = f"{b['triton_ms']:7.2f}" if b else "      -"
        fx = f"{a['flex_ms']:6.2f}" if a.get("flex_ms") else "     -"
        fr = f"{a['flex_ms'] / a['triton_ms']:10.2f}x" if a.get("flex_ms") else "          -"
        print(f"{key[1]:>7} {key[2]:>4.0%} L{key[3]:<5}| {bt} {a['triton_ms']:6.2f} | {a['sdpa_ms']:6.2f} {fx} | "
              f"{a['triton_ms'] / a['sdpa_ms']:9.3f}  {a['sdpa_ms'] / a['triton_ms']:9.2f}x {fr}")
    print("decode us (graph)  | layer before/after | select before/after | decode before/after")
    for key, a in after.items():
        if key[0] != "decode":
            continue
        b = before.get(key)
        ga, gb = a["graph"], (b["graph"] if b else None)
        f = (lambda x, k: f"{x[k]:6.1f}" if x else "     -")
        print(f"{key[1]:>7} {key[2]:>4.0%}       | {f(gb, 'layer')} {f(ga, 'layer')}      | {f(gb, 'select')} "
              f"{f(ga, 'select')}       | {f(gb, 'decode')} {f(ga, 'decode')}")


def apply_tuning(best):
    bsp, sel_mod, dec_mod, launch_mod = _kernel_modules()
    if "prefill" in best:
        bsp.PREFILL_CONFIG[D] = tuple(best["prefill"])
    if "prefill_tma" in best:
        bsp.PREFILL_CONFIG_TMA[D] = tuple(best["prefill_tma"])
    if "decode" in best:
        dec_mod.DECODE_PLAN.update(best["decode"])
    if "select" in best:
        sel_mod.SELECT_PLAN.update(best["select"])
    for family in ("decode", "select"):
        if f"pdl_{family}" in best:
            launch_mod.PDL[family] = best[f"pdl_{family}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write all figures as JSON to this path")
    ap.add_argument("--prefill", default="8192,32768,131072", help="prefill lengths")
    ap.add_argument("--decode", default="32768,131072,524288", help="decode context lengths")
    ap.add_argument("--locals", default="1024,8192", help="streaming local windows at prefill")
    ap.add_argument("--decode-fracs", default="0.5,0", help="streaming fractions at decode")
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention")
    ap.add_argument("--tune-parts", default="prefill,decode,select",
                    help="what --sweep / --tune sweep (comma list of prefill, decode, select)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                    help="print a before/after table of two --out files and exit")
    ap.add_argument("--sweep", action="store_true", help="only sweep the kernels' launch parameters")
    ap.add_argument("--prefill-parts", action="store_true",
                    help="only time the parts of the 50%%-streaming prefill at 128K (and launch orders)")
    ap.add_argument("--tune", action="store_true",
                    help="sweep first, then benchmark with the fastest launch parameters")
    args = ap.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton
    device = DEVICE
    tuning = None
    if args.prefill_parts:
        prefill_parts(device)
        return 0
    if args.sweep or args.tune:
        tuning = sweep(device, args.tune_parts.split(","))
        if args.sweep:
            return 0
        apply_tuning(tuning["best"])
    bsp, sel_mod, dec_mod, launch_mod = _kernel_modules()
    used = {"prefill_config": bsp.PREFILL_CONFIG[D], "prefill_config_tma": bsp.PREFILL_CONFIG_TMA[D],
            "decode_plan": dict(dec_mod.DECODE_PLAN), "pdl": dict(launch_mod.PDL),
            "select_plan": dict(sel_mod.SELECT_PLAN)}
    print("launch parameters:", used, flush=True)
    rows, checks = [], []
    lengths = [int(x) for x in args.prefill.split(",") if x]
    locals_ = [int(x) for x in args.locals.split(",") if x]
    bench_decode([int(x) for x in args.decode.split(",") if x],
                 [float(x) for x in args.decode_fracs.split(",") if x], rows, checks, device)
    bench_prefill(lengths, locals_, rows, checks, device, with_flex=not args.no_flex)
    print("\nchecks:")
    for c in checks:
        print("  ", json.dumps(c))
    print("\nsummary (ms for prefill, us for decode per layer):")
    for r in rows:
        print(_fmt_row(r))
    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__,
              "shapes": {"hq": HQ, "hkv": HKV, "d": D, "dtype": str(DTYPE), "batch": 1,
                         "prefill_sink": PREFILL_SINK, "decode_sink": DECODE_SINK,
                         "decode_local": DECODE_LOCAL, "page": PAGE, "logical_page": LOGICAL,
                         "budget": BUDGET, "selector_interval": INTERVAL},
              "launch_parameters": used, "sweep": tuning, "rows": rows, "checks": checks}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
