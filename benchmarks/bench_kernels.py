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
flex at a real shape and prints the errors. ``--out FILE`` writes every figure as JSON;
``--plans FILE`` runs with the best plans of a ``tune_kernels.py --out FILE`` sweep instead of
the kernels' defaults. Needs a CUDA GPU.

    python -m lserve_hf.benchmarks.bench_kernels --out bench.json      (or: lserve-hf bench kernels)
    python -m lserve_hf.benchmarks.compare_runs before.json bench.json  (a before/after table)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F

from lserve_hf.benchmarks import common as C


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
            return causal & (~st[h // C.G] | window)

        return create_block_mask(mask_mod, 1, C.HQ, n, n, device=device, _compile=True)

    return flex, block_mask


def bench_prefill(lengths, locals_, rows, checks, device, plan=None, with_flex=True, rep=100):
    """Rows of prefill timings (dense, then 50% streaming per local window) at each length;
    ``plan``: the kernel's PrefillPlan (None: its default)."""
    from lserve_hf.kernels import block_sparse_prefill

    flex, make_mask = _flex_parts(device) if with_flex else (None, None)
    for n in lengths:
        torch.manual_seed(0)
        q, k, v, out = C.prefill_inputs(n, device)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        t_sdpa = C.bench(sdpa, rep)
        cases = [(0.0, 0)] + [(0.5, loc) for loc in locals_]
        for frac, local in cases:
            streaming = C.streaming_mask(frac).to(device)
            loc = local if frac else 1
            tri = lambda: block_sparse_prefill(q, k, v, streaming, C.PREFILL_SINK, loc, out=out,  # noqa: E731
                                               plan=plan)
            t_tri = C.bench(tri, rep)
            t_flex = None
            if with_flex:
                bm = make_mask(n, streaming, C.PREFILL_SINK, loc)
                fx = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
                t_flex = C.bench(fx, rep)
                if n == lengths[0]:
                    tri()
                    e_rel, e_abs = C.rel(out, fx())
                    checks.append({"what": f"prefill {n} streaming {frac:.0%} local {local}: triton vs flex",
                                   "rel_norm_err": e_rel, "max_abs_err": e_abs})
                del bm
            if frac == 0 and n == lengths[0]:
                tri()
                e_rel, e_abs = C.rel(out, sdpa())
                checks.append({"what": f"prefill {n} dense: triton vs SDPA", "rel_norm_err": e_rel,
                               "max_abs_err": e_abs})
            causal_flops = 4 * C.HQ * C.D * n * (n + 1) / 2
            rows.append({"kind": "prefill", "tokens": n, "streaming": frac, "local": local,
                         "triton_ms": t_tri, "sdpa_ms": t_sdpa, "flex_ms": t_flex,
                         "speedup_vs_sdpa": t_sdpa / t_tri,
                         "speedup_vs_flex": (t_flex / t_tri) if t_flex else None,
                         "sdpa_tflops": causal_flops / t_sdpa * 1e-9,
                         "triton_dense_equiv_tflops": causal_flops / t_tri * 1e-9})
            print(_fmt_row(rows[-1]), flush=True)
        del q, k, v, out
        torch.cuda.empty_cache()


def bench_decode(lengths, fracs, rows, checks, device, decode_plan=None, select_plan=None):
    """Rows of per-layer decode timings (select, decode, summary update, SDPA; eager and from
    CUDA graphs) at each context length and streaming fraction."""
    from lserve_hf.kernels import update_page_summaries

    for n in lengths:
        for frac in fracs:
            torch.manual_seed(1)
            sets = C.decode_sets(n, frac, device)
            it = {"i": 0}

            def nxt():
                it["i"] = (it["i"] + 1) % C.ROTATE
                return sets[it["i"]]

            def sel(s=None):
                return C.select(s or nxt(), select_plan)

            def dec(s=None, pages=None):
                C.decode(s or nxt(), pages, decode_plan)

            def interval():
                # One selector interval of every layer, as a model runs it: each layer selects and
                # decodes, then decodes INTERVAL - 1 more times with that selection; the other
                # ROTATE - 1 layers run in between, so a layer's pages are not still in L2.
                chosen = []
                for s in sets:
                    chosen.append(sel(s))
                    dec(s, chosen[-1])
                for _ in range(C.INTERVAL - 1):
                    for s, pages in zip(sets, chosen):
                        dec(s, pages)

            def upd(s=None):
                s = s or nxt()
                update_page_summaries(s["kmax"], s["kmin"], s["new_k"], s["pos"], C.LOGICAL)

            def sdpa(s=None):
                s = s or nxt()
                F.scaled_dot_product_attention(s["q_full"], s["k"], s["v"], enable_gqa=True)

            for s in sets:
                s["pages"] = sel(s)
            torch.cuda.synchronize()
            parts = (("select", sel), ("decode", dec), ("update", upd), ("sdpa", sdpa))
            t = {name: C.bench(fn) for name, fn in parts}
            # A replay's own launch costs a few microseconds; a model step replays one graph for
            # all its layers, so each graph here makes INTERVAL passes over the ROTATE layers (16
            # calls). "graph_4" keeps the earlier tables' method: one pass, 4 calls per replay.
            g, g4 = {}, {}
            for name, fn in parts:
                g[name] = C.graph_time(lambda fn=fn: [fn(s) for _ in range(C.INTERVAL) for s in sets],
                                       C.ROTATE * C.INTERVAL)
                g4[name] = C.graph_time(lambda fn=fn: [fn(s) for s in sets], C.ROTATE)
            row = {"kind": "decode", "tokens": n, "streaming": frac, "budget": C.BUDGET,
                   "eager": {k_: v_ * 1e3 for k_, v_ in t.items()},
                   "graph": {k_: v_ * 1e3 for k_, v_ in g.items()},
                   "graph_4": {k_: v_ * 1e3 for k_, v_ in g4.items()}}
            # per layer and step, measured over whole intervals in one graph (the select-to-decode
            # launch overlap included), next to the sum of the parts timed apart
            row["graph"]["interval_layer"] = C.graph_time(interval, C.ROTATE * C.INTERVAL) * 1e3
            for mode in ("eager", "graph", "graph_4"):
                x = row[mode]
                x["layer"] = x["select"] / C.INTERVAL + x["decode"]
                x["layer_with_update"] = x["layer"] + x["update"]
                x["speedup_vs_sdpa"] = x["sdpa"] / x["layer"]
            rows.append(row)
            print(_fmt_row(row), flush=True)
            if n == lengths[0]:
                _check_decode(sets[0], frac, checks, decode_plan, select_plan)
            del sets
            torch.cuda.empty_cache()


def _check_decode(s, frac, checks, decode_plan, select_plan):
    """Every page selected (budget >= context): retrieval heads must equal dense SDPA decode."""
    from lserve_hf import reference as R

    hs = s["q_stream"].shape[1]
    P = s["pool_k"].shape[2] // C.PAGE
    pages = C.select(s, select_plan, n_select=P)
    out_s, out_r = C.decode(s, pages, decode_plan, into_buffers=False)
    n = int(s["lengths"][0])
    dense = F.scaled_dot_product_attention(s["q_retr"].reshape(1, -1, 1, C.D), s["pool_k"][:, :, :n],
                                           s["pool_v"][:, :, :n],
                                           enable_gqa=True, scale=C.SCALE).reshape(out_r.shape)
    e_rel, e_abs = C.rel(out_r, dense)
    checks.append({"what": f"decode {n} streaming {frac:.0%}: all pages selected vs SDPA",
                   "rel_norm_err": e_rel, "max_abs_err": e_abs})
    if hs:
        ref = R.streaming_decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"],
                                 s["lengths"], C.DECODE_SINK, C.DECODE_LOCAL, C.SCALE)
        e_rel, e_abs = C.rel(out_s, ref)
        checks.append({"what": "decode streaming heads vs reference.streaming_decode",
                       "rel_norm_err": e_rel, "max_abs_err": e_abs})
    sel = C.select(s, select_plan)
    ref = R.select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], C.PAGE, C.LOGICAL, C.N_SELECT)
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


def load_plans(path):
    """(prefill, decode, select) plans from the "best" of a ``tune_kernels.py --out`` file; a
    family the sweep did not cover gets None (the kernel's default)."""
    from lserve_hf.kernels import DecodePlan, PrefillPlan, SelectPlan

    with open(path) as f:
        best = json.load(f)["best"]
    return tuple(cls(**best[name]) if name in best else None
                 for name, cls in (("prefill", PrefillPlan), ("decode", DecodePlan),
                                   ("select", SelectPlan)))


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=None, help="write all figures as JSON to this path")
    ap.add_argument("--prefill", default="8192,32768,131072", help="prefill lengths")
    ap.add_argument("--decode", default="32768,131072,524288", help="decode context lengths")
    ap.add_argument("--locals", default="1024,8192", help="streaming local windows at prefill")
    ap.add_argument("--decode-fracs", default="0.5,0", help="streaming fractions at decode")
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention")
    ap.add_argument("--plans", default=None, metavar="FILE",
                    help="launch plans: the best of a `tune_kernels --out FILE` sweep")
    args = ap.parse_args(argv)
    if C.gpu_missing(ap.prog):
        return 2
    import triton

    from lserve_hf.kernels import DEFAULT_DECODE_PLAN, DEFAULT_SELECT_PLAN, default_prefill_plan

    prefill_plan, decode_plan, select_plan = load_plans(args.plans) if args.plans else (None,) * 3
    asdict = dataclasses.asdict
    used = {"prefill_plan": asdict(prefill_plan) if prefill_plan else
            {"default": {"pointer": asdict(default_prefill_plan(C.D, False)),
                         "tma": asdict(default_prefill_plan(C.D, True))}},
            "decode_plan": asdict(decode_plan or DEFAULT_DECODE_PLAN),
            "select_plan": asdict(select_plan or DEFAULT_SELECT_PLAN)}
    print("launch parameters:", used, flush=True)
    device = C.DEVICE
    rows, checks = [], []
    lengths = [int(x) for x in args.prefill.split(",") if x]
    locals_ = [int(x) for x in args.locals.split(",") if x]
    bench_decode([int(x) for x in args.decode.split(",") if x],
                 [float(x) for x in args.decode_fracs.split(",") if x], rows, checks, device,
                 decode_plan, select_plan)
    bench_prefill(lengths, locals_, rows, checks, device, plan=prefill_plan, with_flex=not args.no_flex)
    print("\nchecks:")
    for c in checks:
        print("  ", json.dumps(c))
    print("\nsummary (ms for prefill, us for decode per layer):")
    for r in rows:
        print(_fmt_row(r))
    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__,
              "shapes": {"hq": C.HQ, "hkv": C.HKV, "d": C.D, "dtype": str(C.DTYPE), "batch": 1,
                         "prefill_sink": C.PREFILL_SINK, "decode_sink": C.DECODE_SINK,
                         "decode_local": C.DECODE_LOCAL, "page": C.PAGE, "logical_page": C.LOGICAL,
                         "budget": C.BUDGET, "selector_interval": C.INTERVAL},
              "launch_parameters": used, "rows": rows, "checks": checks}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
