"""Command line: `lserve-hf demo | calibrate | eval | bench`."""

from __future__ import annotations

import argparse
import sys


def _at_least(low: int):
    """An argparse type: an integer of at least ``low``, refused by argparse (with the flag's name)
    before anything runs."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value
    parse.__name__ = "int"   # argparse says "invalid int value" for a value that is not a number
    return parse


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # eval and bench own their flags (--help included): hand them everything after the command
    if argv[:1] == ["eval"]:
        from .evaluation import main as eval_main
        return eval_main(argv[1:]) or 0
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in ("kernels", "e2e"):
        from importlib import import_module
        return import_module("lserve_hf.benchmarks.bench_" + argv[1]).main(argv[2:]) or 0
    parser = argparse.ArgumentParser(prog="lserve-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="passkey retrieval on the embedded model, dense vs LServe")
    demo.add_argument("--tokens", type=int, default=3500, help="prompt length in tokens")
    demo.add_argument("--device", default=None, help="e.g. cuda; default CPU")

    cal = sub.add_parser("calibrate", help="compute a head pattern (full_attention_heads.tsv)")
    cal.add_argument("--method", choices=["probe", "duo", "refine"], default="probe",
                     help="probe: training-free, from attention weights on synthetic passkey prompts; "
                     "duo: DuoAttention gate training on synthetic multi-passkey prompts; "
                     "refine: re-rank an existing pattern's heads near the threshold by the answer "
                     "log-prob the patched model loses as served (calibration/serving_refine.py)")
    cal.add_argument("--model", default=None,
                     help="a local Transformers model folder; default: the embedded SmolLM2-135M-Instruct")
    cal.add_argument("--output", required=True, help="folder (or .tsv path) to write the pattern to")
    cal.add_argument("--lengths", type=_at_least(16), nargs="+", default=None,
                     help="prompt lengths (tokens, at least 16); probe: each length (default 2000 3000); "
                     "duo: MIN MAX range drawn from per step (default 1000 3000)")
    cal.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="probe only")
    cal.add_argument("--seeds", type=int, default=1, help="probe: prompts per length and depth")
    cal.add_argument("--seed", type=int, default=None,
                     help="seeds the synthetic prompts (default 0; refine: 1, so seed-0 test prompts stay unseen)")
    cal.add_argument("--sink", type=int, default=128, help="the streaming window's sink tokens")
    cal.add_argument("--local", type=int, default=256, help="the streaming window's local tokens")
    duo = cal.add_argument_group("duo (gate training)")
    duo.add_argument("--steps", type=_at_least(1), default=200, help="optimisation steps, one prompt each")
    duo.add_argument("--haystack-file", default=None, help="a text file as haystack (default: synthetic prose)")
    duo.add_argument("--reg", type=float, default=0.05, help="weight of the mean(|alpha|) regulariser")
    duo.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate")
    duo.add_argument("--passkeys", type=int, default=10, help="passkeys per prompt")
    duo.add_argument("--no-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    duo.add_argument("--save-every", type=_at_least(1), default=25,
                     help="write the gates reached so far every N steps (the final file replaces them)")
    ref = cal.add_argument_group("refine (serving refine of --pattern under a serving config)")
    ref.add_argument("--pattern", default=None,
                     help="the pattern to refine (folder or .tsv); default: the model's shipped pattern")
    ref.add_argument("--sparsity", type=float, default=0.5, help="streaming_sparsity served")
    ref.add_argument("--budget", type=int, default=512, help="token_budget served")
    ref.add_argument("--prefill-local", type=int, default=256, help="prefill_local served")
    ref.add_argument("--decode-local", type=int, default=256, help="decode_local served")
    ref.add_argument("--band", type=float, nargs=2, default=[0.25, 0.6], metavar=("LO", "HI"),
                     help="quantiles of the ranking whose heads are re-ranked")
    cal.add_argument("--device", default=None)

    sub.add_parser("eval", help="offline long-context accuracy: dense vs LServe vs baselines "
                   "(`lserve-hf eval --help`)")

    bench = sub.add_parser("bench", help="GPU benchmarks")
    bench.add_argument("what", choices=["kernels", "e2e"], help="`lserve-hf bench kernels --help`")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        run_demo(n_tokens=args.tokens, device=args.device)   # prints its own verdict
        return 0
    if args.command == "calibrate":
        return calibrate(args)
    return 2


def calibrate(args) -> int:
    import time

    from .calibration import probe_heads, train_gates
    from .embedded import load_embedded_model
    from .heads import check_writable, save_pattern

    # what would fail only once the run is over is refused before the model is even loaded
    try:
        check_writable(args.output)
    except OSError as exc:
        raise SystemExit(f"lserve-hf calibrate: {exc}") from None
    if args.method == "duo" and args.lengths and len(args.lengths) > 2:
        raise SystemExit("lserve-hf calibrate: --lengths takes MIN MAX (or one length) with --method duo")
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        if args.device:
            model = model.to(args.device)
    else:
        model, tok = load_embedded_model(device=args.device)
    t0 = time.perf_counter()
    name = args.model or "SmolLM2-135M-Instruct"
    if args.method == "duo":
        lengths = args.lengths or [1000, 3000]
        lo, hi = lengths[0], lengths[-1]
        settings = dict(steps=args.steps, lengths=(lo, hi), sink=args.sink, local=args.local, reg=args.reg,
                        lr=args.lr, n_passkeys=args.passkeys, haystack_file=args.haystack_file,
                        seed=0 if args.seed is None else args.seed, gradient_checkpointing=not args.no_checkpointing)
        run = dict(settings, lengths=[lo, hi])

        def checkpoint(step, info):
            # a long run that is stopped still leaves the gates it reached
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_pattern(info["alpha"], args.output, method=args.method, model=name, sink_size=args.sink,
                             recent_size=args.local, steps_done=step + 1,
                             seconds=round(time.perf_counter() - t0, 1), **run)

        scores = train_gates(model, tok, callback=checkpoint, **settings)
    elif args.method == "refine":
        scores, run = _serving_refine(args, model, tok)
    else:
        lengths = args.lengths or [2000, 3000]
        seed = 0 if args.seed is None else args.seed
        scores = probe_heads(model, tok, lengths=lengths, depths=args.depths, sink=args.sink,
                             local=args.local, seed=seed, n_seeds=args.seeds)
        run = dict(lengths=lengths, depths=args.depths, seeds=args.seeds, seed=seed)
    path = save_pattern(scores, args.output, method=args.method, model=name, sink_size=args.sink,
                        recent_size=args.local, seconds=round(time.perf_counter() - t0, 1), **run)
    print(f"wrote {path} ({scores.shape[0]} layers x {scores.shape[1]} KV heads)")
    return 0


def _serving_refine(args, model, tok):
    """``--method refine``: serving refine of ``--pattern`` (or the shipped one) under the config
    the flags describe; returns the new scores and what to record in the pattern's config.json."""
    from .calibration import passkey_probe_prompts, serving_refine
    from .config import LServeConfig
    from .heads import find_shipped_pattern, load_pattern

    source = args.pattern or find_shipped_pattern(model.config)
    if source is None:
        raise SystemExit("--method refine needs --pattern: no shipped pattern for this model")
    config = LServeConfig(streaming_sparsity=args.sparsity, token_budget=args.budget, prefill_sink=args.sink,
                          prefill_local=args.prefill_local, decode_sink=args.sink, decode_local=args.decode_local)
    lengths = args.lengths or [3000]
    seed = 1 if args.seed is None else args.seed
    prompts = passkey_probe_prompts(tok, lengths, args.depths, tuple(range(seed, seed + args.seeds)))
    scores, details = serving_refine(model, scores=load_pattern(source), config=config, prompts=prompts,
                                     band=tuple(args.band))
    run = dict(lengths=lengths, depths=args.depths, seed=seed, seeds=args.seeds, base_pattern=str(source),
               band=list(args.band), n_candidates=len(details["candidates"]),
               serving_config={k: getattr(config, k) for k in ("streaming_sparsity", "token_budget",
                                                                "prefill_sink", "prefill_local",
                                                                "decode_sink", "decode_local")})
    return scores, run


if __name__ == "__main__":
    sys.exit(main())
