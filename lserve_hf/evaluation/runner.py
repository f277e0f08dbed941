"""Run a grid of long-context cases through several attention methods on the same prompts, score
them, and write ``results.csv``, ``results.json``, a terminal summary, per-method heatmaps and an
accuracy-against-length comparison of the methods (``accuracy_vs_length.png``)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

from ..argtypes import HelpFormatter, check_device, fraction, model_folder, positive_int
from ..config import LServeConfig
from .scoring import score
from .tasks import HAYSTACKS, TASKS, Case, make_grid

METHODS = ("dense", "lserve", "streaming-only", "page-selection-only", "streaming-no-selection")
FIELDS = ("task", "length", "n_tokens", "depth", "method", "expected", "output", "score", "passed",
          "seconds")


# ---------------------------------------------------------------------------------------------
# Methods


def default_lserve_config(model, head_pattern=None) -> LServeConfig:
    """The shipped head pattern at 50% streaming when the model has one (else page selection only),
    with the budget scaled for small models: 512 tokens, prefill local 1024, decode local 256."""
    from ..heads import find_shipped_pattern

    has_pattern = head_pattern is not None or find_shipped_pattern(model.config) is not None
    return LServeConfig(streaming_sparsity=0.5 if has_pattern else 0.0, token_budget=512,
                        prefill_local=1024, decode_local=256)


def method_configs(names, base: LServeConfig, max_tokens: int) -> dict[str, LServeConfig | None]:
    """``{method: LServeConfig or None (dense)}``. ``max_tokens``: the longest prompt plus its new
    tokens; ``streaming-no-selection`` gets a budget above it, so no page selection ever happens."""
    out = {}
    for name in names:
        if name == "dense":
            out[name] = None
        elif name == "lserve":
            out[name] = base
        elif name == "streaming-only":
            out[name] = replace(base, streaming_sparsity=1.0)
        elif name == "page-selection-only":
            out[name] = replace(base, streaming_sparsity=0.0)
        elif name == "streaming-no-selection":
            budget = base.page_size * math.ceil(max(max_tokens, base.token_budget) / base.page_size)
            out[name] = replace(base, token_budget=budget)
        else:
            raise ValueError(f"method {name!r}: use one of {', '.join(METHODS)}.")
    return out


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """Greedy answer (new tokens only) and the seconds ``generate()`` took."""
    import torch

    x = tokenizer(prompt, return_tensors="pt").to(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None)
    seconds = time.perf_counter() - t0
    return tokenizer.decode(out[0, x.input_ids.shape[1]:], skip_special_tokens=True).strip(), seconds


# ---------------------------------------------------------------------------------------------
# Outputs


def write_results(records: list[dict], out_dir: str, meta: dict | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "expected": "|".join(r["expected"])})
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta or {}, "cases": records}, f, indent=1)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summary_table(records: list[dict]) -> str:
    """Accuracy (mean RULER score, %) per method x task x length, plus the mean seconds per case."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({r["length"] for r in records})
    head = f"{'method':<24}{'task':<17}" + "".join(f"{L:>8}" for L in lengths) + f"{'mean':>8}{'s/case':>8}"
    lines = [head, "-" * len(head)]
    for m in methods:
        for t in tasks:
            rs = [r for r in records if r["method"] == m and r["task"] == t]
            if not rs:
                continue
            cells = []
            for L in lengths:
                sc = [r["score"] for r in rs if r["length"] == L]
                cells.append(f"{100 * _mean(sc):>7.0f}%" if sc else f"{'-':>8}")
            lines.append(f"{m:<24}{t:<17}" + "".join(cells) + f"{100 * _mean([r['score'] for r in rs]):>7.0f}%"
                         + f"{_mean([r['seconds'] for r in rs]):>8.1f}")
    return "\n".join(lines)


def _panel_grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` task panels: at most 3 side by side, so that a figure of many
    tasks wraps into rows instead of growing too wide to read."""
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def _mean_scores(records, keys) -> dict[tuple, float]:
    """Mean score per combination of the ``keys`` fields, e.g. ``{(method, task, length): 0.75}``."""
    groups = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r["score"])
    return {k: _mean(v) for k, v in groups.items()}


def _finish_panels(axes, n: int) -> None:
    """Hide the panels past the ``n`` used, and give the panel above a hidden one back its x tick
    labels (``label_outer`` leaves them to the bottom row only)."""
    rows, cols = axes.shape
    for i in range(n, rows * cols):
        axes.flat[i].set_axis_off()
        if i >= cols:
            axes.flat[i - cols].xaxis.set_tick_params(labelbottom=True)


def plot_heatmaps(records: list[dict], out_dir: str, prefix: str = "heatmap") -> list[str]:
    """One PNG per method: a length x depth grid of mean scores (%), one panel per task."""
    from ..plotting import new_figure

    paths = []
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    rows, cols = _panel_grid(len(tasks))
    # a cell of about 0.5 x 0.35 inch holds its "100"; the margins hold ticks, titles, the colorbar
    panel_w, panel_h = 0.9 + 0.5 * len(depths), 0.7 + 0.35 * len(lengths)
    mean = _mean_scores(records, ("method", "task", "length", "depth"))
    for m in dict.fromkeys(r["method"] for r in records):
        fig = new_figure("the heatmaps", figsize=(max(3.5, 1.3 + cols * panel_w),
                                                  max(2.6, 0.9 + rows * panel_h)))
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
        for ax, t in zip(axes.flat, tasks):
            grid = [[mean.get((m, t, L, d), math.nan) for d in depths] for L in lengths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
            ax.set_title(t, fontsize=9)
            ax.label_outer()           # shared axes: tick labels on the outer panels only
        _finish_panels(axes, len(tasks))
        fig.colorbar(im, ax=axes, shrink=min(1.0, 0.5 + 0.1 * len(lengths)), aspect=25, pad=0.01,
                     label="score (%)", format=lambda v, _: f"{100 * v:.0f}")
        fig.supxlabel("needle depth (0: start of the haystack, 1: end)", fontsize=9)
        fig.supylabel("context (tokens)", fontsize=9)
        fig.suptitle(f"{m}: score per context length and needle depth", fontsize=10)
        path = os.path.join(out_dir, f"{prefix}_{m}.png")
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_accuracy_vs_length(records: list[dict], out_dir: str) -> str:
    """``accuracy_vs_length.png``: mean score (over depths) against context length, one line per
    method on each task's panel, so that dense and the LServe variants compare at a glance."""
    from ..plotting import new_figure

    tasks = list(dict.fromkeys(r["task"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    lengths = sorted({r["length"] for r in records})
    rows, cols = _panel_grid(len(tasks))
    fig = new_figure("the accuracy plot", figsize=(2.6 + 3.3 * cols, 1.2 + 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    mean = _mean_scores(records, ("method", "task", "length"))
    for ax, t in zip(axes.flat, tasks):
        for m in methods:
            pts = [(L, 100 * mean[m, t, L]) for L in lengths if (m, t, L) in mean]
            # dense, the reference, is a wide grey band underneath: a variant that matches it
            # stays visible on top of it instead of being hidden
            style = dict(color="0.55", linewidth=5, markersize=9, alpha=0.6, zorder=1) if m == "dense" \
                else dict(linewidth=1.5, markersize=4, zorder=2)
            ax.plot(*zip(*pts), marker="o", label=m, **style)
        ax.set_xticks(lengths, [str(L) for L in lengths], fontsize=8)
        ax.set_title(t, fontsize=9)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.label_outer()
    _finish_panels(axes, len(tasks))
    # beside the panels, not below them, where it would cover the shared x label
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.supxlabel("context length (tokens)", fontsize=9)
    fig.supylabel("accuracy (mean score, %)", fontsize=9)
    depths = sorted({r["depth"] for r in records})
    fig.suptitle(f"Accuracy against context length (mean over {len(depths)} needle "
                 f"depth{'s' if len(depths) > 1 else ''})", fontsize=10)
    path = os.path.join(out_dir, "accuracy_vs_length.png")
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Driver


def evaluate(model, tokenizer, cases: list[Case], methods=("dense", "lserve"),
             lserve_config: LServeConfig | None = None, head_pattern=None,
             max_new_tokens: int | None = None, out_dir: str | None = None, meta: dict | None = None,
             progress: bool = True) -> list[dict]:
    """Run every case through every method (same prompts, greedy decoding) and score it.

    Cases are taken in order and all methods run on a case before the next, so a run stopped early
    still compares every method on the cases done; with ``out_dir`` the CSV/JSON are rewritten after
    each case. Returns one record per (case, method)."""
    from tqdm.auto import tqdm

    from ..patch import patch_model, unpatch_model

    base = lserve_config or default_lserve_config(model, head_pattern)
    longest = max(c.n_tokens + (max_new_tokens or c.max_new_tokens) for c in cases)
    configs = method_configs(methods, base, longest)
    records = []
    bar = tqdm(total=len(cases) * len(configs), desc="eval", unit="case", disable=not progress,
               dynamic_ncols=True)
    try:
        for c in cases:
            for name, cfg in configs.items():
                bar.set_postfix_str(f"{c.task} {c.length} d={c.depth:g} {name}")
                if cfg is None:
                    unpatch_model(model)
                else:
                    patch_model(model, cfg, head_pattern=head_pattern)
                output, seconds = generate(model, tokenizer, c.prompt, max_new_tokens or c.max_new_tokens)
                s = score(output, c.expected)
                records.append(dict(task=c.task, length=c.length, n_tokens=c.n_tokens, depth=c.depth,
                                    method=name, expected=list(c.expected), output=output, score=s,
                                    passed=s == 1.0, seconds=round(seconds, 3)))
                bar.update(1)
            if out_dir:
                write_results(records, out_dir, meta)
    finally:
        bar.close()
        unpatch_model(model)
    return records


DESCRIPTION = ("Offline long-context evaluation (passkey, RULER-style needle-in-a-haystack, variable "
               "tracking): dense vs LServe variants on the same seeded prompts.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lserve-hf eval`` (also ``python -m lserve_hf.evaluation``)."""
    p.add_argument("--model", metavar="PATH", type=model_folder, default=None,
                   help="a local Transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"], choices=TASKS, metavar="TASK",
                   help=f"tasks to run: {', '.join(TASKS)}")
    p.add_argument("--lengths", metavar="N", type=positive_int, nargs="+", default=[1000, 2000],
                   help="prompt lengths (tokens)")
    p.add_argument("--depths", metavar="D", type=fraction, nargs="+", default=[0.1, 0.5, 0.9],
                   help="needle depths in [0, 1] (0: start of the haystack, 1: end)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"dense, full LServe, and ablations of its two sparsities: {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts (needles, keys, haystack)")
    p.add_argument("--haystack", default="filler", choices=HAYSTACKS, help="built-in haystack text")
    p.add_argument("--haystack-file", metavar="PATH", default=None, help="use this text file as the haystack")
    p.add_argument("--value-type", default="number", choices=["number", "uuid"],
                   help="needle values: 7-digit numbers or UUIDs")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--out", metavar="DIR", default="eval_out", help="output folder")
    p.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=None,
                   help="tokens generated per case (default: per task, 12 to 64)")
    p.add_argument("--device", metavar="DEVICE", default=None, help="e.g. cuda (default: CPU)")
    p.add_argument("--head-pattern", metavar="PATH", default=None,
                   help="full_attention_heads.tsv for --model (default: the model's shipped pattern, if any)")
    lserve = p.add_argument_group("LServe settings (default: 50% streaming heads when a pattern is known, "
                                  "budget 512, prefill local 1024, decode local 256)")
    lserve.add_argument("--streaming-sparsity", type=fraction, default=None,
                        help="fraction of KV heads that stream")
    lserve.add_argument("--token-budget", type=positive_int, default=None,
                        help="tokens a retrieval head reads per decode step (a multiple of 64)")
    lserve.add_argument("--prefill-local", type=positive_int, default=None,
                        help="streaming heads' local window at prefill (tokens)")
    lserve.add_argument("--decode-local", type=positive_int, default=None,
                        help="streaming heads' local window at decode (tokens)")
    lserve.add_argument("--selector", choices=["drift", "reuse"], default=None,
                        help="page selector between refreshes: drift (default: a head chooses afresh when "
                        "its query drifts) or reuse (LServe's plain reuse for selector_interval steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(path: str | None, device=None, progress: bool = True):
    if path is None:
        from ..embedded import load_embedded_model

        return load_embedded_model(device=device, progress=progress)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if device in (None, "cpu") else "auto")
    if device is not None:
        model = model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, tok


def main(argv=None, prog: str = "lserve-hf eval") -> int:
    """``lserve-hf eval``: returns 0 (the scores are results, not a pass/fail verdict)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(p)
    return run(p.parse_args(sys.argv[1:] if argv is None else argv), p)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the evaluation ``args`` describe; ``parser`` reports what cannot run (exit 2)."""
    check_device(parser, args.device)
    import torch
    import transformers

    model, tok = load_model(args.model, args.device, progress=not args.no_progress)
    base = default_lserve_config(model, args.head_pattern)
    over = {k: getattr(args, k) for k in ("streaming_sparsity", "token_budget", "prefill_local", "decode_local",
                                                  "selector")
            if getattr(args, k) is not None}
    try:
        base = replace(base, **over)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    cases = make_grid(tok, args.tasks, args.lengths, args.depths, args.seed, haystack=args.haystack,
                      haystack_file=args.haystack_file, value_type=args.value_type, chat=args.chat)
    meta = dict(model=args.model or "embedded:SmolLM2-135M-Instruct", tasks=args.tasks, lengths=args.lengths,
                depths=args.depths, methods=args.methods, seed=args.seed,
                haystack=args.haystack_file or args.haystack, value_type=args.value_type, chat=args.chat,
                lserve_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(base).items()},
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores", device=str(model.device),
                torch=torch.__version__, transformers=transformers.__version__)
    print(f"{len(cases)} cases x {len(args.methods)} methods; LServe: streaming_sparsity="
          f"{base.streaming_sparsity}, token_budget={base.token_budget}, prefill sink/local="
          f"{base.prefill_sink}/{base.prefill_local}, decode sink/local={base.decode_sink}/{base.decode_local}")
    records = evaluate(model, tok, cases, args.methods, base, args.head_pattern, args.max_new_tokens,
                       out_dir=args.out, meta=meta, progress=not args.no_progress)
    meta["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(records, args.out, meta)
    # the scores first: they are the result, and plotting can fail (no matplotlib) or take a while
    print("\nScore (% of expected strings found, RULER-style) per method x task x context length:\n")
    print(summary_table(records), flush=True)
    print(f"\nWrote {os.path.join(args.out, 'results.csv')} and results.json ({meta['wall_seconds']} s).")
    try:
        paths = plot_heatmaps(records, args.out) + [plot_accuracy_vs_length(records, args.out)]
    except ImportError as e:
        print(f"No plots: {e}.")
        return 0
    print(f"Plots: {', '.join(paths)}")
    return 0
