"""The offline long-context evaluation harness: seeded generators, RULER-style scoring, and a small
end-to-end run on the embedded model."""

import csv
import json

import pytest

from lserve_hf.evaluation import TASKS, make_case, method_configs, passed, score
from lserve_hf.evaluation import runner as runner_mod


@pytest.fixture(scope="module")
def tok(embedded):
    return embedded[1]


def _n(tok, text):
    return len(tok(text, add_special_tokens=False).input_ids)


# --- generators ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(tok, task):
    a = make_case(tok, task, 600, 0.4, seed=3)
    b = make_case(tok, task, 600, 0.4, seed=3)
    c = make_case(tok, task, 600, 0.4, seed=4)
    assert a == b
    assert a.expected != c.expected and a.prompt != c.prompt


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [500, 2500])
def test_prompt_length_within_5_percent(tok, task, length):
    c = make_case(tok, task, length, 0.5, seed=1, haystack="essay" if task in ("niah_single", "vt") else "filler")
    measured = len(tok(c.prompt).input_ids)
    assert measured == c.n_tokens
    assert abs(measured - length) <= 0.05 * length


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_at_requested_depth(tok, task, depth):
    c = make_case(tok, task, 1200, depth, seed=2)
    h0, h1 = c.haystack_span
    n0, n1 = c.needle_spans[0]
    assert h0 <= n0 < n1 <= h1
    # depth = the fraction of the haystack's own text (other needles left out) before the needle
    others = sorted(c.needle_spans[1:] + c.distractor_spans)

    def strip(a, b):
        text, pos = "", a
        for s, e in others:
            if s >= a and e <= b:
                text, pos = text + c.prompt[pos:s], e
        return text + c.prompt[pos:b]
    hay_tokens = _n(tok, strip(h0, h1))
    before = _n(tok, strip(h0, n0))
    assert abs(before / hay_tokens - depth) <= 0.03
    # every expected answer is in the prompt, inside an asked needle
    for e in c.expected if task != "vt" else c.expected[:1]:
        assert any(e in c.prompt[a:b] for a, b in c.needle_spans)


def test_value_types_and_multi_needles(tok):
    u = make_case(tok, "niah_single", 500, 0.5, value_type="uuid")
    assert len(u.expected[0]) == 36 and u.expected[0].count("-") == 4 and u.expected[0] in u.prompt
    n = make_case(tok, "niah_single", 500, 0.5)
    assert n.expected[0].isdigit() and len(n.expected[0]) == 7
    mk = make_case(tok, "niah_multikey", 800, 0.5)
    assert len(mk.needle_spans) == 1 and len(mk.distractor_spans) == 3
    first, last = min(s[0] for s in mk.distractor_spans), max(s[0] for s in mk.distractor_spans)
    assert first < mk.needle_spans[0][0] < last            # distractors on both sides
    mv = make_case(tok, "niah_multivalue", 800, 0.3)
    assert len(mv.expected) == 4 and all(v in mv.prompt for v in mv.expected)
    mq = make_case(tok, "niah_multiquery", 800, 0.3)
    assert len(mq.expected) == 4 and mq.prompt.count("special magic number") >= 4
    vt = make_case(tok, "vt", 800, 0.2)
    assert len(vt.expected) == 5
    pos = [vt.prompt.index(f"VAR {v} =") for v in vt.expected]
    assert pos == sorted(pos)                               # the chain appears in order


def test_haystack_file(tok, tmp_path):
    f = tmp_path / "hay.txt"
    f.write_text("Zebras graze on the open plain at dawn. Lions rest in the shade of acacia trees. " * 3)
    c = make_case(tok, "niah_single", 700, 0.5, haystack_file=str(f))
    assert "Zebras graze" in c.prompt and "grass is green" not in c.prompt
    assert abs(c.n_tokens - 700) <= 35


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="depth"):
        make_case(tok, "passkey", 500, 1.5)
    with pytest.raises(ValueError, match="task"):
        make_case(tok, "nope", 500, 0.5)
    with pytest.raises(ValueError, match="too short"):
        make_case(tok, "niah_multiquery", 50, 0.5)


# --- scoring ------------------------------------------------------------------------------------

def test_score_exact_cases():
    assert score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert passed("The numbers are 1234567 and 7654321.", ["1234567", "7654321"])
    assert score("Only 1234567 here", ["1234567", "7654321"]) == 0.5
    assert not passed("Only 1234567 here", ["1234567", "7654321"])
    assert score("nothing", ["1234567"]) == 0.0
    assert score("They are: abcde, FGHIJ", ["ABCDE", "fghij"]) == 1.0      # case-insensitive
    assert score("9F3A1C2E-8B7D-4E2F-A1B3-0C9D8E7F6A5B", "9f3a1c2e-8b7d-4e2f-a1b3-0c9d8e7f6a5b") == 1.0
    with pytest.raises(ValueError):
        score("x", [])


def test_method_configs(embedded):
    base = runner_mod.default_lserve_config(embedded[0])
    assert (base.token_budget, base.prefill_local, base.decode_local) == (512, 1024, 256)
    assert base.streaming_sparsity == 0.5                  # the embedded model ships a pattern
    cfgs = method_configs(runner_mod.METHODS, base, max_tokens=6010)
    assert cfgs["dense"] is None and cfgs["lserve"] == base
    assert cfgs["streaming-only"].streaming_sparsity == 1.0
    assert cfgs["page-selection-only"].streaming_sparsity == 0.0
    nosel = cfgs["streaming-no-selection"]
    assert nosel.streaming_sparsity == 0.5 and nosel.token_budget >= 6010 and nosel.token_budget % 64 == 0


# --- end to end ---------------------------------------------------------------------------------

def test_end_to_end_embedded(embedded, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_mod, "load_model", lambda path, device=None, progress=True: embedded)
    out = tmp_path / "eval"
    rc = runner_mod.main(["--tasks", "niah_single", "--lengths", "400", "700", "--depths", "0.2", "0.8",
                          "--methods", "dense", "lserve", "--out", str(out), "--no-progress",
                          "--max-new-tokens", "10"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {r["method"] for r in rows} == {"dense", "lserve"}
    assert set(rows[0]) >= {"task", "length", "depth", "method", "expected", "output", "score", "seconds"}
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(float(r["score"]) == 1.0 for r in dense), [(r["expected"], r["output"]) for r in dense]
    data = json.load(open(out / "results.json"))
    assert len(data["cases"]) == 8 and data["meta"]["lserve_config"]["token_budget"] == 512
    for name in ("heatmap_dense", "heatmap_lserve", "accuracy_vs_length"):
        assert _png_size(out / f"{name}.png")
    text = capsys.readouterr().out
    assert "niah_single" in text and "dense" in text and "lserve" in text
    assert text.index("Score (%") < text.index("Plots: ")       # the table comes before the plots


# --- outputs ------------------------------------------------------------------------------------

def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _records(tasks, lengths, depths, methods):
    """Records as ``evaluate`` returns them, with scores of 0, 0.5 and 1 in turn."""
    grid = [(t, L, d, m) for t in tasks for L in lengths for d in depths for m in methods]
    return [dict(task=t, length=L, n_tokens=L, depth=d, method=m, expected=["1234567"], output="",
                 score=i % 3 / 2, passed=i % 3 == 2, seconds=1.0) for i, (t, L, d, m) in enumerate(grid)]


@pytest.mark.parametrize("grid", [(1, 1, 1, 2), (2, 2, 3, 5), (6, 8, 9, 5)], ids=["1x1", "2x3x2", "8x9x6"])
def test_plots_at_any_grid_size(tmp_path, grid):
    from lserve_hf.evaluation import METHODS, plot_accuracy_vs_length, plot_heatmaps

    n_tasks, n_lengths, n_depths, n_methods = grid
    records = _records(TASKS[:n_tasks], [1000 * (i + 1) for i in range(n_lengths)],
                       [i / max(1, n_depths - 1) for i in range(n_depths)], METHODS[:n_methods])
    paths = plot_heatmaps(records, str(tmp_path))
    assert len(paths) == n_methods
    width, height = _png_size(tmp_path / "heatmap_dense.png")
    # grows with the grid but wraps tasks into rows of at most 3 panels (110 dpi)
    assert 300 < width < 110 * 20 and 200 < height < 110 * 12
    assert plot_accuracy_vs_length(records, str(tmp_path)).endswith("accuracy_vs_length.png")
    assert _png_size(tmp_path / "accuracy_vs_length.png")[0] < 110 * 14


def test_without_matplotlib_the_scores_still_print(embedded, tmp_path, monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)         # `import matplotlib...` now fails
    monkeypatch.setattr(runner_mod, "load_model", lambda path, device=None, progress=True: embedded)
    monkeypatch.setattr(runner_mod, "evaluate", lambda *a, **k: _records(["passkey"], [400], [0.5],
                                                                          ["dense", "lserve"]))
    assert runner_mod.main(["--tasks", "passkey", "--lengths", "400", "--depths", "0.5", "--out",
                            str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "passkey" in text and "lserve" in text
    assert "No plots: install matplotlib (pip install matplotlib) for the heatmaps." in text
    assert (tmp_path / "results.csv").is_file() and not list(tmp_path.glob("*.png"))


def test_selector_option_reaches_the_served_config(embedded, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "load_model", lambda path, device=None, progress=True: embedded)
    out = tmp_path / "eval"
    for selector in ("reuse", "drift"):
        assert runner_mod.main(["--tasks", "passkey", "--lengths", "300", "--depths", "0.5", "--methods",
                                "lserve", "--selector", selector, "--out", str(out), "--no-progress",
                                "--max-new-tokens", "4"]) == 0
        assert json.load(open(out / "results.json"))["meta"]["lserve_config"]["selector"] == selector
