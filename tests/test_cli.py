import argparse
import os
import subprocess
import sys
import time

import pytest
import torch

from lserve_hf.heads import load_pattern
from lserve_hf.cli import build_parser, main


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lserve_hf.cli", *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_console_script_help():
    out = _run_cli("--help")
    assert out.returncode == 0
    for cmd in ("demo", "calibrate", "eval", "bench"):
        assert cmd in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"]], ids=" ".join)
def test_help_answers_at_once(args):
    # the best of three: the machine running the tests may be busy
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = _run_cli(*args)
        seconds.append(time.perf_counter() - t0)
        assert out.returncode == 0 and out.stdout.startswith("usage: lserve-hf")
    assert min(seconds) < 1.5, seconds


def test_help_imports_neither_torch_nor_transformers():
    # what makes --help fast, checked without timing it
    code = ("import sys; from lserve_hf.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _commands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")      # one line per option: nothing wrapped mid-default
    for name, cmd in _commands(build_parser()).items():
        text = " ".join(cmd.format_help().split())
        for action in cmd._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[-1]
            assert action.help, f"{name} {flag} has no help text"
            if action.default not in (None, False) and flag != "--help":
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {shown})" in text, f"{name} {flag}: default not shown"


@pytest.mark.parametrize("what", ["kernels", "e2e"])
def test_bench_help_shows_its_command_name(what, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", what, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lserve-hf bench {what} ")


@pytest.mark.parametrize("what", ["kernels", "e2e"])
def test_bench_without_a_gpu_says_so(what, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", what]) == 2
    assert f"lserve-hf bench {what} needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["demo"], ["eval"], ["calibrate", "--output", "x"]], ids=lambda a: a[0])
def test_device_cuda_without_a_gpu_is_refused(args, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(args + ["--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"lserve-hf {args[0]}: error: --device cuda: no CUDA GPU" in err


def test_gpu_refusal_has_no_traceback():
    # a real process on a build (or a machine) without a usable GPU: the message, no traceback
    out = _run_cli("bench", "kernels", env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "/no/such/model"], "no model folder at /no/such/model"),
    (["calibrate", "--output", "x", "--model", "/no/such/model"], "no model folder at /no/such/model"),
    (["demo", "--tokens", "-5"], "--tokens -5: too short for LServe's sparse paths"),
    (["demo", "--tokens", "10"], "use at least 1216 tokens"),
    (["demo", "--plot-lengths", "500"], "--plot-lengths 500: too short"),
    (["demo", "--tokens", "9000"], "exceeds the embedded model's context of 8192 tokens"),
    (["demo", "--new-tokens", "3"], "--new-tokens 3: at least 6"),
    (["demo", "--depths", "1.5"], "1.5 is outside [0, 1]"),
    (["eval", "--lengths", "0"], "argument --lengths: 0 is less than 1"),
    (["eval", "--depths", "1.2"], "1.2 is outside [0, 1]"),
    (["eval", "--depths", "-0.1"], "-0.1 is outside [0, 1]"),
    (["eval", "--lengths", "many"], "argument --lengths: invalid int value: 'many'"),
    (["eval", "--depths", "deep"], "argument --depths: invalid float value: 'deep'"),
    (["calibrate", "--output", "x", "--lengths", "0"], "argument --lengths: 0 is less than 16"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_arguments_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: lserve-hf {args[0]}") and message in err, err


@pytest.mark.slow
def test_demo_runs_and_plots(embedded, tmp_path, monkeypatch, capsys):
    import lserve_hf.demo

    monkeypatch.setattr(lserve_hf.demo, "load_embedded_model", lambda device=None: embedded)
    png = tmp_path / "demo.png"
    assert main(["demo", "--tokens", "1300", "--depths", "0.5", "--plot-lengths", "--new-tokens", "7",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "45 of 90 KV heads stream" in out and "token_budget" in out     # the auto-scaled defaults
    assert "✓" in out and "KV cache holds" in out and "Pass keys found: dense 1 of 1" in out
    assert "Peak memory is not measured on CPU" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    assert getattr(embedded[0], "_lserve", None) is None           # left unpatched


def test_calibrate_probe_writes_a_pattern(embedded, tmp_path, monkeypatch):
    import lserve_hf.embedded

    monkeypatch.setattr(lserve_hf.embedded, "load_embedded_model", lambda device=None: embedded)
    rc = main(["calibrate", "--method", "probe", "--output", str(tmp_path / "pat"), "--lengths", "700",
               "--depths", "0.5", "--sink", "16", "--local", "64"])
    assert rc == 0
    scores = load_pattern(tmp_path / "pat")
    assert scores.shape == (30, 3) and 0 <= scores.min() and scores.max() == 1.0
    assert torch.isfinite(scores).all() and scores.std() > 0


def test_calibrate_refine_reranks_the_shipped_pattern_near_the_threshold(embedded, tmp_path, monkeypatch):
    import lserve_hf.embedded
    from lserve_hf.heads import find_shipped_pattern

    monkeypatch.setattr(lserve_hf.embedded, "load_embedded_model", lambda device=None: embedded)
    rc = main(["calibrate", "--method", "refine", "--output", str(tmp_path / "ref"), "--lengths", "600",
               "--depths", "0.5", "--sink", "16", "--prefill-local", "64", "--decode-local", "64",
               "--budget", "128", "--band", "0.45", "0.5"])
    assert rc == 0
    old = load_pattern(find_shipped_pattern(embedded[0].config)).flatten()
    new = load_pattern(tmp_path / "ref").flatten()
    order = torch.argsort(old, stable=True)
    band = order[40:45]                       # 0.45 and 0.5 of 90 KV heads
    outside = torch.ones(90, dtype=torch.bool)
    outside[band] = False
    assert torch.equal(new[outside], old[outside])
    assert torch.equal(new[band].sort().values, old[band].sort().values)


def _no_model(monkeypatch):
    """Calibrate must refuse its arguments before it loads a model."""
    import lserve_hf.embedded

    def load(device=None):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(lserve_hf.embedded, "load_embedded_model", load)


def test_calibrate_refuses_an_unwritable_output_before_the_run(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    # under a regular file no folder can ever be made, whoever runs (root passes permission checks)
    for output in (a_file / "pattern", a_file / "pattern.tsv", a_file / "deeper" / "pattern"):
        with pytest.raises(SystemExit, match="is a file, not a folder"):
            main(["calibrate", "--output", str(output)])
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "8"], "argument --lengths: 8 is less than 16"),
    (["--lengths", "700", "15"], "argument --lengths: 15 is less than 16"),
    (["--method", "duo", "--steps", "0"], "argument --steps: 0 is less than 1"),
    (["--method", "duo", "--save-every", "0"], "argument --save-every: 0 is less than 1"),
    (["--lengths", "many"], "argument --lengths: invalid int value: 'many'"),
])
def test_calibrate_refuses_bad_lengths_and_steps(tmp_path, monkeypatch, capsys, flags, message):
    _no_model(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--output", str(tmp_path / "pattern"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pattern").exists()


def test_calibrate_duo_refuses_more_than_two_lengths_before_the_run(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(SystemExit, match="MIN MAX"):
        main(["calibrate", "--method", "duo", "--output", str(tmp_path / "pattern"),
              "--lengths", "100", "200", "300"])
