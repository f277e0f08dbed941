"""Command line: `lserve-hf demo | calibrate | eval | bench`."""

from __future__ import annotations

import argparse
import sys

# Only light modules at the top: `lserve-hf --help` must answer at once, so torch, transformers and
# the model load inside the commands that need them.
from .argtypes import HelpFormatter, at_least, check_device, fraction, model_folder, positive_int


def build_parser() -> argparse.ArgumentParser:
    from .evaluation import runner

    parser = argparse.ArgumentParser(prog="lserve-hf", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description=None):
        cmd = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
        cmd.set_defaults(command_parser=cmd)      # a command's own usage line goes with its errors
        return cmd

    demo = command("demo", "passkey retrieval on the embedded model, dense vs LServe: answers, prefill "
                   "time, decode speed, KV memory, and a plot against context length")
    demo.add_argument("--tokens", metavar="N", type=int, default=6000,
                      help="length of the long prompt (tokens)")
    demo.add_argument("--depths", metavar="D", type=fraction, nargs="+", default=[0.25, 0.75],
                      help="where the pass key sits in the long prompt (0: start, 1: end), one prompt each")
    demo.add_argument("--plot-lengths", metavar="N", type=int, nargs="*", default=[2000, 4000],
                      help="shorter prompts (pass key at depth 0.5) for the plot against context length; "
                      "the long prompt is its last point")
    demo.add_argument("--new-tokens", metavar="N", type=int, default=8,
                      help="tokens generated per prompt (at least 6: a pass key and a space): the first "
                      "comes with the prefill, the others are the timed decode steps")
    demo.add_argument("--plot", metavar="PATH", default="lserve_demo.png",
                      help="PNG of KV memory and decode time against context length, dense and LServe")
    demo.add_argument("--no-plot", action="store_true", help="write no plot")
    demo.add_argument("--device", metavar="DEVICE", default=None, help="e.g. cuda (default: CPU)")

    cal = command("calibrate", "compute a head pattern (full_attention_heads.tsv)")
    cal.add_argument("--method", choices=["probe", "duo", "refine"], default="probe",
                     help="probe: training-free, from attention weights on synthetic passkey prompts; "
                     "duo: DuoAttention gate training on synthetic multi-passkey prompts; "
                     "refine: re-rank an existing pattern's heads near the threshold by the answer "
                     "log-prob the patched model loses as served (calibration/serving_refine.py)")
    cal.add_argument("--model", metavar="PATH", type=model_folder, default=None,
                     help="a local Transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    cal.add_argument("--output", metavar="PATH", required=True,
                     help="folder (or .tsv path) to write the pattern to")
    cal.add_argument("--lengths", metavar="N", type=at_least(16), nargs="+", default=None,
                     help="prompt lengths (tokens, at least 16); probe: each length (default 2000 3000); "
                     "duo: MIN MAX range drawn from per step (default 1000 3000); refine: each length "
                     "(default 3000)")
    cal.add_argument("--depths", metavar="D", type=fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                     help="probe and refine: pass key depths in [0, 1]")
    cal.add_argument("--seeds", type=positive_int, default=1,
                     help="probe and refine: prompts per length and depth")
    cal.add_argument("--seed", type=int, default=None,
                     help="seeds the synthetic prompts (default 0; refine: 1, so seed-0 test prompts stay unseen)")
    cal.add_argument("--sink", type=at_least(0), default=128, help="the streaming window's sink tokens")
    cal.add_argument("--local", type=positive_int, default=256, help="the streaming window's local tokens")
    duo = cal.add_argument_group("duo (gate training)")
    duo.add_argument("--steps", type=positive_int, default=200, help="optimisation steps, one prompt each")
    duo.add_argument("--haystack-file", metavar="PATH", default=None,
                     help="a text file as haystack (default: synthetic prose)")
    duo.add_argument("--reg", type=float, default=0.05, help="weight of the mean(|alpha|) regulariser")
    duo.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate")
    duo.add_argument("--passkeys", type=positive_int, default=10, help="passkeys per prompt")
    duo.add_argument("--no-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    duo.add_argument("--save-every", type=positive_int, default=25,
                     help="write the gates reached so far every N steps (the final file replaces them)")
    ref = cal.add_argument_group("refine (serving refine of --pattern under a serving config)")
    ref.add_argument("--pattern", metavar="PATH", default=None,
                     help="the pattern to refine, folder or .tsv (default: the model's shipped pattern)")
    ref.add_argument("--sparsity", type=fraction, default=0.5, help="streaming_sparsity served")
    ref.add_argument("--budget", type=positive_int, default=512, help="token_budget served")
    ref.add_argument("--prefill-local", type=positive_int, default=256, help="prefill_local served")
    ref.add_argument("--decode-local", type=positive_int, default=256, help="decode_local served")
    ref.add_argument("--band", type=fraction, nargs=2, default=[0.25, 0.6], metavar=("LO", "HI"),
                     help="quantiles of the ranking whose heads are re-ranked")
    cal.add_argument("--device", metavar="DEVICE", default=None, help="e.g. cuda (default: CPU)")

    ev = command("eval", "offline long-context accuracy: dense vs LServe vs baselines; CSV, JSON, "
                 "heatmaps and an accuracy-against-length plot", description=runner.DESCRIPTION)
    runner.add_arguments(ev)

    bench = command("bench", "GPU benchmarks (BENCHMARKS.md)")
    bench.add_argument("what", choices=["kernels", "e2e"],
                       help="kernels: attention kernels against SDPA and FlexAttention; e2e: a random-weight "
                       "Llama-3-8B, unpatched vs patched")
    bench.add_argument("options", nargs=argparse.REMAINDER,
                       help="the benchmark's own options (`lserve-hf bench kernels --help`)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        return demo(args, args.command_parser)
    if args.command == "calibrate":
        check_device(args.command_parser, args.device)
        return calibrate(args)
    if args.command == "eval":
        from .evaluation import runner

        return runner.run(args, args.command_parser)
    # a benchmark parses its own options, --help included, under its own name
    from importlib import import_module

    bench = import_module(f"lserve_hf.benchmarks.bench_{args.what}")
    return bench.main(args.options, prog=f"lserve-hf bench {args.what}") or 0


def demo(args, parser) -> int:
    """``lserve-hf demo``: refuses lengths that could not show LServe (exit 2), else runs it."""
    from .config import LServeConfig
    from .embedded import EMBEDDED_CONTEXT

    # patch_model's defaults for the embedded model: a prompt must pass the streaming heads'
    # prefill window (sink + local) for any sparse path to run on it; a page more, since prompts
    # are sized to within a few tokens
    auto = LServeConfig().resolved(EMBEDDED_CONTEXT)
    shortest = auto.prefill_sink + auto.prefill_local + auto.page_size
    if args.new_tokens < 6:
        parser.error(f"--new-tokens {args.new_tokens}: at least 6 (the model writes a 5-digit pass key one "
                     "digit a token, after a space)")
    longest = EMBEDDED_CONTEXT - args.new_tokens
    for flag, n in [("--tokens", args.tokens)] + [("--plot-lengths", n) for n in args.plot_lengths]:
        if n < shortest:
            parser.error(f"{flag} {n}: too short for LServe's sparse paths on the embedded model: its "
                         f"streaming heads keep {auto.prefill_sink} sink + {auto.prefill_local} local tokens "
                         f"at prefill; use at least {shortest} tokens")
        if n > longest:
            parser.error(f"{flag} {n}: with {args.new_tokens} new tokens this exceeds the embedded model's "
                         f"context of {EMBEDDED_CONTEXT} tokens; use at most {longest}")
    check_device(parser, args.device)
    from .demo import run_demo

    run_demo(n_tokens=args.tokens, depths=args.depths, plot_lengths=args.plot_lengths,
             new_tokens=args.new_tokens, plot=None if args.no_plot else args.plot, device=args.device)
    return 0   # the demo prints its verdict; different answers are a finding, not a failure


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
