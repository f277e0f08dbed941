"""Head patterns compared on the embedded model (or any local model): the accuracy LServe keeps
with each pattern's streaming heads, on the same seeded prompts (``lserve_hf.evaluation``).

Patterns: any ``full_attention_heads.tsv`` given as ``name=path``, plus two baselines computed
here: ``random`` (uniform scores, seeded) and ``first-half`` (each layer's lowest-index KV heads
stream first). Every pattern runs at each ``--sparsity`` with the same ``LServeConfig``; dense
runs once as the reference.

    python benchmarks/compare_patterns.py gates=out/gates probe=lserve_hf/shipped_patterns/SmolLM2-135M-Instruct \\
        --sparsity 0.5 0.75 --lengths 2000 3000 4000 --device cuda --out compare.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch


def first_half_scores(layers: int, heads: int) -> torch.Tensor:
    """Scores that make the global-quantile rule stream each layer's first heads first (ties go
    to the lower layer), e.g. at 50% heads 0 (and 1, ...) of every layer."""
    return (torch.arange(heads, dtype=torch.float32) / max(heads - 1, 1)).expand(layers, heads).clone()


def main(argv=None):
    from lserve_hf import LServeConfig
    from lserve_hf.heads import load_pattern
    from lserve_hf.evaluation.runner import evaluate, load_model
    from lserve_hf.evaluation.tasks import make_grid

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patterns", nargs="*", help="name=path of a full_attention_heads.tsv (or its folder)")
    ap.add_argument("--model", default=None, help="local model folder; default: the embedded model")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 3000, 4000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--prefill-local", type=int, default=256)
    ap.add_argument("--decode-local", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON of every case")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, args.device)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    patterns = {name: load_pattern(path) for name, path in (p.split("=", 1) for p in args.patterns)}
    patterns["random"] = torch.rand(L, H, generator=torch.Generator().manual_seed(args.seed))
    patterns["first-half"] = first_half_scores(L, H)
    cases = make_grid(tok, args.tasks, args.lengths, args.depths, args.seed)
    base = LServeConfig(token_budget=args.token_budget, prefill_local=args.prefill_local,
                        decode_local=args.decode_local)
    # dense, and the two pattern-free baselines: every head streaming / no head streaming
    records = [dict(r, pattern=r["method"], sparsity={"streaming-only": 1.0}.get(r["method"], 0.0))
               for r in evaluate(model, tok, cases, ("dense", "streaming-only", "page-selection-only"), base,
                                 progress=False)]
    for name, scores in patterns.items():
        for s in args.sparsity:
            cfg = replace(base, streaming_sparsity=s)
            records += [dict(r, pattern=name, sparsity=s)
                        for r in evaluate(model, tok, cases, ("lserve",), cfg, scores, progress=False)]
            print(f"{name:>12} {s:.2f}: {sum(r['passed'] for r in records[-len(cases):])}/{len(cases)}", flush=True)
    print(f"\n{'pattern':>20} {'streaming':>9} " + " ".join(f"{n:>6}" for n in args.lengths) + "   all")
    for name in ["dense", "streaming-only", "page-selection-only"] + list(patterns):
        for s in args.sparsity if name in patterns else [None]:
            rs = [r for r in records if r["pattern"] == name and (s is None or r["sparsity"] == s)]
            cells = [f"{sum(r['passed'] for r in rs if r['length'] == n)}/{sum(r['length'] == n for r in rs)}"
                     for n in args.lengths]
            print(f"{name:>20} {'' if s is None else f'{s:.0%}':>9} " + " ".join(f"{c:>6}" for c in cells)
                  + f"  {sum(r['passed'] for r in rs)}/{len(rs)}")
    if args.out:
        meta = dict(device=str(model.device), date=time.strftime("%Y-%m-%d"), tasks=args.tasks,
                    lengths=args.lengths, depths=args.depths, token_budget=args.token_budget,
                    prefill_local=args.prefill_local, decode_local=args.decode_local)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, cases=records), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
