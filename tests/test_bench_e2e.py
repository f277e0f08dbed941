"""The end-to-end benchmark without a GPU: its dry run (a 2-layer tiny Llama on the CPU) through every
method, the JSON, the table and the plot; and the parent's plumbing (run order, time budget,
resume, refusals, children that fail or overrun) with stand-in children that start in
milliseconds. The dry run runs its configurations in this process (``--in-process``): a fresh
interpreter per configuration would spend most of a minute importing transformers."""

import dataclasses
import json
import os
import sys

import pytest
import torch

from lserve_hf import LServeConfig
from lserve_hf.benchmarks import bench_e2e, e2e_child, e2e_report
from lserve_hf.benchmarks.e2e_child import METHODS


PHASES = ("warm-up", "first call at the length", "TTFT", "TPOT", "forward-only", "new length")


def test_dry_run_every_method(tmp_path, capsys, monkeypatch):
    measure, cudnn_runs = e2e_child.measure, []

    def second_cudnn_runs_out_of_memory(spec, result):
        # an out-of-memory configuration is a result (status "oom", the phase), not a crash
        cudnn_runs.extend([spec] if spec["method"] == "sdpa-cudnn" else [])
        if len(cudnn_runs) == 2 and spec["method"] == "sdpa-cudnn":
            result["phase"] = "TPOT"
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        measure(spec, result)
    monkeypatch.setattr(e2e_child, "measure", second_cudnn_runs_out_of_memory)
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert bench_e2e.main(["--dry-run", "--in-process", "--reps", "2", "--batch", "2", "--out", str(out),
                           "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())

    runs = doc["runs"]
    # rep 0 in the given order, rep 1 reversed
    assert [(r["rep"], r["method"]) for r in runs] == [(0, m) for m in METHODS] + [(1, m) for m in METHODS[::-1]]
    failed = [(r["method"], r["status"], r["phase"]) for r in runs if r["status"] != "ok"]
    assert failed == [("sdpa-cudnn", "oom", "TPOT")]
    for r in runs:
        if r["status"] == "ok":
            # nothing compiles after the warm-up (on the CPU: no torch.compile graph)
            assert r["phase"] == "done" and set(r["compiles"]) == set(PHASES) and not any(
                r["compiles"][p] for p in PHASES[1:]), r
            # TPOT is a difference of two calls: on a loaded CPU with N=4 its sign is noise
            assert r["ttft_s"] > 0 and r["fwd_decode_ms"] > 0 and isinstance(r["tpot_ms"], float)
            assert r["new_length"] == bench_e2e.new_length(320) and r["new_length"] % 2
    static = [r for r in runs if r["method"] == "static-compile"]
    # one graph, no break; its compile comes in the first run's warm-up (a later run in the same
    # process may find it in dynamo's cache)
    assert all(r["dynamo_graphs"] >= 1 and r["dynamo_graph_breaks"] == 0 for r in static) and \
        static[0]["compiles"]["warm-up"] >= 1, [(r["dynamo_graphs"], r["dynamo_graph_breaks"], r["compiles"])
                                                for r in static]
    summary = {r["method"]: r for r in doc["summary"]}
    assert (summary["sdpa-cudnn"]["reps"], summary["sdpa-cudnn"]["runs"]) == (1, 2)
    tpot = summary["lserve"]["tpot_ms"]
    assert summary["lserve"]["reps"] == 2 and tpot["min"] <= tpot["median"] <= tpot["max"]
    # LServe stores the streaming heads' window and the pages, less than the dense cache
    assert summary["lserve"]["kv_gib"]["median"] < summary["sdpa"]["kv_gib"]["median"]
    assert doc["settings"]["lserve"]["token_budget"] == 128 and runs[0]["env"]["torch"] == torch.__version__
    assert doc["calls"][0]["command"][:3] == ["lserve-hf", "bench", "e2e"]
    assert png.stat().st_size > 0
    # the table comes last, with the speed-up line from the medians
    assert "== batch 2, 320 tokens (2 repetitions" in printed and "(1 of 2 runs ok)" in printed
    assert printed.rstrip().splitlines()[-1].startswith("LServe speed-up (peer median / lserve median): sdpa TTFT")


def test_table_of_failed_configurations(capsys):
    ok = dict(status="ok", rep=0, batch=1, length=64, method="sdpa", ttft_s=1.0, tpot_ms=20.0, kv_gib=1.0,
              new_length_first_s=1.5, new_length_second_s=1.0, compiles={"warm-up": 9, "TTFT": 2, "TPOT": 0})
    runs = [ok, dict(ok, method="lserve", status="oom", phase="TTFT"),
            dict(ok, method="static-compile", status="error", message="exit 1: boom")]
    doc = dict(settings=bench_e2e.resolve(bench_e2e.parser().parse_args(["--dry-run"])), runs=runs,
               summary=e2e_report.summarise(runs))
    e2e_report.print_table(doc)
    printed = capsys.readouterr().out
    assert "lserve         OOM in TTFT" in printed and "static-compile error: exit 1: boom" in printed
    # a first call at a new length past 1.25x the second is flagged
    assert "1.500 / 1.000 (1.50x!)" in printed and "speed-up" not in printed
    assert "compiled after the warm-up: {'TTFT': 2}" in printed


def test_child_entry_prints_one_json_line(capsys):
    spec = bench_e2e.child_spec(bench_e2e.resolve(bench_e2e.parser().parse_args(["--dry-run"])), "sdpa", 1, 96)
    assert bench_e2e.main(["--child", json.dumps(spec)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["kv_gib"] > 0


def test_resume_runs_only_what_is_missing(tmp_path, capsys):
    out = str(tmp_path / "e2e.json")
    common = ["--dry-run", "--in-process", "--reps", "1", "--lengths", "96", "--out", out]
    assert bench_e2e.main(common + ["--methods", "sdpa"]) == 0
    capsys.readouterr()
    assert bench_e2e.main(common + ["--methods", "sdpa", "lserve", "--resume"]) == 0
    assert "1 configurations to run" in capsys.readouterr().out
    doc = json.loads(open(out).read())
    assert [r["method"] for r in doc["runs"]] == ["sdpa", "lserve"] and len(doc["calls"]) == 2
    with pytest.raises(SystemExit, match="other settings.*lserve"):
        bench_e2e.main(common + ["--methods", "sdpa", "--resume", "--sparsity", "0.25"])


def test_time_budget_skips_and_says_which(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert bench_e2e.main(["--dry-run", "--in-process", "--methods", "sdpa", "lserve", "--reps", "1",
                           "--time-budget", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped for the time budget (0 s), 2 configurations: rep 0 sdpa b1 320, rep 0 lserve b1 320" in printed
    doc = json.loads(out.read_text())
    assert doc["runs"] == [] and len(doc["calls"][0]["skipped"]) == 2


def test_plan_and_estimates():
    plan = bench_e2e.plan(["a", "b", "c"], [1], [10, 20], 2)
    assert plan[:3] == [(0, 1, 10, "a"), (0, 1, 10, "b"), (0, 1, 10, "c")]
    assert [m for r, _, n, m in plan if r == 1 and n == 20] == ["c", "b", "a"]
    runs = [dict(method="a", batch=1, length=10, wall_s=5.0), dict(method="a", batch=1, length=20, wall_s=9.0)]
    assert bench_e2e.estimate(runs, "a", 1, 20) == 9.0      # the same configuration, an earlier rep
    assert bench_e2e.estimate(runs, "a", 8, 10) == 9.0      # the longest of smaller workloads
    assert bench_e2e.estimate(runs, "a", 1, 5) == 0.0 == bench_e2e.estimate(runs, "b", 1, 20)
    assert bench_e2e.new_length(262144) == 262144 - 2767 and bench_e2e.new_length(320) == 239


def _stand_in(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_child_plumbing_with_stand_ins():
    ok = bench_e2e.run_child(_stand_in(
        "import json, os; print('other output'); print(json.dumps(dict(status='ok', "
        "caches=[os.environ['TRITON_CACHE_DIR'], os.environ['TORCHINDUCTOR_CACHE_DIR']])))"), timeout=None)
    again = bench_e2e.run_child(_stand_in(
        "import json, os; print(json.dumps(dict(status='ok', caches=[os.environ['TRITON_CACHE_DIR']])))"), timeout=None)
    assert ok["status"] == "ok" and ok["wall_s"] > 0
    # compile caches of its own, removed afterwards: nothing compiled is handed to the next child
    assert ok["caches"][0] != again["caches"][0] and not os.path.exists(os.path.dirname(ok["caches"][0]))
    failed = bench_e2e.run_child(_stand_in("import sys; sys.stderr.write('boom\\n'); sys.exit(3)"), timeout=None)
    assert failed["status"] == "error" and failed["message"] == "exit 3: boom"
    late = bench_e2e.run_child(_stand_in("import time; print('{}', flush=True); time.sleep(60)"), timeout=1)
    assert late["status"] == "timeout" and late["wall_s"] < 30


def test_refusals(capsys):
    if not torch.cuda.is_available():
        assert bench_e2e.main(["--lengths", "8192"]) == 2
        assert "bench e2e needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--offload host needs --hbm-pages"):
        bench_e2e.main(["--dry-run", "--offload", "host"])
    with pytest.raises(SystemExit, match="--in-process is for --dry-run"):
        bench_e2e.main(["--in-process", "--lengths", "8192"])
    have = {f.name for f in dataclasses.fields(LServeConfig)}
    for flags, fields in ((["--dynamic-density", "0.1"], ("prefill_dynamic", "dynamic_min_density")),
                          (["--offload", "host", "--hbm-pages", "64"], ("offload", "hbm_pages"))):
        args = bench_e2e.parser().parse_args(["--dry-run", *flags])
        if set(fields) <= have:
            assert set(fields) <= set(bench_e2e.resolve(args)["lserve_extra"])
        else:
            with pytest.raises(SystemExit, match=f"{flags[0]} sets LServeConfig fields .*{fields[0]}"):
                bench_e2e.resolve(args)


def test_cpu_benchmark_times_every_step_of_one_generate():
    """bench_cpu's figures come from one generate() call: a stamp per new token, so TTFT covers
    the prefill and TPOT the steps after it, on a patched model as on a dense one."""
    from conftest import tiny_llama
    from lserve_hf import patch_model
    from lserve_hf.benchmarks import bench_cpu

    model = tiny_llama()
    x = {"input_ids": torch.randint(1, 100, (1, 90), generator=torch.Generator().manual_seed(0))}
    for patched in (False, True):
        if patched:
            patch_model(model, LServeConfig(streaming_sparsity=0.0, token_budget=32, page_size=16,
                                            logical_page_size=4))
        stamps = bench_cpu._Stamps()
        ttft, tpot = bench_cpu.run_once(model, x, 5, stamps)
        assert len(stamps.times) == 5 and ttft > 0 and tpot > 0
        assert tpot == pytest.approx((stamps.times[-1] - stamps.times[0]) / 4 * 1e3)


def test_cpu_benchmark_counts_the_operations_of_a_decode_step():
    """bench_cpu --count-ops: the tensor operations of one decode step, dense and patched; a
    patched step of a model with streaming and retrieval heads dispatches its own (more) work."""
    from conftest import tiny_llama
    from lserve_hf import patch_model, unpatch_model
    from lserve_hf.benchmarks import bench_cpu

    model = tiny_llama()
    x = {"input_ids": torch.randint(1, 100, (1, 90), generator=torch.Generator().manual_seed(0))}
    dense = bench_cpu.decode_ops(model, x, steps=2)
    patch_model(model, LServeConfig(streaming_sparsity=0.5, token_budget=32, page_size=16, logical_page_size=4,
                                    decode_sink=4, decode_local=16), head_pattern=torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    patched = bench_cpu.decode_ops(model, x, steps=2)
    unpatch_model(model)
    assert dense == bench_cpu.decode_ops(model, x, steps=2) > 0
    assert patched > dense and patched == int(patched)
