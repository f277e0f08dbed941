"""Command line: `lserve-hf demo | calibrate | bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lserve-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="passkey retrieval on the embedded model, dense vs LServe")
    demo.add_argument("--tokens", type=int, default=3500, help="prompt length in tokens")
    demo.add_argument("--device", default=None, help="e.g. cuda; default CPU")

    bench = sub.add_parser("bench", help="GPU benchmarks")
    bench.add_argument("what", choices=["kernels", "e2e"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        return 0 if run_demo(n_tokens=args.tokens, device=args.device) else 1
    if args.command == "bench":
        from importlib import import_module
        return import_module("lserve_hf.benchmarks.bench_" + args.what).main(args.rest) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
