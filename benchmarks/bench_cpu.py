"""The embedded model on the CPU (the torch path), dense against LServe's defaults, through
``generate()``: time to first token and time per output token, at each prompt length.

A logits processor stamps the time of every generated token (it runs once per step, after the
step's forward), so one ``generate()`` call gives both figures: TTFT = first stamp - call start,
TPOT = (last stamp - first stamp) / (new tokens - 1). Dense and LServe alternate in one process
(the order reversed every repetition); medians and the spread (min-max) over ``--reps``.

    python -m lserve_hf.benchmarks.bench_cpu --lengths 4096 7000 --reps 3 --out cpu.json
    python -m lserve_hf.benchmarks.bench_cpu --lengths 4096 --count-ops
"""

from __future__ import annotations

import argparse
import contextlib
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


def decode_ops(model, x, steps: int = 4) -> float:
    """Tensor operations dispatched per decode step (a ``TorchDispatchMode`` counts them) after a
    prefill of ``x`` and one warm step: what the per-layer Python work of a CPU decode step
    scales with, free of the timing noise of a shared machine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        out = model(**x, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(steps + 1):
            with Count() if i else contextlib.nullcontext():
                out = model(token, past_key_values=cache, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
    return Count.n / steps


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 7000], help="prompt lengths (tokens)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each method at each length")
    ap.add_argument("--new-tokens", type=int, default=17, help="tokens generated per call")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON of every run and the medians")
    ap.add_argument("--count-ops", action="store_true",
                    help="instead of timing, count the tensor operations of a decode step")
    args = ap.parse_args(argv)

    from lserve_hf import load_embedded_model, patch_model, unpatch_model
    from lserve_hf.passkey import passkey_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    if args.count_ops:
        for n in args.lengths:
            x = tok(passkey_prompt(tok, n, 0.5, chat=False).text, return_tensors="pt", add_special_tokens=False)
            counts = {}
            for method in ("dense", "lserve"):
                (unpatch_model if method == "dense" else patch_model)(model)
                counts[method] = decode_ops(model, x)
            unpatch_model(model)
            print(f"{x.input_ids.shape[1]:>6} tokens: tensor operations per decode step: dense {counts['dense']:.0f}, "
                  f"LServe {counts['lserve']:.0f}", flush=True)
        return 0
    # one untimed short call per method first: the first call of a process pays one-time set-up
    # (thread pools, kernel selection) that would otherwise land on whichever method runs first
    warm = tok(passkey_prompt(tok, 512, 0.5, chat=False).text, return_tensors="pt", add_special_tokens=False)
    for method in ("dense", "lserve"):
        (unpatch_model if method == "dense" else patch_model)(model)
        run_once(model, warm, 2)
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
