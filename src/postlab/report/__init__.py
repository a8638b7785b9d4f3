"""The analysis of a study: from its run directories to a report with honest statistics
(docs/statistics.md has the method).

    results.py      the one reader of study and run directories (result.json, metrics.jsonl, evaluations)
    comparisons.py  which arms a study compares, against what baseline, and the findings
    paired.py       comparing two arms: the seed x example test, the 1-seed tests, the detectable effect
    stats.py        seed-level summaries, t-intervals, Holm
    stages.py       the same comparisons at the end of a named stage (a study's `compare_stages`)
    power.py        the detectable effect of each comparison a study plans (`postlab study plan`)
    plots.py        the report's figures
    writer.py       report.md, runs.csv, comparisons.csv, baselines.csv (:func:`write_report`)

The public names below load their module on first use: `postlab study plan` reads power.py without
importing pandas and matplotlib.
"""
from __future__ import annotations

__all__ = ["add_win_rates", "baseline_comparisons", "find_incomplete", "load_runs", "paired_comparisons",
           "summary_table", "summary_text", "task_primary_metrics", "win_rate", "write_report"]


def __getattr__(name: str):
    if name in ("write_report", "summary_text", "summary_table"):
        from . import writer as module
    elif name in ("load_runs", "find_incomplete", "add_win_rates", "win_rate"):
        from . import results as module
    elif name in ("paired_comparisons", "baseline_comparisons", "task_primary_metrics"):
        from . import comparisons as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
