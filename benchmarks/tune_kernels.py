"""Launch-plan sweep of the Triton kernels on this GPU (Llama-3-8B attention shapes, bf16).

Each candidate is the kernel's default plan with a few fields changed (``dataclasses.replace``),
passed to the kernel as its ``plan``; nothing is written into the kernel modules. Prefill: block
shapes with pointer and TMA loads (32K, dense + 50% streaming local 1024; the three fastest and
the fastest pointer-load plan again at 128K). Decode: split sizes, pipeline depth, warps and PDL
(128K, 50% streaming, graph replay). Selection: sort chunks, warps, partial sorting, score tiles
and PDL (128K and 512K, 50%; the best is the lowest sum). Prints the fastest plan of each;
``--out FILE`` writes every timing and those plans as JSON, which ``bench_kernels --plans FILE``
runs with. ``--prefill-parts`` instead times where the 50%-streaming prefill goes at 128K.
Needs a CUDA GPU.

    python -m lserve_hf.benchmarks.tune_kernels --out tune.json [--parts decode,select]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from lserve_hf.benchmarks import common as C

# context lengths swept: prefill (then the fastest plans again at the long one), decode, selection
SWEEP_PREFILL, SWEEP_PREFILL_LONG, SWEEP_DECODE, SWEEP_SELECT = 32768, 131072, 131072, 524288


def _timed(label, fn):
    """fn()'s result, or None after printing why the candidate failed (a plan may not fit the
    GPU's shared memory or registers)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        print(f"  {label} failed: {type(exc).__name__} {str(exc)[:160]}", flush=True)
        return None


def sweep_prefill(device):
    """Timings of the prefill candidates, and the fastest plan overall and with pointer loads."""
    from lserve_hf.benchmarks.bench_kernels import bench_prefill
    from lserve_hf.kernels import PrefillPlan

    cands = [PrefillPlan(128, 64, 8, 3, tma=False)] + [
        PrefillPlan(*c, tma=True) for c in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2),
                                            (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
                                            (64, 64, 4, 3), (64, 128, 4, 2)]]

    def run(plan, n, rep):
        rows = []
        bench_prefill([n], [1024], rows, [], device, plan=plan, with_flex=False, rep=rep)
        return {"plan": dataclasses.asdict(plan), "tokens": n, "dense_ms": rows[0]["triton_ms"],
                "stream50_ms": rows[1]["triton_ms"], "sdpa_ms": rows[0]["sdpa_ms"]}

    out = []
    for plan in cands:
        r = _timed(f"prefill {plan}", lambda: run(plan, SWEEP_PREFILL, 100))
        if r is not None:
            out.append((plan, r))
            print(f"  ^ prefill {plan}: dense + 50% = {r['dense_ms'] + r['stream50_ms']:.2f} ms", flush=True)
    if not out:
        return [], {}
    total = lambda pr: pr[1]["dense_ms"] + pr[1]["stream50_ms"]  # noqa: E731
    best = {"prefill": min(out, key=total)[0]}
    pointer = [pr for pr in out if not pr[0].tma]
    if pointer:
        best["prefill_pointer"] = min(pointer, key=total)[0]
    # The three fastest at 32K (and the fastest pointer-load plan) again at 128K, where the
    # kernel spends its time in long loops.
    again = [pr[0] for pr in sorted(out, key=total)[:3]]
    if pointer and best["prefill_pointer"] not in again:
        again.append(best["prefill_pointer"])
    rows = [r for _, r in out]
    for plan in again:
        r = run(plan, SWEEP_PREFILL_LONG, 1500)
        rows.append(r)
        print(f"  ^ {SWEEP_PREFILL_LONG // 1024}K prefill {plan}: dense {r['dense_ms']:.1f} ms, 50% {r['stream50_ms']:.1f} ms "
              f"(SDPA {r['sdpa_ms']:.1f})", flush=True)
    return rows, best


def sweep_decode(device):
    """Timings of the decode candidates (graph replay, 4 calls a replay) and the fastest plan."""
    from lserve_hf.kernels import DEFAULT_DECODE_PLAN

    base = DEFAULT_DECODE_PLAN
    cands = [dataclasses.replace(base, pdl=p) for p in (True, False, "late")]
    # split sizes and pipeline depths (128 programs of 8 pages plus the streaming ones fill the
    # 132 multiprocessors once; 256 programs of 4 pages with 2 stages was the plan before the
    # page numbers were loaded first), then steps of two pages
    cands += [dataclasses.replace(base, target_programs=tp, min_split_tokens=mt, num_stages=st)
              for tp, mt, st in ((96, 512, 3), (128, 512, 4), (256, 256, 3), (256, 256, 2))]
    cands += [dataclasses.replace(base, block_t=128, num_warps=w, num_stages=2) for w in (4, 8)]
    sets = C.decode_sets(SWEEP_DECODE, 0.5, device)
    for s in sets:
        s["pages"] = C.select(s)
    rows, best = [], None
    for plan in cands:
        t = _timed(f"decode {plan}",
                   lambda: C.graph_time(lambda: [C.decode(s, plan=plan) for s in sets], C.ROTATE) * 1e3)
        if t is None:
            continue
        rows.append({"plan": dataclasses.asdict(plan), "decode_us": t})
        print(f"  decode 128K 50% {plan}: {t:.1f} us", flush=True)
        if best is None or t < best[1]:
            best = (plan, t)
    del sets
    torch.cuda.empty_cache()
    return rows, ({"decode": best[0]} if best else {})


def sweep_select(device):
    """Timings of the selection candidates at 128K and 512K and the plan of the lowest sum."""
    from lserve_hf.kernels import DEFAULT_SELECT_PLAN
    from lserve_hf.kernels.page_selector import _scores

    base = DEFAULT_SELECT_PLAN
    cands = [dataclasses.replace(base, partial_sort=False, sort_warps=4, pdl=False)]  # before tl.topk
    cands += [dataclasses.replace(base, chunk=c, sort_warps=w) for c in (512, 1024) for w in (4, 8)]
    cands += [dataclasses.replace(base, pdl=p) for p in (False, True)]
    cands += [dataclasses.replace(base, score_dot_rows=r, score_dot_warps=w) for r, w in ((64, 4), (32, 4))]
    times = {}
    for n in (SWEEP_DECODE, SWEEP_SELECT):
        sets = C.decode_sets(n, 0.5, device)
        for i, plan in enumerate(cands):
            def select_all():
                for s in sets:
                    C.select(s, plan)

            def score_all():   # the selection's first launch alone, as select_pages runs it
                for s in sets:
                    _scores(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], C.PAGE, C.LOGICAL,
                            True, True, plan)

            t = _timed(f"select {plan}", lambda: (C.graph_time(select_all, C.ROTATE) * 1e3,
                                                  C.graph_time(score_all, C.ROTATE) * 1e3))
            if t is not None:
                times.setdefault(i, {})[n] = t
                print(f"  select {n // 1024}K 50% {plan}: {t[0]:.1f} us (scores alone {t[1]:.1f} us)",
                      flush=True)
        del sets
        torch.cuda.empty_cache()
    rows = [{"plan": dataclasses.asdict(cands[i]), "select_128k_us": t.get(SWEEP_DECODE, (None,))[0],
             "select_us": t.get(SWEEP_SELECT, (None,))[0],
             "score_only_us": t.get(SWEEP_SELECT, (None, None))[1]} for i, t in times.items()]
    both = [i for i, t in times.items() if len(t) == 2]
    if not both:
        return rows, {}
    i = min(both, key=lambda i: times[i][SWEEP_DECODE][0] + times[i][SWEEP_SELECT][0])
    return rows, {"select": cands[i]}


def prefill_parts(device, n=SWEEP_PREFILL_LONG, local=1024):
    """Where the 50%-streaming prefill time goes: the dense half alone (16 query / 4 KV heads),
    all heads streaming, and the mix, next to dense and SDPA."""
    from lserve_hf.kernels import block_sparse_prefill

    torch.manual_seed(0)
    res = []

    def run(hq, hkv, streaming, label):
        q, k, v, out = C.prefill_inputs(n, device, hq, hkv)
        st = torch.tensor(streaming, device=device)
        t = C.bench(lambda: block_sparse_prefill(q, k, v, st, C.PREFILL_SINK, local, out=out), 1500)
        res.append({"what": label, "ms": t})
        print(f"  prefill {n} {label:<32} {t:8.2f} ms", flush=True)

    run(C.HQ, C.HKV, [False] * C.HKV, "dense 32/8")
    run(C.HQ, C.HKV, C.streaming_mask(0.5).tolist(), "50% streaming 32/8")
    run(C.HQ // 2, C.HKV // 2, [False] * (C.HKV // 2), "dense half only 16/4")
    run(C.HQ, C.HKV, [True] * C.HKV, "all streaming 32/8")
    q, k, v, _ = C.prefill_inputs(n, device)
    t = C.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 1500)
    res.append({"what": "sdpa dense", "ms": t})
    print(f"  prefill {n} sdpa dense {t:8.2f} ms", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="prefill,decode,select",
                    help="what to sweep (comma list of prefill, decode, select)")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="write the timings and the best plans as JSON (for bench_kernels --plans)")
    ap.add_argument("--prefill-parts", action="store_true",
                    help="only time the parts of the 50%%-streaming prefill at 128K")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"prefill", "decode", "select"}
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}; use prefill, decode, select")
    if C.gpu_missing("tune_kernels"):
        return 2
    if args.prefill_parts:
        result = {"prefill_parts": prefill_parts(C.DEVICE)}
    else:
        result, best = {}, {}
        for name, fn in (("prefill", sweep_prefill), ("decode", sweep_decode), ("select", sweep_select)):
            if name in parts:
                result[name], found = fn(C.DEVICE)
                best.update(found)
        print("best plans:")
        for name, plan in best.items():
            print(f"  {name}: {plan}")
        result["best"] = {name: dataclasses.asdict(plan) for name, plan in best.items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
