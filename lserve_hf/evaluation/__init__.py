"""Offline long-context evaluation of LServe against dense attention and its ablations.

    python -m lserve_hf.evaluation --tasks passkey niah_single --lengths 1000 2000 --out eval_out

Public API: :func:`main` (the ``lserve-hf eval`` command line), :func:`make_case` /
:func:`make_grid` (seeded prompts), :func:`score` (RULER-style scoring), :func:`evaluate` (run cases
through methods), :func:`method_configs` / :func:`default_lserve_config`, :func:`write_results`,
:func:`summary_table`, :func:`plot_heatmaps`, :func:`plot_accuracy_vs_length`.
"""

from .runner import (METHODS, default_lserve_config, evaluate, load_model, main, method_configs,
                     plot_accuracy_vs_length, plot_heatmaps, summary_table, write_results)
from .scoring import passed, score
from .tasks import HAYSTACKS, TASKS, Case, haystack_sentences, make_case, make_grid

__all__ = ["HAYSTACKS", "METHODS", "TASKS", "Case", "default_lserve_config", "evaluate", "haystack_sentences",
           "load_model", "main", "make_case", "make_grid", "method_configs", "passed", "plot_accuracy_vs_length",
           "plot_heatmaps", "score", "summary_table", "write_results"]
