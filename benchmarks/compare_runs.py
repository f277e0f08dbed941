"""Before/after table of two ``bench_kernels --out`` JSON files (rows matched by kind, tokens,
streaming fraction and local window). Needs no GPU.

    python -m lserve_hf.benchmarks.compare_runs before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys


def _load(path):
    with open(path) as f:
        d = json.load(f)
    return d, {(r["kind"], r["tokens"], r["streaming"], r.get("local")): r for r in d["rows"]}


def compare(before_path, after_path):
    (_, before), (da, after) = _load(before_path), _load(after_path)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="bench_kernels --out file of the earlier run")
    ap.add_argument("after", help="bench_kernels --out file of the later run")
    args = ap.parse_args(argv)
    compare(args.before, args.after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
