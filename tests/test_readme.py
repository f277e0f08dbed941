"""README.md's Usage snippet runs as written and prints what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_snippet_runs(embedded, monkeypatch, capsys):
    import lserve_hf

    snippet = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    # the session's embedded model stands in for the snippet's own load (the same model, loaded once)
    monkeypatch.setattr(lserve_hf, "load_embedded_model", lambda: embedded)
    exec(compile(snippet, str(README), "exec"), {})
    dense, lserve = capsys.readouterr().out.splitlines()
    kv = [float(re.search(r"KV cache ([\d.]+) MiB", line).group(1)) for line in (dense, lserve)]
    assert dense.startswith("dense:") and lserve.startswith("LServe:")
    assert "68413" in dense and "68413" in lserve
    assert kv[1] < kv[0]
    assert getattr(embedded[0], "_lserve", None) is None          # the snippet unpatches
