"""End-to-end speed of a random-weight Llama-3-8B (bf16, one GPU): HF's own configurations against
LServe, through ``generate()`` as a user calls it.

Methods (each a configuration of the same model):
  sdpa            unpatched, eager, DynamicCache (HF's default)
  sdpa-cudnn      the same inside ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``
  static-compile  HF's fast path: a StaticCache and ``generate()`` compiling the decode step
                  (``generation_config.compile_config``: fullgraph, mode="reduce-overhead")
  lserve          ``patch_model``: 50% streaming heads (seeded random pattern), CUDA-graph decode
  lserve-eager    the same without CUDA graphs

How it measures: every (method, batch, length) runs in a fresh process (``e2e_child.py`` says what
one does), so none inherits another's allocator, compile caches or warm state; each repetition
runs every configuration once, the methods' order reversed every other repetition; the figures
are medians over the repetitions, with their min-max. TTFT is ``generate(max_new_tokens=1)``, TPOT
``(t(generate(N + 1)) - TTFT) / N``; forward-only figures time plain forwards instead. A
configuration that runs out of memory is reported as OOM.

    lserve-hf bench e2e --out e2e.json --plot e2e.png
    lserve-hf bench e2e --batch 8 --lengths 32768 --out e2e_b8.json
    lserve-hf bench e2e --out e2e.json --resume --time-budget 540   # repeat until nothing is left
    python -m lserve_hf.benchmarks.bench_e2e --dry-run              # every code path, tiny model, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from lserve_hf.benchmarks.common import gpu_missing
from lserve_hf.benchmarks.e2e_child import LLAMA3_8B, METHODS, TINY_LLAMA
from lserve_hf.benchmarks.e2e_report import compiled_after_warmup, plot, print_table, summarise
from lserve_hf.argtypes import at_least as _at_least

LSERVE_METHODS = ("lserve", "lserve-eager")
# an odd offset: the new length is never one measured before, nor a multiple of a page or a block
NEW_LENGTH_OFFSET = 2767
# LServe's published knobs, passed explicitly: LServeConfig's defaults resolve per model context
PUBLISHED = dict(prefill_sink=128, decode_sink=128, decode_local=256, page_size=64, logical_page_size=16,
                 token_budget=4096, selector_interval=4)
REAL = dict(lengths=[8192, 32768, 131072, 262144], decode_tokens=128, warmup_length=2048, prefill_local=8192,
            chunk=16384, knobs=PUBLISHED)
# the dry run's knobs keep every LServe path live at 320 tokens: chunked prefill, a streaming window
# shorter than the prompt, page selection within a budget smaller than the context
DRY = dict(lengths=[320], decode_tokens=4, warmup_length=64, prefill_local=64, chunk=128,
           knobs=dict(PUBLISHED, prefill_sink=16, decode_sink=16, decode_local=32, token_budget=128))
STATUSES_KEPT = ("ok", "oom")   # results a resumed run keeps; errors and timeouts run again


def parser(prog=None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog or "lserve-hf bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--lengths", type=_at_least(16), nargs="+", default=None,
                    help=f"prompt lengths (default {' '.join(map(str, REAL['lengths']))}; dry run {DRY['lengths'][0]})")
    ap.add_argument("--batch", type=_at_least(1), nargs="+", default=[1], help="batch sizes (default 1)")
    ap.add_argument("--reps", type=_at_least(1), default=3, help="repetitions of every configuration (default 3)")
    ap.add_argument("--decode-tokens", type=_at_least(1), default=None,
                    help=f"N, the tokens TPOT is timed over (default {REAL['decode_tokens']}; forward-only decode: "
                    "the median of up to 32 steps)")
    ap.add_argument("--layers", type=_at_least(1), default=None, help="fewer layers, for a quicker run")
    ap.add_argument("--sparsity", type=float, default=0.5, help="LServe streaming_sparsity (default 0.5)")
    ap.add_argument("--prefill-local", type=_at_least(1), default=None,
                    help=f"LServe prefill_local (default {REAL['prefill_local']})")
    ap.add_argument("--chunk", type=_at_least(0), default=None,
                    help=f"LServe prefill_chunk_size, 0: one pass (default {REAL['chunk']})")
    ap.add_argument("--ttft-only", action="store_true",
                    help="time to first token only (long prompts): after the warm-up, two generate(max_new_tokens=1) "
                         "at the length (the first call, then TTFT) and its peak memory; no decode phases")
    ap.add_argument("--no-fused", action="store_true",
                    help="LServe without its fused RMSNorm and SwiGLU kernels (fused_norm_mlp=False): sparse attention alone")
    ap.add_argument("--no-graphs", action="store_true", help="method lserve decodes without CUDA graphs too")
    ap.add_argument("--dynamic-density", type=float, default=None, metavar="D",
                    help="LServe dynamic prefill at density D (prefill_dynamic, dynamic_min/max_density)")
    ap.add_argument("--offload", choices=["host"], default=None, help="LServe KV offload (with --hbm-pages)")
    ap.add_argument("--hbm-pages", type=_at_least(1), default=None, metavar="N", help="pages kept on the GPU")
    ap.add_argument("--memory-cap-gib", type=float, default=None, metavar="G",
                    help="each child may allocate at most G GiB (set_per_process_memory_fraction)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="skip the configurations that would end past S seconds (a running child is stopped "
                    "at S); leave a minute for start-up and the report")
    ap.add_argument("--out", default=None, help="JSON of every run, the medians and the environment "
                    "(written after every configuration)")
    ap.add_argument("--resume", action="store_true", help="keep the results already in --out (same settings) "
                    "and run only what they lack")
    ap.add_argument("--plot", default=None, help="PNG of TPOT and TTFT against the length")
    ap.add_argument("--dry-run", action="store_true", help="a 2-layer tiny Llama on the CPU, tiny lengths, "
                    "a few steps: checks every code path, not speed")
    ap.add_argument("--in-process", action="store_true", help="with --dry-run: every configuration in this "
                    "process, one after the other (a quick check of the code paths, without their isolation)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None, prog=None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(prog)
    args = ap.parse_args(argv)
    if args.child is not None:
        from lserve_hf.benchmarks.e2e_child import main as child_main
        return child_main(json.loads(args.child))
    settings = resolve(args)
    if not args.dry_run and gpu_missing(ap.prog):
        return 2
    base = DRY if args.dry_run else REAL
    lengths = args.lengths or base["lengths"]
    doc = load_previous(args.out, settings) if args.resume else None
    doc = doc or dict(benchmark="lserve-hf bench e2e", settings=settings, calls=[], runs=[], summary=[])
    doc["calls"].append(dict(command=["lserve-hf", "bench", "e2e", *argv], date=now(), host=platform.node(),
                             lserve_hf_commit=git_commit()))
    done = {run_key(r) for r in doc["runs"] if r["status"] in STATUSES_KEPT}
    doc["runs"] = [r for r in doc["runs"] if r["status"] in STATUSES_KEPT]
    todo = [c for c in plan(args.methods, args.batch, lengths, args.reps) if c not in done]
    print(f"bench e2e: {len(todo)} configurations to run, "
          + ("one after the other in this process" if args.in_process else "each in a fresh process")
          + (f" ({len(done)} kept from {args.out})" if done else ""), flush=True)
    skipped = []
    for i, (rep, batch, length, method) in enumerate(todo):
        remaining = None if args.time_budget is None else args.time_budget - (time.perf_counter() - started)
        label = f"rep {rep} {method:<14} b{batch} {length:>7}"
        if remaining is not None and (remaining <= 0 or estimate(doc["runs"], method, batch, length) > remaining):
            skipped.append(dict(rep=rep, method=method, batch=batch, length=length))
            print(f"[{i + 1}/{len(todo)}] {label}: skipped (time budget)", flush=True)
            continue
        spec = child_spec(settings, method, batch, length)
        result = in_process(spec) if args.in_process else run_child(child_command(spec), timeout=remaining)
        result.update(rep=rep, method=method, batch=batch, length=length, new_length=spec["new_length"], date=now())
        doc["runs"].append(result)
        print(f"[{i + 1}/{len(todo)}, {time.perf_counter() - started:.0f} s] {label}: {one_line(result)}", flush=True)
        write(doc, args.out, skipped)
    doc = write(doc, args.out, skipped)
    if skipped:
        print(f"\nskipped for the time budget ({args.time_budget:.0f} s), {len(skipped)} configurations: "
              + ", ".join(f"rep {s['rep']} {s['method']} b{s['batch']} {s['length']}" for s in skipped)
              + (" (run the same command with --resume to add them)" if args.out else ""))
    if args.plot:
        plot(doc["summary"], args.plot, doc)
    print_table(doc)
    return 0


def resolve(args) -> dict:
    """What every child of this run shares (and what --resume requires to be the same)."""
    if args.hbm_pages is not None and args.offload is None:
        raise SystemExit("bench e2e: --hbm-pages needs --offload host")
    if args.offload is not None and args.hbm_pages is None:
        raise SystemExit("bench e2e: --offload host needs --hbm-pages N")
    if args.dry_run and args.memory_cap_gib is not None:
        raise SystemExit("bench e2e: --memory-cap-gib caps GPU memory; the dry run runs on the CPU")
    if args.in_process and not args.dry_run:
        raise SystemExit("bench e2e: --in-process is for --dry-run: measured configurations each need a fresh process")
    if args.resume and not args.out:
        raise SystemExit("bench e2e: --resume needs --out FILE.json")
    base = DRY if args.dry_run else REAL
    chunk = base["chunk"] if args.chunk is None else args.chunk
    knobs = dict(base["knobs"], streaming_sparsity=args.sparsity,
                 prefill_local=args.prefill_local or base["prefill_local"], prefill_chunk_size=chunk or None,
                 cuda_graphs=not args.no_graphs, fused_norm_mlp=not args.no_fused)
    extra = lserve_extra(args)
    if any(m in LSERVE_METHODS for m in args.methods):
        from lserve_hf import LServeConfig

        try:   # a config LServeConfig refuses fails here once, not in every child
            LServeConfig(**knobs, **extra)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"bench e2e: {exc}") from None
    model = dict(TINY_LLAMA if args.dry_run else LLAMA3_8B)
    model["num_hidden_layers"] = args.layers or model["num_hidden_layers"]
    return dict(model=model, dtype="bfloat16", dry_run=args.dry_run, layers=args.layers,
                decode_tokens=args.decode_tokens or base["decode_tokens"], warmup_length=base["warmup_length"],
                seed=0, memory_cap_gib=args.memory_cap_gib, lserve=knobs, lserve_extra=extra,
                ttft_only=args.ttft_only)


def lserve_extra(args) -> dict:
    """The LServeConfig fields that --dynamic-density and --offload set; refused, naming what is
    missing, when this lserve_hf's LServeConfig has no such fields."""
    wanted = {}
    if args.dynamic_density is not None:
        d = args.dynamic_density
        wanted["--dynamic-density"] = dict(prefill_dynamic=True, dynamic_min_density=d, dynamic_max_density=d)
    if args.offload is not None:
        wanted["--offload"] = dict(offload=args.offload, hbm_pages=args.hbm_pages)
    if not wanted:
        return {}
    from lserve_hf import LServeConfig

    have = {f.name for f in dataclasses.fields(LServeConfig)}
    for flag, fields in wanted.items():
        missing = [name for name in fields if name not in have]
        if missing:
            raise SystemExit(f"bench e2e: {flag} sets LServeConfig fields that this lserve_hf does not have "
                             f"({', '.join(missing)}); nothing was run")
    return {k: v for fields in wanted.values() for k, v in fields.items()}


def plan(methods, batches, lengths, reps) -> list[tuple]:
    """(rep, batch, length, method) in run order. Repetitions are outermost, so a time budget that
    runs out leaves every configuration with as many repetitions as it could; within one, the
    methods run in the given order, reversed every other repetition (rep 0: A B C, rep 1: C B A)."""
    return [(rep, b, n, m) for rep in range(reps) for b in batches for n in lengths
            for m in (methods if rep % 2 == 0 else methods[::-1])]


def run_key(run: dict) -> tuple:
    return run["rep"], run["batch"], run["length"], run["method"]


def new_length(length: int) -> int:
    """A prompt length the child has not seen: the length less an odd offset (a quarter of it, made
    odd, for lengths too short for the offset)."""
    return length - NEW_LENGTH_OFFSET if length > 2 * NEW_LENGTH_OFFSET else length - (length // 4 | 1)


def child_spec(settings: dict, method: str, batch: int, length: int) -> dict:
    keep = ("dry_run", "layers", "decode_tokens", "warmup_length", "seed", "memory_cap_gib", "lserve", "lserve_extra")
    return dict({k: settings[k] for k in keep}, ttft_only=settings.get("ttft_only", False), method=method,
                batch=batch, length=length,
                new_length=new_length(length))


def estimate(runs: list[dict], method: str, batch: int, length: int) -> float:
    """A lower bound of how long a configuration takes: its own duration in an earlier repetition,
    else the longest the same method took on a smaller batch x length, else 0."""
    same = [r["wall_s"] for r in runs if (r["method"], r["batch"], r["length"]) == (method, batch, length)]
    if same:
        return max(same)
    smaller = [r["wall_s"] for r in runs if r["method"] == method and r["batch"] * r["length"] <= batch * length]
    return max(smaller, default=0.0)


def child_command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "lserve_hf.benchmarks.bench_e2e", "--child", json.dumps(spec)]


def run_child(cmd: list[str], timeout: float | None) -> dict:
    """Run one configuration's child ``cmd`` in a fresh process with compile caches of its own
    (Triton's and inductor's, in a directory removed afterwards); its JSON line, or status "error"
    / "timeout" with the tail of its stderr."""
    # a stopped child's compile workers may still be writing there: its removal must not fail
    with tempfile.TemporaryDirectory(prefix="bench_e2e_", ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryFile() as err:
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
        t0 = time.perf_counter()
        # a session of its own: a child stopped at the time budget takes its compile workers along
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):    # it may have ended meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()     # not its stdout: a worker outside the group could hold that open
            proc.stdout.close()
            out, timed_out = "", True
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read()[-3000:].decode(errors="replace")
    lines = out.strip().splitlines()
    if timed_out:
        result = dict(status="timeout", message=f"stopped at the time budget after {wall:.0f} s")
    elif proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        last = [line for line in tail.splitlines() if line.strip()]
        result = dict(status="error", message=f"exit {proc.returncode}: {last[-1] if last else 'no output'}")
    else:
        result = json.loads(lines[-1])
    return dict(result, wall_s=wall, stderr_tail=tail)


def in_process(spec: dict) -> dict:
    """--in-process: a child's work done in this process, its result as its JSON line would carry it."""
    from lserve_hf.benchmarks.e2e_child import run

    t0 = time.perf_counter()
    result = json.loads(json.dumps(run(spec)))
    return dict(result, wall_s=time.perf_counter() - t0, stderr_tail="")


def one_line(r: dict) -> str:
    """A run's result as it arrives."""
    if r["status"] == "ok":
        peak = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
        compiled = compiled_after_warmup(r)
        if "tpot_ms" not in r:    # --ttft-only
            text = f"TTFT {r['ttft_s']:.3f} s (first call {r['first_call_s']:.3f} s){peak}"
        else:
            text = (f"TTFT {r['ttft_s']:.3f} s, TPOT {r['tpot_ms']:.2f} ms{peak}, KV {r['kv_gib']:.3f} GiB, "
                    f"new length {r['new_length_first_s']:.3f}/{r['new_length_second_s']:.3f} s")
        return (text + f" (child {r['wall_s']:.0f} s)"
                + (f"; compiled after the warm-up: {compiled}" if compiled else ""))
    if r["status"] == "oom":
        return f"OOM in {r['phase']} (child {r['wall_s']:.0f} s)"
    return f"{r['status']}: {r['message']}"


def load_previous(path: str, settings: dict) -> dict | None:
    """The earlier results of --resume, if their settings are these (else refused: medians over
    runs of different settings would mean nothing)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    ours = json.loads(json.dumps(settings))
    differ = sorted(k for k in set(ours) | set(doc["settings"]) if ours.get(k) != doc["settings"].get(k))
    if differ:
        raise SystemExit(f"bench e2e: {path} was made with other settings ({', '.join(differ)}); "
                         "use another --out, or the same flags")
    return doc


def write(doc: dict, path: str | None, skipped: list) -> dict:
    """Recompute the medians and write the JSON (atomically: a stopped run leaves a whole file)."""
    doc["summary"] = summarise(doc["runs"])
    doc["environment"] = next((r["env"] for r in reversed(doc["runs"]) if "env" in r), None)
    doc["calls"][-1]["skipped"] = skipped
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    return doc


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout the benchmark runs from, where there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except FileNotFoundError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


if __name__ == "__main__":
    raise SystemExit(main())
