"""Run page selection and sparse decode at one context a few times, eagerly, for a profiler.

    ncu --clock-control none --kernel-name regex:"sparse_decode|combine|score|topk" \
        --launch-skip 12 --launch-count 4 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python benchmarks/profile_decode.py --tokens 131072

(Nsight Compute replays each captured launch; see benchmarks/NOTES.md for what it showed.)
"""

from __future__ import annotations

import argparse

import torch

from lserve_hf.benchmarks import bench_kernels as B


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--streaming", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    _, _, select_pages, decode, _ = B._kernels()
    n_select = B.BUDGET // B.PAGE
    torch.manual_seed(0)
    sets = B._decode_sets(args.tokens, args.streaming, "cuda", n_select)
    for i in range(args.steps):
        s = sets[i % len(sets)]
        s["pages"] = select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], B.PAGE, B.LOGICAL,
                                  n_select)
        decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"], s["q_retr"],
               s["pool_k"], s["pool_v"], s["pages"], s["lengths"], B.DECODE_SINK, B.DECODE_LOCAL,
               B.PAGE, B.D ** -0.5, out_stream=s["out_s"], out_retr=s["out_r"])
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
