"""The built wheel holds every package and the shipped patterns, under lserve_hf only, and the
build prints no setuptools warning (an editable install hides what a wheel would miss)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_package_and_no_top_level_kernels(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "BuildBackendWarning" not in run.stderr and "SetuptoolsDeprecationWarning" not in run.stderr
    (wheel,) = tmp_path.glob("lserve_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {p.relative_to(ROOT / "lserve_hf").parent.as_posix()
               for p in (ROOT / "lserve_hf").rglob("*.py")}
    for folder in sorted(sources):
        prefix = "lserve_hf/" if folder == "." else f"lserve_hf/{folder}/"
        assert any(n.startswith(prefix) and n.endswith(".py") for n in names), folder
    for sub in ("kernels", "calibration", "benchmarks"):
        assert f"lserve_hf/{sub}/__init__.py" in names
    assert any(n.endswith("shipped_patterns/SmolLM2-135M-Instruct/full_attention_heads.tsv") for n in names)
    tops = {n.split("/")[0] for n in names if not n.startswith("lserve_hf-")}
    assert tops == {"lserve_hf"}, tops
