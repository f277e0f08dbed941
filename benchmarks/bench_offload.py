"""SparseServe's hierarchical KV memory (``LServeConfig(offload="host")``) on a random-weight
Llama-3-8B config (32 layers, 32 query / 8 KV heads, head dim 128, bf16), 50% streaming heads
(random scores), budget 4096, CUDA-graph decode, GPU memory capped at ``--memory-gib`` (80).

(a) context sweep with offload: TTFT (one forward over the prompt: a layer-segmented prefill in
    16K chunks), TPOT (median decode step once the graphs replay), peak GPU memory, page-cache
    hit rate; the in-memory run beside it where it fits. The page cache: ``--hbm-pages`` (default
    "auto": the largest that fits the cap less 4 GiB, ``lserve_hf.hbm_pages_for``).
(b) at 32K: the largest batch that fits without and with offload (``lserve_hf.max_batch_size``,
    the config's own page cache; then run: one prefilled row repeated to the batch), decode
    tokens/s at each.
(c) peak GPU memory of the 256K offloaded prefill against weights + one layer's KV.

A run that would overrun ``--time-budget`` (predicted from the runs so far) is skipped, and said
so. ``--quick`` fits about 8 minutes: 128K (both), 1M (offload), (b) with one try per mode, 256K
(both) for (c), 12 decode steps. ``--parts`` runs some of (a), (b), (c).

    python -m lserve_hf.benchmarks.bench_offload --quick --out offload.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace

import torch

from lserve_hf.benchmarks.common import save_json
from lserve_hf.benchmarks.e2e_child import LLAMA3_8B

GIB = 2 ** 30
CONFIG = dict(LLAMA3_8B, max_position_embeddings=1 << 21)    # room for 1M tokens and the new ones
KV_PER_TOKEN = 32 * 8 * 128 * 2 * 2      # bytes of every KV head of every layer, one token (bf16)


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa")).eval()
    torch.set_default_dtype(torch.float32)
    return model


def host_available() -> int:
    """MemAvailable of /proc/meminfo, bytes (what pinned host pools can take)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Budget:
    """Wall-clock budget; TTFT predicted from the runs so far (quadratic attention plus linear
    projections, scaled to what was measured)."""

    def __init__(self, seconds):
        self.start, self.seconds = time.perf_counter(), seconds
        self.scale = 1.0

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def ttft(self, n, batch=1) -> float:
        x = n / 131072
        return self.scale * batch * (3.5 * x + 4.9 * x * x)     # BENCHMARKS.md: 8.4 s at 128K

    def measured(self, n, ttft, batch=1):
        if n >= 65536:
            self.scale = max(self.scale, ttft / self.ttft(n, batch) * self.scale)

    def allows(self, seconds) -> bool:
        return seconds <= self.left()


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def timed(fn):
    """(seconds, result) of ``fn()``, the GPU synchronised on both sides."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def run(model, n, steps, batch=1):
    """Prefill one row of ``n`` random tokens, repeat it to ``batch`` rows, decode ``steps``."""
    from lserve_hf import LServeCache
    from lserve_hf.offload import HostPagePool

    _free()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
    cache = LServeCache(model, max_length=n + steps + 1)
    ttft, out = timed(lambda: model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1))
    prefill_peak = torch.cuda.max_memory_allocated()
    tok = out.logits[:, -1:].argmax(-1)
    del out
    if batch > 1:
        t_rep, _ = timed(lambda: cache.batch_repeat_interleave(batch))
        tok = tok.repeat(batch, 1)
    step_s = []
    for _ in range(steps):
        dt, o = timed(lambda: model(tok, past_key_values=cache, use_cache=True))
        tok = o.logits[:, -1:].argmax(-1)
        step_s.append(dt)
        del o
    pools = [layer.pool for layer in cache.layers]
    host = sum(p.pool_k.numel() * p.pool_k.element_size() * 2 for p in pools if isinstance(p, HostPagePool))
    steady = step_s[len(step_s) // 2:]
    row = dict(length=n, batch=batch, ttft_s=ttft, first_step_ms=1e3 * step_s[0] if step_s else None,
               tpot_ms=1e3 * statistics.median(steady) if steady else None,
               tokens_per_s=batch / statistics.median(steady) if steady else None,
               prefill_peak_gib=prefill_peak / GIB, peak_gib=torch.cuda.max_memory_allocated() / GIB,
               host_pool_gib=host / GIB, kv_gib=cache.kv_bytes() / GIB)
    if batch > 1:
        row["repeat_s"] = t_rep
    if host:
        ws = cache.working_set()
        row.update(hit_rate=ws["hit_rate"], hbm_slots=ws["slots"][0],
                   pages_per_step=statistics.mean(float(p.mean()) for p in ws["pages_per_step"]),
                   misses_per_step=ws["misses"] / max(ws["steps"], 1) / sum(p.numel() for p in ws["pages_per_step"]))
    del cache, tok
    _free()
    return row


def attempt(model, n, steps, batch=1):
    """``run``, or a row saying why it could not: out of GPU memory, or another error (host memory
    that cannot be pinned, a kernel that fails), reported so that the runs after it still report."""
    try:
        return run(model, n, steps, batch)
    except torch.OutOfMemoryError as exc:
        _free()
        return dict(length=n, batch=batch, skipped=f"out of GPU memory ({str(exc).splitlines()[0][:80]})")
    except RuntimeError as exc:
        _free()
        return dict(length=n, batch=batch, skipped=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


def auto_pages(model, cfg, pattern, n, steps, cap_bytes):
    """``--hbm-pages auto``: the largest page cache one row of ``n`` tokens fits under the cap,
    4 GiB kept for activations (``lserve_hf.hbm_pages_for``)."""
    from lserve_hf import hbm_pages_for, patch_model

    patch_model(model, cfg, head_pattern=pattern)
    return hbm_pages_for(model, n, cap_bytes - 4 * GIB, 1, steps + 1)


def sweep_length(model, configs, n, steps, budget, cap_bytes, rows, modes):
    """(a) at one length: offload, then in memory where it is predicted to fit."""
    from lserve_hf import patch_model

    pattern, config, auto = configs
    for mode in modes:
        cfg = config if mode == "offload" else replace(config, offload=None)
        if mode == "offload" and auto:
            cfg = replace(cfg, hbm_pages=auto_pages(model, cfg, pattern, n, steps, cap_bytes))
        host = n * KV_PER_TOKEN // 2 if mode == "offload" else 0     # the retrieval half, pinned
        predicted = budget.ttft(n) + steps * 0.1 + host / (3 * GIB)   # pinning ~3 GB/s
        peak = weights_bytes(model) + (n * KV_PER_TOKEN + min(4 * GIB, cap_bytes // 10) if mode == "memory" else 0)
        if not budget.allows(predicted):
            r = dict(length=n, batch=1, skipped=f"time budget ({predicted:.0f} s predicted, {budget.left():.0f} left)")
        elif host and host > 0.85 * host_available():
            r = dict(length=n, batch=1, skipped=f"host memory ({host / GIB:.0f} GiB pinned needed)")
        elif peak > cap_bytes:
            r = dict(length=n, batch=1, skipped=f"would not fit ({peak / GIB:.0f} GiB estimated)")
        else:
            patch_model(model, cfg, head_pattern=pattern)
            r = attempt(model, n, steps)
            if "ttft_s" in r:
                budget.measured(n, r["ttft_s"])
        r["mode"] = mode
        rows.append(r)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)


def batch_at(model, configs, n, steps, budget, cap_bytes, tries):
    """(b): per mode, the batch ``max_batch_size`` allows (3 GiB kept for activations and the
    repeat's transient copy), run; a batch that does not fit is retried 15% smaller."""
    from lserve_hf import max_batch_size, patch_model

    pattern, config, _ = configs      # the config's own page cache (auto sizing is per length, batch 1)
    rows = []
    for mode in ("memory", "offload"):
        cfg = config if mode == "offload" else replace(config, offload=None)
        patch_model(model, cfg, head_pattern=pattern)
        fit = max_batch_size(model, n, cap_bytes - min(3 * GIB, cap_bytes // 10), new_tokens=steps,
                             host_memory_bytes=int(0.8 * host_available()))
        b = fit.offload if mode == "offload" else fit.in_memory
        estimate = b
        for _ in range(tries):
            predicted = budget.ttft(n) + 0.1 * steps + (fit.host_row_bytes * b / (2 * GIB) if mode == "offload" else 2)
            if b < 1 or not budget.allows(predicted):
                r = dict(length=n, batch=b, skipped="time budget" if b >= 1 else "nothing fits")
                break
            r = attempt(model, n, steps, b)
            if "skipped" not in r:
                break
            b = int(b * 0.85)
        r.update(mode=mode, estimate=estimate, row_gib=(fit.row_bytes_offload if mode == "offload"
                                                        else fit.row_bytes_in_memory) / GIB)
        rows.append(r)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    return rows


SWEEP_COLUMNS = [("TTFT s", "ttft_s", ">8.2f"), ("TPOT ms", "tpot_ms", ">8.2f"), ("1st step ms", "first_step_ms", ">11.1f"),
                 ("prefill GiB", "prefill_peak_gib", ">11.1f"), ("peak GiB", "peak_gib", ">8.1f"),
                 ("host GiB", "host_pool_gib", ">8.1f"), ("hit rate", "hit_rate", ">8.4f")]
BATCH_COLUMNS = [("GiB/row", "row_gib", ">7.2f"), ("TPOT ms", "tpot_ms", ">8.2f"), ("tokens/s", "tokens_per_s", ">9.1f"),
                 ("peak GiB", "peak_gib", ">8.1f"), ("hit rate", "hit_rate", ">8.4f")]


def _section(rows, lead, columns):
    """A header and a line per row: the ``lead`` fields (name, width), then ``columns`` (header,
    field, format; "-" where a row has none), or why the run was skipped."""
    def width(fmt):
        return int(fmt.strip("<>").split(".")[0])
    lines = [" ".join(f"{k:>{w}}" for k, w in lead) + " " + " ".join(f"{h:>{width(f)}}" for h, _, f in columns)]
    for r in rows:
        head = " ".join(f"{str(r.get(k, '')):>{w}}" for k, w in lead)
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
            continue
        lines.append(head + " " + " ".join(f"{r[k]:{f}}" if r.get(k) is not None else f"{'-':>{width(f)}}"
                                           for _, k, f in columns))
    return lines


def table(info):
    """The summary printed last."""
    lines = ["", f"(a) context sweep, batch 1 ({info['device']}, GPU capped at {info['memory_gib']} GiB)"]
    lines += _section(info["sweep"], [("length", 8), ("mode", 8)], SWEEP_COLUMNS)
    lines += ["", f"(b) largest batch at {info['batch_length']} tokens"]
    lines += _section(info["batch"], [("mode", 8), ("estimate", 8), ("batch", 6)], BATCH_COLUMNS)
    c = info.get("prefill_memory")
    lines += ["", f"(c) peak GPU memory of the {info['peak_length']}-token prefill"]
    if c:
        lines.append(f"offload {c['offload_peak_gib']:.1f} GiB = weights {c['weights_gib']:.1f} + one layer's KV "
                     f"{c['layer_kv_gib']:.1f} + {c['rest_gib']:.1f} (prompt hidden states {c['hidden_gib']:.1f}, "
                     f"all summaries {c['summaries_gib']:.1f}, chunk activations); in memory: {c['memory_peak']}")
    else:
        lines.append("not measured (see (a))")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    ap.add_argument("--steps", type=int, default=32, help="decode steps per run (TPOT: median of the later half)")
    ap.add_argument("--batch-length", type=int, default=32768)
    ap.add_argument("--peak-length", type=int, default=262144, help="(c): the prefill whose peak is broken down")
    ap.add_argument("--memory-gib", type=float, default=80.0)
    ap.add_argument("--hbm-pages", default="auto",
                    help="page-cache slots per (row, retrieval KV head) in (a) and (c): a number, 'default' (the "
                         "config's default, 2x pages_per_selection raised to one step's reads) or 'auto' (the largest "
                         "that fits the cap, lserve_hf.hbm_pages_for); (b) uses the default")
    ap.add_argument("--policy", default="lru", choices=["lru", "frequency"])
    ap.add_argument("--dynamic-density", type=float, default=None,
                    help="prefill the retrieval heads with prefill_dynamic at this fixed density of key blocks "
                         "(min = max density; decode is unchanged); default: dense retrieval heads")
    ap.add_argument("--batch-tries", type=int, default=3)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; runs predicted to overrun are skipped")
    ap.add_argument("--parts", nargs="+", default=["sweep", "batch", "peak"], choices=["sweep", "batch", "peak"],
                    help="(a) sweep, (b) batch, (c) peak: the --peak-length prefill, offloaded and in memory")
    ap.add_argument("--quick", action="store_true",
                    help="about 8 minutes: 128K (both), 1M (offload), (b) with one try, 256K; 12 steps")
    ap.add_argument("--out", default=None, help="JSON file of every row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_offload needs a CUDA GPU (none found); nothing was run", file=sys.stderr)
        return 2
    both = ("offload", "memory")
    # what runs, in order; a run predicted to overrun the budget is skipped and said so
    plan = [("sweep", n, both) for n in args.lengths] * ("sweep" in args.parts)
    plan += [("batch",)] * ("batch" in args.parts)
    if "peak" in args.parts and ("sweep" not in args.parts or args.peak_length not in args.lengths):
        plan.append(("sweep", args.peak_length, both))
    if args.quick:   # the headline first: 1M fits; then (b), then (c)
        args.steps, args.batch_tries = 12, 1
        args.time_budget = args.time_budget or 480.0
        plan = [("sweep", 131072, both), ("sweep", 1048576, ("offload",)), ("batch",),
                ("sweep", args.peak_length, ("offload",)), ("sweep", args.peak_length, ("memory",))]
    from lserve_hf import LServeConfig, patch_model

    budget = Budget(args.time_budget)
    total = torch.cuda.get_device_properties(0).total_memory
    cap = int(min(args.memory_gib * GIB, total))
    torch.cuda.set_per_process_memory_fraction(cap / total)
    model = build_model()
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    pattern = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    hbm = None if args.hbm_pages in ("default", "auto") else int(args.hbm_pages)
    dyn = {} if args.dynamic_density is None else dict(
        prefill_dynamic=True, dynamic_min_density=args.dynamic_density, dynamic_max_density=args.dynamic_density)
    config = LServeConfig(streaming_sparsity=0.5, prefill_local=8192, token_budget=4096, offload="host",
                          hbm_pages=hbm, offload_policy=args.policy, **dyn)
    configs = (pattern, config, args.hbm_pages == "auto")
    # warm-up, every kernel compiled: one-pass and chunked prefill, page cache, both decode layouts
    for cfg, n in ((config, 4096), (config, config.prefill_chunk_size + 4096), (replace(config, offload=None), 4096)):
        patch_model(model, cfg, head_pattern=pattern)
        run(model, n, 6)
    print(f"warm-up done in {time.perf_counter() - budget.start:.0f} s", flush=True)
    sweep, batch = [], []
    for item in plan:
        if item[0] == "batch":
            batch = batch_at(model, configs, args.batch_length, args.steps, budget, cap, args.batch_tries)
        else:
            sweep_length(model, configs, item[1], args.steps, budget, cap, sweep, item[2])
    info = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                torch=torch.__version__, triton=__import__("triton").__version__, memory_gib=args.memory_gib,
                config="Llama-3-8B, random weights, bf16, 50% streaming heads, budget 4096",
                lserve=dict(hbm_pages=args.hbm_pages, policy=args.policy, prefill_chunk_size=config.prefill_chunk_size,
                            dynamic_density=args.dynamic_density),
                steps=args.steps, batch_length=args.batch_length, peak_length=args.peak_length,
                weights_gib=weights_bytes(model) / GIB, sweep=sweep, batch=batch,
                wall_s=time.perf_counter() - budget.start)
    off = next((r for r in sweep if r.get("mode") == "offload" and r["length"] == args.peak_length
                and "skipped" not in r), None)
    if off:
        mem = next((r for r in sweep if r.get("mode") == "memory" and r["length"] == args.peak_length), {})
        n = args.peak_length
        parts = dict(weights_gib=info["weights_gib"], layer_kv_gib=n * KV_PER_TOKEN / L / GIB,
                     hidden_gib=n * model.config.hidden_size * 2 / GIB, summaries_gib=n * KV_PER_TOKEN / 2 / 16 / GIB)
        info["prefill_memory"] = dict(
            offload_peak_gib=off["prefill_peak_gib"], rest_gib=off["prefill_peak_gib"] - parts["weights_gib"]
            - parts["layer_kv_gib"], memory_peak=f"{mem['prefill_peak_gib']:.1f} GiB" if "prefill_peak_gib" in mem
            else mem.get("skipped", "not run"), **parts)
    print(table(info))
    save_json(args.out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
