"""Which page a miss should replace (``LServeConfig.offload_policy``): LRU against frequency, on
page-selection traces replayed through the page cache's torch reference (CPU, no GPU needed).

- ``synthetic``: one (row, KV head) decoding from a long context. Pages have a lasting
  importance (log-normal, so a few pages matter to every query), each of the G query heads its
  own fixed preference, and the queries drift from one selection to the next (an AR(1) process);
  recent pages get a bonus. A selection every ``selector_interval`` steps takes each query
  head's top pages; the newest page joins every step, as in ``PageSelector.read_list``.
- ``--embedded``: the real selections of the embedded model (SmolLM2-135M) decoding a passkey
  prompt, through ``generate()`` and ``LServeCache.working_set()``.

    python -m lserve_hf.benchmarks.offload_policy [--embedded] [--out policy.json]
"""

from __future__ import annotations

import argparse
import math

import torch

from lserve_hf.benchmarks.common import save_json
from lserve_hf.page_cache import PageCache


def synthetic_trace(pages=1024, steps=1024, G=4, n_sel=64, interval=4, sigma=1.5, drift=0.9, prefer=0.5,
                    recency=2.0, seed=0):
    """Read lists ``[steps, G, n_sel + 1]`` of one (row, KV head) and its lengths ``[steps]``
    (page size 1 token per page unit: lengths count pages x 64)."""
    gen = torch.Generator().manual_seed(seed)
    total = pages + steps // 64 + 2
    base = torch.randn(total, generator=gen) * sigma
    own = torch.randn(G, total, generator=gen) * prefer
    noise = torch.randn(G, total, generator=gen)
    lists, lengths = [], []
    sel = None
    for t in range(steps):
        n_tok = pages * 64 + t + 1
        n_pg = (n_tok + 63) // 64
        if t % interval == 0:
            noise = drift * noise + math.sqrt(1 - drift ** 2) * torch.randn(G, total, generator=gen)
            j = torch.arange(n_pg)
            score = base[:n_pg] + own[:, :n_pg] + noise[:, :n_pg] + recency * torch.exp(-(n_pg - 1 - j) / 16.0)
            score[:, n_pg - 1] = float("inf")          # the newest page is always selected
            sel = score.topk(n_sel, dim=-1).indices
        last = torch.full((G, 1), n_pg - 1)
        lists.append(torch.cat([sel, torch.where((sel == last).any(-1, keepdim=True), -1, last)], -1))
        lengths.append(n_tok)
    return torch.stack(lists), torch.tensor(lengths)


def replay(trace, lengths, slots, policy):
    """Hit rate and misses per step of the trace through a PageCache of ``slots`` slots."""
    steps, G, K = trace.shape
    n_pages = int((lengths[-1] + 63) // 64) + 1
    cache = PageCache(1, 1, 1, slots, n_pages, G * K, 64, policy, torch.float32, "cpu")
    for t in range(steps):
        cache.lookup(trace[t].view(1, 1, G, K), lengths[t].view(1))
        if t == 0:
            cold = cache.stats[0, 0].clone()      # the first step loads everything: not the policy's doing
    touched, hits, misses = (cache.stats[0, 0] - cold).tolist()
    n = max(steps - 1, 1)
    return dict(hit_rate=hits / (hits + misses), misses_per_step=misses / n, touched_per_step=touched / n)


def embedded_runs(sizes, new_tokens=64):
    from dataclasses import replace

    from lserve_hf import LServeConfig, load_embedded_model, patch_model
    from lserve_hf.passkey import passkey_prompt

    model, tok = load_embedded_model()
    rows = []
    for n, depth in ((3000, 0.5), (4000, 0.3)):
        x = tok(passkey_prompt(tok, n, depth, chat=False).text, return_tensors="pt", add_special_tokens=False)
        for slots in sizes:
            for policy in ("lru", "frequency"):
                cfg = replace(LServeConfig(token_budget=256), offload="host", hbm_pages=slots, offload_policy=policy)
                patch_model(model, cfg)
                with torch.no_grad():
                    out = model.generate(**x, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
                ws = out.past_key_values.working_set()
                heads = sum(p.numel() for p in ws["pages_per_step"])      # (row, KV head) pairs, all layers
                rows.append(dict(trace=f"embedded {n} tokens", slots=ws["slots"][0], policy=policy,
                                 hit_rate=ws["hit_rate"], misses_per_step=ws["misses"] / ws["steps"] / heads,
                                 touched_per_step=sum(float(p.sum()) for p in ws["pages_per_step"]) / heads))
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedded", action="store_true", help="also the embedded model's own selections")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    G, n_sel = 4, 64
    floor = G * n_sel + 1
    for pages, drift in ((512, 0.9), (2048, 0.9), (2048, 0.6)):
        trace, lengths = synthetic_trace(pages=pages, steps=args.steps, G=G, n_sel=n_sel, drift=drift)
        for slots in (floor, 2 * floor):
            for policy in ("lru", "frequency"):
                r = replay(trace, lengths, slots, policy)
                rows.append(dict(trace=f"synthetic {pages} pages, drift {drift}", slots=slots, policy=policy, **r))
                print(rows[-1], flush=True)
    if args.embedded:
        rows += embedded_runs((13, 26))
    print(f"\n{'trace':<34} {'slots':>5} {'policy':<10} {'pages/step':>10} {'hit rate':>8} {'misses/step':>11}")
    for r in rows:
        print(f"{r['trace']:<34} {r['slots']:>5} {r['policy']:<10} {r['touched_per_step']:>10.1f} "
              f"{r['hit_rate']:>8.4f} {r['misses_per_step']:>11.2f}")
    save_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
