"""End-to-end speed of a random-weight model of a named config: unpatched SDPA vs patched LServe,
in one process on one GPU. Per context length: time to first token (the prompt's forward), time
per output token (median over the decode steps, greedy, one token per forward as ``generate()``
runs them), peak GPU memory and KV-cache bytes. A length that does not fit is skipped and said so.

    python benchmarks/bench_e2e.py --out e2e.json --plot e2e.png
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from lserve_hf.benchmarks.common import gpu_missing

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=524288)


def build_model(layers=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(LLAMA3_8B)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    torch.set_default_dtype(torch.float32)
    return model


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def measure(model, n, decode_tokens):
    from lserve_hf import LServeCache

    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # as generate() does: a patched model's cache is sized for prompt + new tokens up front
    extra = {"past_key_values": LServeCache(model, max_length=n + decode_tokens + 1)} \
        if getattr(model, "_lserve", None) is not None else {}
    ttft, out = timed(lambda: model(ids, use_cache=True, logits_to_keep=1, **extra))
    cache = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_tokens):
        dt, o = timed(lambda: model(tok, past_key_values=cache, use_cache=True))
        tok = o.logits[:, -1:].argmax(-1)
        steps.append(dt)
    kv = cache.kv_bytes() if hasattr(cache, "kv_bytes") else sum(
        t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values))
    res = dict(ttft_s=ttft, tpot_ms=1e3 * statistics.median(steps) if steps else None,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, kv_gib=kv / 2**30)
    del cache, out
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(argv=None, prog=None):
    from lserve_hf import LServeConfig, patch_model, unpatch_model

    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 262144])
    ap.add_argument("--decode-tokens", type=int, default=40, help="decode steps timed per length (median)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prefill-local", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=16384, help="LServe prefill_chunk_size (0: one pass)")
    ap.add_argument("--no-graphs", action="store_true", help="LServe decode without CUDA graphs")
    ap.add_argument("--methods", nargs="+", default=["sdpa", "lserve"], choices=["sdpa", "lserve"])
    ap.add_argument("--out", default=None, help="JSON file of every row")
    ap.add_argument("--plot", default=None, help="PNG of TPOT and TTFT against context length")
    args = ap.parse_args(argv)
    if gpu_missing(ap.prog):
        return 2
    model = build_model(args.layers)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    pattern = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    config = LServeConfig(streaming_sparsity=args.sparsity, prefill_local=args.prefill_local,
                          prefill_chunk_size=args.chunk or None, cuda_graphs=not args.no_graphs)
    rows = []
    for name in args.methods:
        if name == "lserve":
            patch_model(model, config, head_pattern=pattern)
        # warm-up: kernel compilation (one-pass and chunked prefill, eager and graph decode)
        measure(model, 4096, 8)
        if name == "lserve" and config.prefill_chunk_size:
            measure(model, config.prefill_chunk_size + 4096, 2)
        for n in args.lengths:
            try:
                r = measure(model, n, args.decode_tokens)
            except torch.OutOfMemoryError:
                r = dict(skipped="out of memory")
                print(f"{name} {n}: skipped, out of memory", flush=True)
                torch.cuda.empty_cache()
            rows.append(dict(method=name, length=n, **r))
            print(rows[-1], flush=True)
        unpatch_model(model)
    info = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                config="Llama-3-8B" + (f" ({args.layers} layers)" if args.layers else ""),
                lserve=dict(streaming_sparsity=args.sparsity, prefill_local=args.prefill_local,
                            prefill_chunk_size=config.prefill_chunk_size, cuda_graphs=config.cuda_graphs),
                decode_tokens=args.decode_tokens, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    if args.plot:
        plot(rows, args.plot, info)
    if len(args.methods) < 2:
        return 0
    print(f"\n{'length':>7} | {'sdpa TTFT s':>11} {'lserve TTFT s':>13} {'speed-up':>8} | "
          f"{'sdpa TPOT ms':>12} {'lserve TPOT ms':>14} | {'sdpa KV GiB':>11} {'lserve KV GiB':>13}")
    for n in args.lengths:
        d = next(r for r in rows if r["method"] == "sdpa" and r["length"] == n)
        s = next(r for r in rows if r["method"] == "lserve" and r["length"] == n)
        if "skipped" in s:
            print(f"{n:>7} | skipped: {s['skipped']}")
            continue
        if "skipped" in d:
            print(f"{n:>7} | {'OOM':>11} {s['ttft_s']:>13.3f} {'':>8} | {'OOM':>12} {s['tpot_ms']:>14.1f} | "
                  f"{'OOM':>11} {s['kv_gib']:>13.2f}   lserve peak {s['peak_gib']:.1f} GiB")
            continue
        print(f"{n:>7} | {d['ttft_s']:>11.3f} {s['ttft_s']:>13.3f} {d['ttft_s'] / s['ttft_s']:>7.2f}x | "
              f"{d['tpot_ms']:>12.1f} {s['tpot_ms']:>14.1f} | {d['kv_gib']:>11.2f} {s['kv_gib']:>13.2f}   "
              f"TPOT {d['tpot_ms'] / s['tpot_ms']:.1f}x, peak {d['peak_gib']:.1f} vs {s['peak_gib']:.1f} GiB")
    return 0


def plot(rows, path, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "tpot_ms", "time per output token (ms)"),
                           (axes[1], "ttft_s", "time to first token (s)")):
        for method in ("sdpa", "lserve"):
            pts = [(r["length"] // 1024, r[key]) for r in rows if r["method"] == method and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label="SDPA (unpatched)" if method == "sdpa" else "LServe")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (K tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{info['config']}, bf16, batch 1 - {info['device']} ({info['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
