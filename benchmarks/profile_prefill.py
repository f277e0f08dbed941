"""Where a patched model's prefill time goes: torch.profiler totals for one forward over a long
prompt, on a random-weight Llama-3-8B-config model (``bench_e2e``'s), unpatched SDPA beside it.

    python benchmarks/profile_prefill.py --tokens 131072 --layers 4 --chunks 0 16384
    python benchmarks/profile_prefill.py --tokens 131072 --layers 4 --chunks 16384 --dynamic-density 0.1

Two tables per run: the torch operators by the GPU time of their own kernels (``aten::index_select``,
``aten::copy_``, ...: what the glue around attention costs), and the GPU kernels themselves. The
time line is the forward's wall time outside the profiler, after one untimed forward.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch

from lserve_hf.benchmarks.common import gpu_missing


def _profiled(fwd, rows: int, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    from lserve_hf.benchmarks.e2e_child import timed

    device = torch.device("cuda")
    fwd()   # compile and warm up
    t, _ = timed(fwd, device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fwd()
        torch.cuda.synchronize()
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::") and e.self_device_time_total > 0]
    ops.sort(key=lambda e: e.self_device_time_total, reverse=True)
    print(f"\n=== {title}: {t:.3f} s ===")
    print(f"{'operator':<40} {'calls':>7} {'GPU ms':>10}")
    for e in ops[:rows]:
        print(f"{e.key:<40} {e.count:>7} {e.self_device_time_total / 1e3:>10.1f}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


@torch.no_grad()
def main(argv=None) -> int:
    from lserve_hf import LServeCache, LServeConfig, patch_model, unpatch_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 16384], help="prefill chunk sizes (0: one pass)")
    ap.add_argument("--dynamic-density", type=float, default=None, metavar="D",
                    help="dynamic prefill of the retrieval heads at density D")
    ap.add_argument("--no-sdpa", action="store_true", help="leave out the unpatched SDPA run")
    ap.add_argument("--rows", type=int, default=15, help="rows listed per table")
    args = ap.parse_args(argv)
    if gpu_missing("profile_prefill"):
        return 2
    from lserve_hf.benchmarks.e2e_child import build_model

    model = build_model({"dry_run": False, "layers": args.layers, "seed": 0}, torch.device("cuda"))
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    pattern = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    if not args.no_sdpa:
        _profiled(lambda: model(ids, use_cache=True, logits_to_keep=1), args.rows,
                  f"unpatched sdpa, {L} layers")
    extra = {} if args.dynamic_density is None else dict(
        prefill_dynamic=True, dynamic_min_density=args.dynamic_density, dynamic_max_density=args.dynamic_density)
    for chunk in args.chunks:
        patch_model(model, LServeConfig(streaming_sparsity=0.5, prefill_local=8192,
                                        prefill_chunk_size=chunk or None, **extra), head_pattern=pattern)

        def fwd():
            cache = LServeCache(model, max_length=args.tokens + 1)
            return model(ids, use_cache=True, logits_to_keep=1, past_key_values=cache)

        _profiled(fwd, args.rows, f"LServe, chunk {chunk or 'one pass'}, {L} layers"
                  + ("" if args.dynamic_density is None else f", dynamic density {args.dynamic_density}"))
        unpatch_model(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
