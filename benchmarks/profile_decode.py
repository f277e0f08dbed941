"""Run page selection and sparse decode at one context a few times, eagerly, for a profiler.

    ncu --clock-control none --kernel-name regex:"sparse_decode|combine|score|topk" \
        --launch-skip 12 --launch-count 4 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python benchmarks/profile_decode.py --tokens 131072

(Nsight Compute replays each captured launch; see benchmarks/NOTES.md for what it showed.)
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch

from lserve_hf.benchmarks import common as C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--streaming", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    if C.gpu_missing("profile_decode"):
        return 2
    torch.manual_seed(0)
    sets = C.decode_sets(args.tokens, args.streaming, C.DEVICE)
    for i in range(args.steps):
        s = sets[i % len(sets)]
        s["pages"] = C.select(s)
        C.decode(s)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
