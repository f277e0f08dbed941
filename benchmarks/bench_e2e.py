"""End-to-end time to first token (and time per output token) of a random-weight model of a
named config: unpatched SDPA vs patched LServe, in one process on one GPU.

    python benchmarks/bench_e2e.py --lengths 32768 131072 --out e2e.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

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
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    ttft, out = timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
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
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    from lserve_hf import LServeConfig, patch_model, unpatch_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prefill-local", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = build_model(args.layers)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    pattern = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    config = LServeConfig(streaming_sparsity=args.sparsity, prefill_local=args.prefill_local)
    rows = []
    for name in ("sdpa", "lserve"):
        if name == "lserve":
            patch_model(model, config, head_pattern=pattern)
        measure(model, 4096, 2)                       # warm-up: kernel compilation, allocator
        for n in args.lengths:
            try:
                r = measure(model, n, args.decode_tokens)
            except torch.OutOfMemoryError:
                r = dict(skipped="out of memory")
                torch.cuda.empty_cache()
            rows.append(dict(method=name, length=n, **r))
            print(rows[-1], flush=True)
        unpatch_model(model)
    info = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                config="Llama-3-8B" + (f" ({args.layers} layers)" if args.layers else ""),
                lserve=dict(streaming_sparsity=args.sparsity, prefill_local=args.prefill_local), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    print(f"\n{'length':>7} | {'sdpa TTFT s':>11} {'lserve TTFT s':>13} {'speed-up':>8} | "
          f"{'sdpa TPOT ms':>12} {'lserve TPOT ms':>14} | {'sdpa KV GiB':>11} {'lserve KV GiB':>13}")
    for n in args.lengths:
        d = next(r for r in rows if r["method"] == "sdpa" and r["length"] == n)
        s = next(r for r in rows if r["method"] == "lserve" and r["length"] == n)
        if "skipped" in d or "skipped" in s:
            print(f"{n:>7} | skipped: {d.get('skipped') or s.get('skipped')}")
            continue
        print(f"{n:>7} | {d['ttft_s']:>11.3f} {s['ttft_s']:>13.3f} {d['ttft_s'] / s['ttft_s']:>7.2f}x | "
              f"{d['tpot_ms']:>12.1f} {s['tpot_ms']:>14.1f} | {d['kv_gib']:>11.2f} {s['kv_gib']:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
