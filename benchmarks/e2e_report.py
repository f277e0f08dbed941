"""The end-to-end benchmark's medians, table and plot, from the runs ``bench_e2e.py`` collected."""

from __future__ import annotations

import statistics

from lserve_hf.benchmarks.e2e_child import METHODS

# every figure a run reports, with the digits the table prints it with
FIGURES = dict(ttft_s=3, tpot_ms=2, tokens_per_s=1, peak_gib=2, kv_gib=3, fwd_prefill_s=3, fwd_decode_ms=2,
               first_call_s=3, new_length_first_s=3, new_length_second_s=3, warmup_s=2)
LSERVE = "lserve"
FIRST_CALL_BAR = 1.25   # a new prompt length may cost at most this much more than the next call


def compiled_after_warmup(run: dict) -> dict:
    """The phases after the warm-up that compiled something (kernels or graphs), with how much."""
    return {phase: n for phase, n in run.get("compiles", {}).items() if phase != "warm-up" and n}


def summarise(runs: list[dict]) -> list[dict]:
    """Per (batch, length, method): each figure's median, min and max over the successful
    repetitions, or why none succeeded."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["batch"], r["length"], r["method"]), []).append(r)
    rows = []
    for (batch, length, method), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:2], METHODS.index(kv[0][2]))):
        ok = [r for r in rs if r["status"] == "ok"]
        row = dict(method=method, batch=batch, length=length, reps=len(ok), runs=len(rs),
                   compiled={k: v for r in ok for k, v in compiled_after_warmup(r).items()})
        for name in FIGURES:
            values = [r[name] for r in ok if r.get(name) is not None]
            if values:
                row[name] = dict(median=statistics.median(values), min=min(values), max=max(values))
        if not ok:
            r = rs[-1]
            row["failure"] = f"OOM in {r['phase']}" if r["status"] == "oom" else f"{r['status']}: {r['message']}"
        rows.append(row)
    return rows


def _cell(row: dict, name: str, spread: bool = True) -> str:
    fig = row.get(name)
    if fig is None:
        return "-"
    d = FIGURES[name]
    text = f"{fig['median']:.{d}f}"
    if spread and row["reps"] > 1:
        text += f" [{fig['min']:.{d}f}-{fig['max']:.{d}f}]"
    return text


def _median(row: dict | None, name: str):
    return row[name]["median"] if row is not None and name in row else None


def print_table(doc: dict) -> None:
    """The short table, printed last: per (batch, length), each method's figures (median
    [min-max] over the repetitions), then LServe's speed-ups over each peer from those medians."""
    env = next((r["env"] for r in doc["runs"] if "env" in r), {})
    s = doc["settings"]
    print(f"\n{env.get('gpu', env.get('device', '?'))}; torch {env.get('torch')}, "
          f"transformers {env.get('transformers')}, triton {env.get('triton')}; "
          f"{s['model']['num_hidden_layers']}-layer {'tiny Llama (dry run)' if s['dry_run'] else 'Llama-3-8B'}, "
          f"random weights, {s['dtype']}; "
          f"TPOT over N={s['decode_tokens']} tokens")
    print("LServe: " + ", ".join(f"{k}={v}" for k, v in {**s["lserve"], **s["lserve_extra"]}.items()))
    print("forward-only: plain forwards, no generate() loop; new length: first / second generate(max_new_tokens=1) "
          f"at an unseen length, '!' past {FIRST_CALL_BAR}x")
    head = (f"{'method':<14} {'TTFT s':>21} {'TPOT ms':>21} {'tok/s':>8} {'peak GiB':>9} {'KV GiB':>7} "
            f"{'fwd prefill s':>13} {'fwd decode ms':>13} {'new length 1st / 2nd s':>24}")
    configs = sorted({(r["batch"], r["length"]) for r in doc["summary"]})
    for batch, length in configs:
        rows = {r["method"]: r for r in doc["summary"] if (r["batch"], r["length"]) == (batch, length)}
        reps = max(r["runs"] for r in rows.values())
        print(f"\n== batch {batch}, {length} tokens ({reps} repetition{'s' * (reps > 1)}; median [min-max]) ==")
        print(head)
        for method, row in rows.items():
            if "failure" in row:
                print(f"{method:<14} {row['failure']}")
                continue
            first, second = _median(row, "new_length_first_s"), _median(row, "new_length_second_s")
            new = "-"
            if first is not None and second is not None:
                ratio = first / second
                new = f"{first:.3f} / {second:.3f} ({ratio:.2f}x{'!' if ratio > FIRST_CALL_BAR else ''})"
            note = f"  ({row['reps']} of {row['runs']} runs ok)" if row["reps"] < row["runs"] else ""
            if row["compiled"]:
                note += f"  compiled after the warm-up: {row['compiled']}"
            print(f"{method:<14} {_cell(row, 'ttft_s'):>21} {_cell(row, 'tpot_ms'):>21} "
                  f"{_cell(row, 'tokens_per_s', False):>8} {_cell(row, 'peak_gib', False):>9} "
                  f"{_cell(row, 'kv_gib', False):>7} {_cell(row, 'fwd_prefill_s', False):>13} "
                  f"{_cell(row, 'fwd_decode_ms', False):>13} {new:>24}{note}")
        ours = rows.get(LSERVE)
        if _median(ours, "ttft_s") is None:
            continue
        ratios = []
        for method, row in rows.items():
            if method == LSERVE or _median(row, "ttft_s") is None:
                continue
            text = f"{method} TTFT {row['ttft_s']['median'] / ours['ttft_s']['median']:.2f}x"
            if _median(row, "tpot_ms") is not None and _median(ours, "tpot_ms") is not None:
                text += f", TPOT {row['tpot_ms']['median'] / ours['tpot_ms']['median']:.2f}x"
            ratios.append(text)
        if ratios:
            print(f"LServe speed-up (peer median / lserve median): {'; '.join(ratios)}")


def plot(summary: list[dict], path: str, doc: dict) -> None:
    """TPOT and TTFT against the length, one line per method (and batch), median with min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple, list[dict]] = {}
    for row in summary:
        if "tpot_ms" in row:
            series.setdefault((row["method"], row["batch"]), []).append(row)
    for ax, name, label in ((axes[0], "tpot_ms", "time per output token (ms)"),
                            (axes[1], "ttft_s", "time to first token (s)")):
        for (method, batch), rows in series.items():
            rows = sorted(rows, key=lambda r: r["length"])
            x = [r["length"] / 1024 for r in rows]
            y = [r[name]["median"] for r in rows]
            err = [[r[name]["median"] - r[name]["min"] for r in rows],
                   [r[name]["max"] - r[name]["median"] for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                        label=method + (f" (batch {batch})" if batch > 1 else ""))
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for rows in series.values() for r in rows})
        ax.set_xticks([n / 1024 for n in lengths], [f"{n / 1024:g}K" for n in lengths])
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (K tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    env = next((r["env"] for r in doc["runs"] if "env" in r), {})
    fig.suptitle(f"{'tiny Llama (dry run)' if doc['settings']['dry_run'] else 'Llama-3-8B'}, bf16, "
                 f"{env.get('gpu', env.get('device', ''))}, {doc['calls'][-1]['date'][:10]}; median, min-max bars")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
