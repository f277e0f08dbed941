import subprocess
import sys

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
