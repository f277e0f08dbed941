"""Where a patched model's prefill time goes: torch.profiler's CUDA kernel totals for one forward
over a long prompt, one pass against chunked, on a random-weight Llama-3-8B-config model.

    python benchmarks/profile_prefill.py --tokens 131072 --layers 4 --chunks 0 16384

Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch

from lserve_hf.benchmarks.bench_e2e import build_model, timed
from lserve_hf.benchmarks.common import gpu_missing


@torch.no_grad()
def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from lserve_hf import LServeCache, LServeConfig, patch_model, unpatch_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 16384])
    ap.add_argument("--rows", type=int, default=12, help="kernels listed per run")
    args = ap.parse_args(argv)
    if gpu_missing("profile_prefill"):
        return 2
    model = build_model(args.layers)
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    pattern = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    for chunk in args.chunks:
        patch_model(model, LServeConfig(streaming_sparsity=0.5, prefill_local=8192,
                                        prefill_chunk_size=chunk or None), head_pattern=pattern)

        def fwd():
            cache = LServeCache(model, max_length=args.tokens + 1)
            return model(ids, use_cache=True, logits_to_keep=1, past_key_values=cache)

        fwd()   # compile
        t, _ = timed(fwd)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        print(f"\n=== chunk {chunk or 'one pass'}: {t:.3f} s for {args.layers} layers ===")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
        unpatch_model(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
