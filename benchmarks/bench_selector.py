"""Decode per layer with each page selector (``LServeConfig.selector``), on Llama-3-8B attention
shapes (32 query heads, 8 KV heads, D=128, bf16, batch 1, 50% streaming heads, budget 4096):

- ``reuse``: LServe's rule, every head chooses afresh every 4 steps and reuses in between;
- ``drift``: a head chooses afresh when its query (before RoPE) drifts under cosine 0.8 from the
  one that chose, every head every 16 steps; timed at fixed drift rates (the share of query
  heads that drift at a step), since the rate is a property of the text, not of the kernels;
- ``fresh``: every head chooses afresh at every step.

A step runs what the serving path runs: ``lserve_hf.selector.PageSelector.read_list`` (page
choice, the drift test, the newest page) and the sparse decode, replayed from CUDA graphs over
several layers' inputs (``benchmarks/common.py``). The queries alternate between two sets whose
heads differ by a cosine above or below the threshold, so that exactly the chosen share of
heads drifts at every step. Per layer: (one refresh + (interval - 1) other steps) / interval.

    python -m lserve_hf.benchmarks.bench_selector --out selector.json
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import torch

from . import common as C

RATES = (0.0, 0.1, 0.25, 0.5, 1.0)


def _selector(kind: str):
    from lserve_hf import LServeConfig
    from lserve_hf.selector import PageSelector

    cfg = LServeConfig(token_budget=C.BUDGET, page_size=C.PAGE, logical_page_size=C.LOGICAL,
                       selector="reuse" if kind == "reuse" else "drift", backend="triton")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, C.D, 2, device=C.DEVICE).float() / C.D))
    return PageSelector(cfg, dense=False, rope_inv_freq=inv_freq), cfg


def _queries(s, rate, seed):
    """Two query sets for set ``s``: the second equals the first for a (1 - rate) share of the
    query heads (cosine 1) and is unrelated for the rest (cosine about 0)."""
    g = torch.Generator(device=C.DEVICE).manual_seed(seed)
    a = s["q_retr"].clone()
    b = a.clone()
    drift = torch.rand(a.shape[:3], generator=g, device=C.DEVICE) < rate
    other = torch.randn(a.shape, generator=g, device=C.DEVICE, dtype=a.dtype)
    b[drift] = other[drift]
    return a, b


def bench_length(n, rows):
    sets = C.decode_sets(n, 0.5, C.DEVICE)
    for s in sets:
        s["pool"] = types.SimpleNamespace(capacity=s["pool_k"].shape[2], kmax=s["kmax"], kmin=s["kmin"])

    def step(sel, s, q, selects):
        s["q_retr"].copy_(q)
        pages = sel.read_list(s["q_retr"], s["pool"], s["lengths"], selects)
        C.decode(s, pages)

    result = {"tokens": n}
    for kind, rates in (("reuse", (None,)), ("fresh", (None,)), ("drift", RATES)):
        for rate in rates:
            sels = []
            for i, s in enumerate(sets):
                sel, cfg = _selector(kind)
                qa, qb = _queries(s, rate or 0.0, i)
                step(sel, s, qa, True)            # the refresh that makes the first selection
                sels.append((sel, s, qa, qb))
            torch.cuda.synchronize()
            refresh = C.graph_time(lambda: [step(sel, s, qa, True) for sel, s, qa, qb in sels], C.ROTATE)
            if kind == "fresh":
                per_layer = refresh
            else:
                # two steps a replay, queries a then b: a drifted head drifts back at the next step
                other = C.graph_time(lambda: [step(sel, s, q, False) for sel, s, qa, qb in sels
                                              for q in (qb, qa)], 2 * C.ROTATE)
                every = cfg.refresh_interval
                per_layer = (refresh + (every - 1) * other) / every
            name = kind if rate is None else f"drift@{rate:g}"
            result[name] = per_layer * 1e3
            print(f"{n:>7} {name:<10} {per_layer * 1e3:7.1f} us per layer", flush=True)
    rows.append(result)
    del sets
    torch.cuda.empty_cache()


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", default="32768,131072,524288", help="decode context lengths")
    ap.add_argument("--out", default=None, help="write the figures as JSON to this path")
    args = ap.parse_args(argv)
    if C.gpu_missing(prog or "bench_selector"):
        return 2
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        bench_length(n, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("\nus per layer (decode + page choice), 50% streaming, budget 4096:")
    names = [k for k in rows[0] if k != "tokens"]
    print(f"{'tokens':>8} " + " ".join(f"{k:>10}" for k in names))
    for r in rows:
        print(f"{r['tokens']:>8} " + " ".join(f"{r[k]:>10.1f}" for k in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
