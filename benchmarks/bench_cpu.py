"""The embedded model on the CPU (the torch path), dense against LServe's defaults, through
``generate()``: time to first token and time per output token, at each prompt length.

A logits processor stamps the time of every generated token (it runs once per step, after the
step's forward), so one ``generate()`` call gives both figures: TTFT = first stamp - call start,
TPOT = (last stamp - first stamp) / (new tokens - 1). Dense and LServe alternate in one process
(the order reversed every repetition); medians and the spread (min-max) over ``--reps``.

    python -m lserve_hf.benchmarks.bench_cpu --lengths 4096 7000 --reps 3 --out cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lserve_hf.benchmarks.common import save_json


class _Stamps(LogitsProcessor):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_once(model, x, new_tokens, stamps=None):
    """(TTFT s, TPOT ms) of one greedy ``generate()`` of ``new_tokens`` tokens on inputs ``x``."""
    stamps = _Stamps() if stamps is None else stamps
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]))
    t = stamps.times
    return t[0] - t0, (t[-1] - t[0]) / (len(t) - 1) * 1e3


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 7000], help="prompt lengths (tokens)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each method at each length")
    ap.add_argument("--new-tokens", type=int, default=17, help="tokens generated per call")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON of every run and the medians")
    args = ap.parse_args(argv)

    from lserve_hf import load_embedded_model, patch_model, unpatch_model
    from lserve_hf.passkey import passkey_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    runs, rows = [], []
    for n in args.lengths:
        p = passkey_prompt(tok, n, 0.5, chat=False)
        x = tok(p.text, return_tensors="pt", add_special_tokens=False)
        for rep in range(args.reps):
            for method in (("dense", "lserve") if rep % 2 == 0 else ("lserve", "dense")):
                if method == "dense":
                    unpatch_model(model)
                else:
                    patch_model(model)
                ttft, tpot = run_once(model, x, args.new_tokens)
                runs.append(dict(tokens=x.input_ids.shape[1], method=method, rep=rep, ttft_s=ttft, tpot_ms=tpot))
                print(f"{runs[-1]['tokens']:>6} {method:<7} rep {rep}: TTFT {ttft:6.2f} s  TPOT {tpot:6.1f} ms",
                      flush=True)
        unpatch_model(model)
        for method in ("dense", "lserve"):
            mine = [r for r in runs if r["tokens"] == x.input_ids.shape[1] and r["method"] == method]
            row = dict(tokens=mine[0]["tokens"], method=method)
            for key in ("ttft_s", "tpot_ms"):
                vals = [r[key] for r in mine]
                row[key], row[key + "_min"], row[key + "_max"] = statistics.median(vals), min(vals), max(vals)
            rows.append(row)
    print(f"\nmedians over {args.reps} runs (min-max), {torch.get_num_threads()} threads:")
    print(f"{'tokens':>7} {'method':<7} {'TTFT s':>18} {'TPOT ms':>20}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['method']:<7} {r['ttft_s']:7.2f} ({r['ttft_s_min']:.2f}-{r['ttft_s_max']:.2f}) "
              f"{r['tpot_ms']:7.1f} ({r['tpot_ms_min']:.1f}-{r['tpot_ms_max']:.1f})")
    for n in sorted({r["tokens"] for r in rows}):
        d, s = (next(r for r in rows if r["tokens"] == n and r["method"] == m) for m in ("dense", "lserve"))
        print(f"{n:>7} LServe / dense: TTFT {s['ttft_s'] / d['ttft_s']:.2f}x  TPOT {s['tpot_ms'] / d['tpot_ms']:.2f}x")
    if args.out:
        save_json(args.out, {"runs": runs, "medians": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
