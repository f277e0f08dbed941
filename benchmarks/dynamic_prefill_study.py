"""How well the dynamic prefill estimate (``lserve_hf.dynamic_prefill``) finds the attention mass
of the embedded model (SmolLM2-135M-Instruct, 30 layers, 9 query / 3 KV heads, D=64), on CPU.

Prompts are real prose: Python's own documentation topics (``pydoc_data.topics``), concatenated
from a different topic per prompt and cut to each length. Inside every layer an attention function
records the post-RoPE queries and keys and runs SDPA; for each retrieval head of the shipped
pattern (50% streaming) it computes the true attention mass of every (query block, key block)
pair from dense float32 softmax weights, then per estimator:
- at the config's defaults: the density kept (kept / causal (query block, key block) pairs, i.e.
  the share of the causal attention work done) and the true mass the kept blocks hold (mean over
  the query heads and query blocks; also its 5th percentile over query blocks);
- at fixed densities (the count clamped to a share of the causal blocks): the true mass held, and
  that of an oracle keeping the blocks of highest true mass.
Estimators: ``pooled`` (the library's: block-mean queries . block-mean keys, mean over the GQA
query heads), ``pooled-max`` (the max over the query heads, renormalised) and ``antidiag``
(XAttention: each 8x8 tile scored by the sum of q . k along its antidiagonal, softmax over the
strided keys, summed per block; mean over the query heads). Last, the estimator's cost: FLOPs
against those of the attention it saves, and CPU times of one layer at each length.

    python -m lserve_hf.benchmarks.dynamic_prefill_study [--lengths 2048,4096,6144,8192] [--prompts 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lserve_hf import LServeConfig, load_embedded_model, reference
from lserve_hf import dynamic_prefill as DP
from lserve_hf.heads import model_streaming_heads
from lserve_hf.patch import set_attention_implementation

STUDY_ATTN = "lserve_dynamic_study"
FIXED = (0.15, 0.3, 0.5)
STRIDE = 8


def prompt_ids(tok, n, which):
    """n tokens of documentation prose, starting at topic ``7 * which`` (distinct prompts)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    start = (7 * which) % len(keys)
    text = "\n\n".join(topics[k] for k in keys[start:] + keys[:start])
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, "pydoc_data.topics holds ~100K tokens"
    return ids


def true_mass(q, k, block, scale, rows=256):
    """[Hq, nQ, nK] float32: per query block, the mean over its queries of the dense causal
    softmax weight in each key block (q [Hq, S, D], k [Hkv, S, D], S a multiple of block)."""
    Hq, S, _ = q.shape
    G = Hq // k.shape[0]
    kf = k.repeat_interleave(G, 0)
    n = S // block
    out = torch.empty(Hq, n, n)
    kpos = torch.arange(S)
    for r0 in range(0, S, rows):
        s = torch.matmul(q[:, r0:r0 + rows], kf.transpose(-1, -2)) * scale
        s = s.masked_fill(kpos.view(1, 1, S) > torch.arange(r0, r0 + rows).view(1, -1, 1), float("-inf"))
        w = torch.softmax(s, -1).view(Hq, rows, n, block).sum(-1)                 # [Hq, rows, nK]
        out[:, r0 // block:(r0 + rows) // block] = w.view(Hq, rows // block, block, n).mean(2)
    return out


def antidiagonal_mass(q, k, block, scale, stride=STRIDE):
    """XAttention's estimate, per query head [Hq, nQ, nK] (q [Hq, S, D], k [Hkv, S, D]): the
    score of strided query row r and key column c is the mean of q . k along the antidiagonal of
    their stride x stride tile; softmax over the causal columns, summed per key block, averaged
    over the rows of each query block."""
    Hq, S, _ = q.shape
    G = Hq // k.shape[0]
    qr = torch.cat([q[:, stride - 1 - t::stride] for t in range(stride)], -1)
    kr = torch.cat([k[:, t::stride] for t in range(stride)], -1).repeat_interleave(G, 0)
    s = torch.matmul(qr, kr.transpose(-1, -2)) * (scale / stride)
    m = S // stride
    s = s.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
    per = block // stride
    w = torch.softmax(s, -1).view(Hq, m, S // block, per).sum(-1)
    return w.view(Hq, S // block, per, S // block).mean(2)


def estimators(q, k, block, scale):
    """name -> per-KV-head estimated masses [Hkv, nQ, nK]."""
    Hkv = k.shape[0]
    per_head = DP.head_mass(q[None], k[None], scale=scale, block=block)[0]        # [Hkv, G, nQ, nK]
    mx = per_head.amax(1)
    anti = antidiagonal_mass(q, k, block, scale)
    return {"pooled": per_head.mean(1), "pooled-max": mx / mx.sum(-1, keepdim=True).clamp_min(1e-30),
            "antidiag": anti.view(Hkv, -1, *anti.shape[1:]).mean(1)}


class Recorder:
    """Per retrieval head, per estimator: densities and captured true masses."""

    def __init__(self, streaming, cfg):
        self.streaming, self.cfg = streaming, cfg
        self.rows = []

    def record(self, module, query, key, scale):
        cfg, b = self.cfg, self.cfg.dynamic_block
        layer = module.layer_idx
        q, k = query[0].float(), key[0].float()
        Hq, S, _ = q.shape
        Hkv = k.shape[0]
        G = Hq // Hkv
        heads = (~self.streaming[layer]).nonzero().flatten()
        if not heads.numel():
            return
        q = q.view(Hkv, G, S, -1)[heads].flatten(0, 1)
        k = k[heads]
        truth = true_mass(q, k, b, scale).view(heads.numel(), G, S // b, S // b)
        lo, hi, diag = DP.block_ranges(S, S, 0, None, b)
        n_causal = (hi - lo + 1).sum().item()

        def held(blocks):
            j = torch.arange(S // b).view(1, 1, 1, -1)
            kept = (j == blocks.index[0].long().unsqueeze(-1)).any(-2)             # [H, nQ, nK]
            per_block = (truth * kept.unsqueeze(1)).sum(-1)                        # [H, G, nQ]
            return kept, per_block

        oracle = {}
        for d in FIXED:
            _, pb = held(DP.select_blocks(truth.mean(1)[None], lo, hi, diag, 1 - 1e-9, d, d, b))
            oracle[d] = pb.mean((1, 2))
        for name, est in estimators(q, k, b, scale).items():
            kept, pb = held(DP.select_blocks(est[None], lo, hi, diag, cfg.dynamic_mass,
                                             cfg.dynamic_min_density, cfg.dynamic_max_density, b))
            fixed = {d: held(DP.select_blocks(est[None], lo, hi, diag, 1 - 1e-9, d, d, b))[1].mean((1, 2))
                     for d in FIXED}
            for i, h in enumerate(heads.tolist()):
                self.rows.append(dict(
                    tokens=S, layer=layer, head=h, method=name,
                    density=kept[i].sum().item() / n_causal, mass=pb[i].mean().item(),
                    mass_p5=torch.quantile(pb[i].flatten(), 0.05).item(),
                    **{f"mass@{d}": fixed[d][i].item() for d in FIXED},
                    **{f"oracle@{d}": oracle[d][i].item() for d in FIXED}))


_ACTIVE: list[Recorder] = []


def _study_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    if _ACTIVE:
        _ACTIVE[-1].record(module, query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(STUDY_ATTN, _study_attention)
AttentionMaskInterface.register(STUDY_ATTN, sdpa_mask)


def _spread(xs):
    xs = sorted(xs)
    return sum(xs) / len(xs), xs[0], xs[-1]


def summary(rows, methods):
    """Markdown tables of the rows (mean [min, max] over retrieval heads and prompts)."""
    lines = ["| tokens | estimator | density | true mass held | 5th pct. over query blocks | "
             + " | ".join(f"mass @ {d:.0%} (oracle)" for d in FIXED) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in FIXED) + " |"]
    for n in sorted({r["tokens"] for r in rows}):
        for m in methods:
            sel = [r for r in rows if r["tokens"] == n and r["method"] == m]
            d, m_, p5 = (_spread([r[x] for r in sel]) for x in ("density", "mass", "mass_p5"))
            fixed = " | ".join(f"{_spread([r[f'mass@{x}'] for r in sel])[0]:.3f} "
                               f"({_spread([r[f'oracle@{x}'] for r in sel])[0]:.3f})" for x in FIXED)
            lines.append(f"| {n} | {m} | {d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}] | {m_[0]:.3f} [{m_[1]:.3f}, "
                         f"{m_[2]:.3f}] | {p5[0]:.3f} | {fixed} |")
    return "\n".join(lines)


def cost(n, density, block, hq, hkv, d):
    """(estimator FLOPs, antidiagonal estimator FLOPs, saved attention FLOPs, CPU ms of the
    estimator, of the dense and of the listed reference prefill) for one layer's retrieval heads
    at n tokens, random inputs."""
    est_flops = 2 * hq * ((n / block) ** 2 / 2 * d + n * d) + 2 * hkv * n * d  # scores (causal half) + pooling
    anti_flops = 2 * hq * (n / STRIDE) ** 2 / 2 * STRIDE * d                 # XAttention's, for comparison
    saved = (1 - density) * hq * n * n / 2 * d * 2 * 2                       # QK and PV, 2 FLOPs a MAC
    torch.manual_seed(0)
    q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
    dense = torch.zeros(hkv, dtype=torch.bool)
    cfg = LServeConfig()

    def timed(fn, reps=3):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            r = fn()
        return (time.perf_counter() - t) / reps * 1e3, r

    t_est, blocks = timed(lambda: DP.key_blocks(q, k, 0, None, d ** -0.5, mass=cfg.dynamic_mass, block=block,
                                                min_density=cfg.dynamic_min_density,
                                                max_density=cfg.dynamic_max_density))
    t_dense, _ = timed(lambda: reference.prefill_attention(q, k, v, dense, 0, 1), reps=1)
    fixed = DP.select_blocks(torch.rand(blocks.index.shape[:2] + (blocks.index.shape[2],) * 2),
                             *DP.block_ranges(n, n, 0, None, block), 1 - 1e-9, density, density, block)
    t_sparse, _ = timed(lambda: reference.prefill_attention(q, k, v, dense, 0, 1, blocks=fixed), reps=1)
    return est_flops, anti_flops, saved, t_est, t_dense, t_sparse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,6144,8192")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per length")
    ap.add_argument("--mass", type=float, default=None, help="dynamic_mass (default: the config's)")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost table")
    ap.add_argument("--out", default=None, help="write the per-head rows as JSON")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tok = load_embedded_model()
    mc = model.config
    cfg = LServeConfig() if args.mass is None else LServeConfig(dynamic_mass=args.mass)
    streaming = model_streaming_heads(mc, cfg.streaming_sparsity)
    set_attention_implementation(model, STUDY_ATTN)
    rec = Recorder(streaming, cfg)
    _ACTIVE.append(rec)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    for n in lengths:
        for p in range(args.prompts):
            t = time.perf_counter()
            model(prompt_ids(tok, n, p), use_cache=False, logits_to_keep=1)
            print(f"{n} tokens, prompt {p}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    _ACTIVE.pop()
    methods = ["pooled", "pooled-max", "antidiag"]
    print(f"## Estimators at dynamic_mass={cfg.dynamic_mass}, density bounds [{cfg.dynamic_min_density}, "
          f"{cfg.dynamic_max_density}], block {cfg.dynamic_block}; {int((~streaming).sum())} retrieval heads, "
          f"{args.prompts} prompts per length\n")
    print(summary(rec.rows, methods))
    if args.no_cost:
        return 0
    hq, hkv, d = mc.num_attention_heads, mc.num_key_value_heads, mc.hidden_size // mc.num_attention_heads
    print("\n## Cost of the pooled estimate, one layer (all heads as retrieval heads, random inputs, CPU)\n")
    print("| tokens | density | estimator FLOPs / saved FLOPs (antidiag's) | estimator ms | dense reference ms | "
          "listed reference ms |\n| --- | --- | --- | --- | --- | --- |")
    for n in lengths:
        dens = _spread([r["density"] for r in rec.rows if r["tokens"] == n and r["method"] == "pooled"])[0]
        est, anti, saved, t_est, t_dense, t_sparse = cost(n, dens, cfg.dynamic_block, hq, hkv, d)
        print(f"| {n} | {dens:.3f} | {est / saved:.2e} ({anti / saved:.2e}) | {t_est:.1f} | {t_dense:.0f} | "
              f"{t_sparse:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec.rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
