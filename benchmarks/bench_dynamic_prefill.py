"""Dynamic block-sparse prefill benchmark, Llama-3-8B attention shapes (32 query heads, 8 KV heads,
D=128, bf16, B=1).

Half the KV heads stream (sink 128, local 1024); the retrieval heads read random key-block lists
(``dynamic_block`` 128) that always hold the sink and diagonal blocks and otherwise a fixed share of
each query block's causal key blocks (5%, 10%, 20%, 40%). At 32K and 128K tokens:
- the Triton kernel with those lists (``blocks=``), and without them (retrieval heads causal: the
  static LServe prefill);
- SDPA forced to cuDNN (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``, dense causal; the KV heads
  repeated beforehand when cuDNN does not take grouped heads) and SDPA's default backend (dense
  causal, ``enable_gqa``);
- compiled FlexAttention given the same mask as a BlockMask (``create_block_mask`` over a
  mask_mod reading the lists and the streaming pattern; built once, not timed).
Also the estimator (``dynamic_prefill.key_blocks`` on the retrieval heads, the config's defaults)
at the longest length, and checks at the first length: the kernel against Flex, and at 4096 tokens
against the torch reference (relative norm errors).

Times are ``triton.testing.do_bench`` medians (ms); a short table comes last; ``--out FILE``
writes every figure as JSON. Needs a CUDA GPU (without one: one line, exit status 2).

    python -m lserve_hf.benchmarks.bench_dynamic_prefill --out dynamic.json [--lengths 32768,131072]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from lserve_hf.benchmarks import common as C

LOCAL, BLOCK = 1024, 128
DENSITIES = (0.05, 0.1, 0.2, 0.4)
CHECK_TOKENS = 4096


def random_lists(n, streaming, density, block, device, seed=0):
    """KeyBlocks for every KV head (streaming heads' entries unused): per query block the sink and
    diagonal blocks, then random causal blocks up to ``density`` of the causal ones."""
    from lserve_hf import dynamic_prefill as DP

    g = torch.Generator(device=device).manual_seed(seed)
    lo, hi, diag = DP.block_ranges(n, n, 0, None, block, device=device)
    n_blocks = lo.shape[1]
    mass = torch.rand(1, streaming.numel(), n_blocks, n_blocks, generator=g, device=device)
    return DP.select_blocks(mass, lo, hi, diag, 1 - 1e-9, density, density, block)


def listed_share(blocks, streaming):
    """Listed / causal (query block, key block) pairs of the retrieval heads: the work done."""
    n_q = blocks.count.shape[2]
    causal = n_q * (n_q + 1) / 2
    return (blocks.count[0, ~streaming.to(blocks.count.device)].sum().item()
            / (causal * int((~streaming).sum())))


def flex_parts(compiled=True):
    """(flex_attention, compiled unless told not to; a BlockMask builder from lists)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def block_mask(n, streaming, sink, local, blocks, hq, device):
        hkv, n_q = streaming.numel(), blocks.count.shape[2]
        G = hq // hkv
        table = torch.zeros(hkv, n_q, n_q + 1, dtype=torch.bool, device=device)
        idx = torch.where(blocks.index[0] >= 0, blocks.index[0].long(), n_q)
        table.scatter_(-1, idx, True)
        table = table[..., :n_q].contiguous()                                    # [Hkv, nQ, nK]
        st = streaming.to(device)

        def mask_mod(b, h, q_idx, kv_idx):   # reference.prefill_mask with kv_start 0, plus the lists
            causal = kv_idx <= q_idx
            window = (kv_idx < sink) | (q_idx - kv_idx < local)
            chosen = table[h // G, q_idx // blocks.block, kv_idx // blocks.block]
            return causal & torch.where(st[h // G], window, chosen)

        return create_block_mask(mask_mod, 1, hq, n, n, device=device, BLOCK_SIZE=blocks.block,
                                 _compile=compiled)

    return flex, block_mask


def cudnn_sdpa(q, k, v):
    """(a call of dense causal SDPA forced to cuDNN, whether it took grouped KV heads as they are)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(kk, vv, gqa):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    try:
        call(k, v, True)
        return (lambda: call(k, v, True)), True
    except RuntimeError:   # this cuDNN path takes no grouped heads: repeat them once, untimed
        G = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        call(kr, vr, False)
        return (lambda: call(kr, vr, False)), False


def bench_lengths(lengths, densities, rows, checks, device, hq=C.HQ, hkv=C.HKV, with_flex=True,
                  with_cudnn=True, compiled_flex=True, rep=100):
    """Rows of timings per length and density (see the module docstring)."""
    from lserve_hf.kernels import block_sparse_prefill

    streaming = C.streaming_mask(0.5, hkv)
    st = streaming.to(device)
    flex, make_mask = flex_parts(compiled_flex) if with_flex else (None, None)
    for n in lengths:
        torch.manual_seed(0)
        q, k, v, out = C.prefill_inputs(n, device, hq, hkv)
        t_sdpa = C.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rep)
        t_cudnn, cudnn_gqa = None, None
        if with_cudnn:
            try:
                fn, cudnn_gqa = cudnn_sdpa(q, k, v)
                t_cudnn = C.bench(fn, rep)
            except RuntimeError as exc:   # no cuDNN attention in this build or on this GPU
                print(f"cuDNN SDPA unavailable at {n} tokens: {str(exc)[:160]}", flush=True)
        t_static = C.bench(lambda: block_sparse_prefill(q, k, v, st, C.PREFILL_SINK, LOCAL, out=out), rep)
        for density in densities:
            blocks = random_lists(n, streaming, density, BLOCK, device)
            t_tri = C.bench(lambda: block_sparse_prefill(q, k, v, st, C.PREFILL_SINK, LOCAL, out=out,
                                                         blocks=blocks), rep)
            t_flex = None
            if with_flex:
                bm = make_mask(n, streaming, C.PREFILL_SINK, LOCAL, blocks, hq, device)
                fx = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
                t_flex = C.bench(fx, rep)
                if n == lengths[0] and density == densities[0]:
                    block_sparse_prefill(q, k, v, st, C.PREFILL_SINK, LOCAL, out=out, blocks=blocks)
                    e_rel, e_abs = C.rel(out, fx())
                    checks.append({"what": f"{n} tokens, density {density:.0%}: triton vs flex",
                                   "rel_norm_err": e_rel, "max_abs_err": e_abs})
                del bm
            rows.append({"tokens": n, "density": density, "listed_share": listed_share(blocks, streaming),
                         "triton_ms": t_tri, "triton_static_ms": t_static, "flex_ms": t_flex,
                         "cudnn_ms": t_cudnn, "cudnn_gqa": cudnn_gqa, "sdpa_ms": t_sdpa,
                         "speedup_vs_static": t_static / t_tri,
                         "speedup_vs_cudnn": t_cudnn / t_tri if t_cudnn else None,
                         "speedup_vs_sdpa": t_sdpa / t_tri,
                         "speedup_vs_flex": t_flex / t_tri if t_flex else None})
            print(_fmt(rows[-1]), flush=True)
        del q, k, v, out
        if device == "cuda":
            torch.cuda.empty_cache()


def check_reference(n, density, checks, device, hq=C.HQ, hkv=C.HKV):
    """The kernel with lists against reference.prefill_attention with the same lists."""
    from lserve_hf import reference as R
    from lserve_hf.kernels import block_sparse_prefill

    torch.manual_seed(1)
    streaming = C.streaming_mask(0.5, hkv)
    st = streaming.to(device)
    q, k, v, out = C.prefill_inputs(n, device, hq, hkv)
    blocks = random_lists(n, streaming, density, BLOCK, device, seed=1)
    block_sparse_prefill(q, k, v, st, C.PREFILL_SINK, LOCAL, out=out, blocks=blocks)
    ref = R.prefill_attention(q.float(), k.float(), v.float(), st, C.PREFILL_SINK, LOCAL, blocks=blocks)
    e_rel, e_abs = C.rel(out, ref)
    checks.append({"what": f"{n} tokens, density {density:.0%}: triton vs reference.prefill_attention",
                   "rel_norm_err": e_rel, "max_abs_err": e_abs})


def bench_estimator(n, device, hq=C.HQ, hkv=C.HKV, rep=100):
    """Median ms of the estimate over the retrieval heads (half of them) at n tokens, and the
    density it picks on these random inputs (a flat estimate: the mass target keeps many)."""
    from lserve_hf import LServeConfig
    from lserve_hf import dynamic_prefill as DP

    cfg = LServeConfig()
    torch.manual_seed(2)
    q, k, _, _ = C.prefill_inputs(n, device, hq // 2, hkv // 2)
    run = lambda: DP.key_blocks(q, k, mass=cfg.dynamic_mass, min_density=cfg.dynamic_min_density,  # noqa: E731
                                max_density=cfg.dynamic_max_density, block=cfg.dynamic_block)
    t = C.bench(run, rep)
    blocks = run()
    share = listed_share(blocks, torch.zeros(hkv // 2, dtype=torch.bool))
    return {"tokens": n, "estimator_ms": t, "retrieval_kv_heads": hkv // 2, "density_on_random_inputs": share}


def _fmt(r):
    def ms(x):
        return f"{x:8.2f}" if x is not None else "       -"

    def sx(x):
        return f"{x:5.2f}x" if x is not None else "     -"

    return (f"{r['tokens']:>7} density {r['density']:>4.0%} (listed {r['listed_share']:5.1%}) | "
            f"triton {ms(r['triton_ms'])} "
            f"static {ms(r['triton_static_ms'])} flex {ms(r['flex_ms'])} cudnn {ms(r['cudnn_ms'])} "
            f"sdpa {ms(r['sdpa_ms'])} | vs static {sx(r['speedup_vs_static'])} cudnn {sx(r['speedup_vs_cudnn'])} "
            f"sdpa {sx(r['speedup_vs_sdpa'])} flex {sx(r['speedup_vs_flex'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write all figures as JSON to this path")
    ap.add_argument("--lengths", default="32768,131072", help="prompt lengths")
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)),
                    help="shares of causal key blocks the retrieval heads read")
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention")
    ap.add_argument("--no-cudnn", action="store_true", help="skip SDPA's cuDNN backend")
    args = ap.parse_args(argv)
    if C.gpu_missing("bench_dynamic_prefill"):
        return 2
    lengths = [int(x) for x in args.lengths.split(",") if x]
    densities = [float(x) for x in args.densities.split(",") if x]
    rows, checks = [], []
    check_reference(CHECK_TOKENS, densities[0], checks, C.DEVICE)
    bench_lengths(lengths, densities, rows, checks, C.DEVICE, with_flex=not args.no_flex,
                  with_cudnn=not args.no_cudnn)
    est = bench_estimator(max(lengths), C.DEVICE)
    C.print_checks(checks)
    print(f"\nestimator at {est['tokens']} tokens ({est['retrieval_kv_heads']} retrieval KV heads): "
          f"{est['estimator_ms']:.2f} ms")
    print("\nsummary (ms; 'listed': the share of causal key blocks the retrieval heads read):")
    for r in rows:
        print(_fmt(r))
    shapes = {"hq": C.HQ, "hkv": C.HKV, "d": C.D, "dtype": str(C.DTYPE), "batch": 1, "streaming": 0.5,
              "prefill_sink": C.PREFILL_SINK, "prefill_local": LOCAL, "dynamic_block": BLOCK}
    C.save_json(args.out, {**C.environment(), "shapes": shapes, "rows": rows, "estimator": est, "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
