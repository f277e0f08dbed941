"""The real-prose needle evaluation behind EVAL.md: a 5-digit secret code in CPython's reference
documentation (``pydoc_data.topics``, shipped with Python), at several depths, seeds and context
lengths, answered greedily by the embedded SmolLM2-135M-Instruct, dense and patched.

Methods, on the same prompts: dense (unpatched); LServe with 50% streaming heads (the shipped
pattern); page selection only (no streaming heads); streaming only (every head streams). Each
LServe method runs at token budgets of a quarter and an eighth of the context and at the model's
default (``patch_model``'s scaled budget), with the default drift selector and with LServe's
plain reuse (``selector="reuse"``). Writes ``prose.json`` (every case: method, budget, selector,
length, depth, seed, output, correct) and ``accuracy_vs_length.png`` (one panel per budget: dense
against every method, correct answers against context length), and prints the table.

    python -m lserve_hf.benchmarks.eval_prose --out eval_prose --device cuda

``--methods`` picks some of them; ``lserve-dynamic`` (not in the default set) is LServe with the
dynamic prefill of the retrieval heads (``prefill_dynamic=True``), to compare with ``lserve``:

    python -m lserve_hf.benchmarks.eval_prose --methods lserve lserve-dynamic --selectors drift \
        --budgets default --seeds 0 --out eval_dynamic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

DEPTHS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
BUDGETS = ("1/4", "1/8", "default")


ALL_METHODS = ("dense", "lserve", "page-selection-only", "streaming-only", "lserve-dynamic")
DEFAULT_METHODS = ALL_METHODS[:4]


def methods(names=DEFAULT_METHODS):
    """(name, LServeConfig overrides or None for dense, selectors it runs with), for ``names``.
    ``lserve-dynamic``: LServe with the dynamic prefill of the retrieval heads
    (``prefill_dynamic=True``, its default threshold), the default selector."""
    every = [("dense", None, (None,)),
             ("lserve", dict(streaming_sparsity=0.5), ("drift", "reuse")),
             ("page-selection-only", dict(streaming_sparsity=0.0), ("drift", "reuse")),
             ("streaming-only", dict(streaming_sparsity=1.0), (None,)),
             ("lserve-dynamic", dict(streaming_sparsity=0.5, prefill_dynamic=True), ("drift",))]
    return [m for m in every if m[0] in names]


def budget_tokens(budget: str, length: int, page: int = 64) -> int | None:
    if budget == "default":
        return None
    num, den = (int(x) for x in budget.split("/"))
    return max(page, round(length * num / den / page) * page)


def run(model, tok, lengths, seeds, depths, budgets, out_dir, device, progress=True, names=DEFAULT_METHODS,
        selectors=None):
    import torch
    from tqdm.auto import tqdm

    from lserve_hf import LServeConfig, patch_model, unpatch_model
    from lserve_hf.evaluation import make_case, passed

    records = []
    cases = [make_case(tok, "code", L, d, seed=s, haystack="prose") for L in lengths for s in seeds for d in depths]
    runs = [(name, over, sel, b) for name, over, sels in methods(names) for sel in sels
            if sel is None or selectors is None or sel in selectors
            for b in (budgets if over is not None and over["streaming_sparsity"] < 1 else ("default",))
            if over is not None or b == "default"]
    bar = tqdm(total=len(cases) * len(runs), desc="prose needles", disable=not progress)
    for c in cases:
        x = tok(c.prompt, return_tensors="pt").to(device)
        for name, over, sel, budget in runs:
            if over is None:
                unpatch_model(model)
            else:
                cfg = dict(over, token_budget=budget_tokens(budget, c.length))
                if sel is not None:
                    cfg["selector"] = sel
                patch_model(model, LServeConfig(**cfg))
            t0 = time.perf_counter()
            with torch.no_grad():
                y = model.generate(**x, max_new_tokens=c.max_new_tokens, do_sample=False)
            answer = tok.decode(y[0, x.input_ids.shape[1]:], skip_special_tokens=True)
            resolved = getattr(model, "_lserve", None)
            records.append(dict(method=name, selector=sel, budget=budget, length=c.length, n_tokens=c.n_tokens,
                                depth=c.depth, seed=c.seed, expected=c.expected[0], output=answer.strip(),
                                correct=passed(answer, c.expected), seconds=round(time.perf_counter() - t0, 3),
                                token_budget=resolved.config.token_budget if resolved else None))
            bar.update()
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "prose.json"), "w") as f:
            json.dump(records, f, indent=0)
    bar.close()
    unpatch_model(model)
    return records


def table(records) -> str:
    lengths = sorted({r["length"] for r in records})
    keys = list(dict.fromkeys((r["method"], r["selector"], r["budget"]) for r in records))
    lines = [f"{'method':<22}{'selector':<10}{'budget':<9}" + "".join(f"{L:>9}" for L in lengths)]
    for m, s, b in keys:
        cells = []
        for L in lengths:
            rs = [r["correct"] for r in records if (r["method"], r["selector"], r["budget"], r["length"]) == (m, s, b, L)]
            cells.append(f"{sum(rs):>6}/{len(rs):<2}")
        lines.append(f"{m:<22}{s or '-':<10}{b:<9}" + "".join(cells))
    return "\n".join(lines)


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in records if r["method"] != "dense")]
    lengths = sorted({r["length"] for r in records})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), squeeze=False,
                             constrained_layout=True, sharey=True)

    def acc(pick):
        return [sum(r["correct"] for r in pick(L)) / max(1, len(pick(L))) for L in lengths]

    for ax, b in zip(axes[0], budgets):
        ax.plot(lengths, acc(lambda L: [r for r in records if r["method"] == "dense" and r["length"] == L]),
                "k-o", label="dense", lw=2)
        for m, s in dict.fromkeys((r["method"], r["selector"]) for r in records if r["method"] != "dense"):
            pick = [r for r in records if (r["method"], r["selector"]) == (m, s)
                    and (r["budget"] == b or m == "streaming-only")]
            if pick:
                style = "--" if s == "reuse" else "-"
                ax.plot(lengths, acc(lambda L: [r for r in pick if r["length"] == L]), style, marker=".",
                        label=m + (f" ({s})" if s else ""))
        ax.set_title(f"budget {b} of the context" if b != "default" else "default budget")
        ax.set_xlabel("context (tokens)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("correct (share of cases)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Secret code in real prose, SmolLM2-135M-Instruct: dense vs LServe")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 6144, 7680])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="fractions of the context, or default")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    ap.add_argument("--selectors", nargs="+", default=None, choices=["drift", "reuse"],
                    help="only these selectors of the LServe methods (default: each method's)")
    ap.add_argument("--device", default=None, help="e.g. cuda (bf16 there); default CPU, float32")
    ap.add_argument("--out", default="eval_prose", help="output folder")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from lserve_hf import load_embedded_model

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device and args.device.startswith("cuda") else None
    model, tok = load_embedded_model(device=args.device, dtype=dtype, progress=not args.no_progress)
    t0 = time.perf_counter()
    records = run(model, tok, args.lengths, args.seeds, args.depths, args.budgets, args.out,
                  args.device or "cpu", progress=not args.no_progress, names=args.methods,
                  selectors=args.selectors)
    print(table(records))
    print(f"\n{len(records)} generations in {time.perf_counter() - t0:.0f} s; "
          f"{os.path.join(args.out, 'prose.json')}")
    try:
        plot(records, os.path.join(args.out, "accuracy_vs_length.png"))
    except ImportError:
        print("install matplotlib (pip install matplotlib) for the figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
