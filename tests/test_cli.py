import subprocess
import sys

import pytest
import torch

from lserve_hf.heads import load_pattern
from lserve_hf.cli import main


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lserve_hf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("demo", "calibrate", "eval", "bench"):
        assert cmd in out.stdout


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
