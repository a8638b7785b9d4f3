"""What a study compares, and what it found.

* Between arms: for every axis but seed and task with 2+ values, each pair of its values (A, B),
  over runs that agree on every other axis, paired on seed and on dev example
  (:func:`postlab.report.paired.compare_arms`; a paired t-test over seeds where runs lack per-example
  statistics). Holm's correction runs over all of them: they are the study's family of questions.
* Against baselines: each group of runs against its own starting (zero-shot) model, a second
  family with its own Holm correction.
* Findings: plain sentences for the comparisons significant after Holm, or, where none is, the
  largest difference the data rule out. Intervals and bounds beside a verdict are adjusted as its
  p-value is (`_with_holm`).

The metrics compared on a task (:func:`compared_metrics`): the study file's ``metrics`` that the task
reports, or else its primary metrics; the planner (postlab.report.power) asks the same function.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..metrics import AGAINST_REFERENCE_SPECS, PerExample
from . import results as R
from .paired import compare_arms, compare_seed_values, interval_at
from .stats import format_p, holm, holm_levels

# Which way is better for the metrics tasks report (used where per-example specs are absent).
LOWER_IS_BETTER = ("loss", "dev_loss", "perplexity")
LOGP_SUFFIX = "_logp"  # the metric of a task.score_records file (postlab.tasks.evaluate_task)


def task_primary_metrics(task: Any) -> tuple[str, ...]:
    """The metrics a registered task asks a study to compare (its `primary_metrics`); () if unknown."""
    from ..tasks import TASKS

    cls = TASKS.get(str(task)) if task is not None else None
    return tuple(getattr(cls, "primary_metrics", ())) if cls is not None else ()


def compared_metrics(task: Any, chosen: Sequence[str] | None) -> list[str] | None:
    """The metrics a study compares on `task`, asked before any data (the planner) and after (the
    report, which keeps those with data): the study's `metrics` list where it names metrics the task
    reports (its metric specs and primary metrics, ``<name>_logp`` of ``task.score_records``, and the
    ``ref_*`` metrics of a stage with ``against_reference``: metrics.AGAINST_REFERENCE_SPECS), or
    else the task's primary metrics; None for a task postlab does not know (the report then compares
    every metric with data). A two-task study's list names each task's own."""
    from ..tasks import TASKS

    cls = TASKS.get(str(task)) if task is not None else None
    if cls is None:
        return list(chosen) if chosen else None
    declared = set(getattr(cls, "metric_specs", {}) or {}) | set(task_primary_metrics(task)) | set(AGAINST_REFERENCE_SPECS)
    mine = [m for m in (chosen or []) if m in declared or m.endswith(LOGP_SUFFIX)]
    return mine or list(task_primary_metrics(task))


def primary_metrics(task: Any, df: pd.DataFrame) -> list[str]:
    """The metrics compared for ``task`` (:func:`compared_metrics` of the study's ``metrics`` list,
    ``df.attrs["compare_metrics"]``) that have data in ``df``, then the study's win rates; every
    metric with data for a task postlab does not know."""
    metrics = R.metrics_with_data(df, df.attrs.get("metrics", []))
    wanted = compared_metrics(task, df.attrs.get("compare_metrics"))
    if wanted is None:
        return metrics
    return [m for m in wanted if m in metrics] + [m for m in metrics if m.startswith("win_rate_vs_") and m not in wanted]


def evaluations(df: pd.DataFrame, study_dir: Path, start: bool = False,
                stage: str | None = None) -> dict[str, dict[str, PerExample]]:
    """run id -> {metric: the per-example statistics holding it} of its final evaluation (or its
    starting one, or the end of its stage `stage`): results.evaluation_files."""
    return {rid: R.evaluation_files(study_dir / "runs" / rid, start, stage) for rid in df["run_id"]}


def _seed_evals(g: pd.DataFrame, evals: dict[str, dict[str, PerExample]], metric: str) -> dict[Any, PerExample] | None:
    """seed -> evaluation for one arm, or None unless every run has per-example stats of `metric`."""
    out = {}
    for _, row in g.iterrows():
        e = (evals.get(row["run_id"]) or {}).get(metric)
        if e is None:
            return None
        out[row[R.SEED] if R.SEED in g.columns else 0] = e
    return out


def higher_is_better(metric: str, evals: dict[Any, PerExample] | None = None) -> bool:
    if evals:
        spec = next(iter(evals.values())).specs.get(metric)
        if spec is not None:
            return spec.higher_is_better
    return not (metric in LOWER_IS_BETTER or metric.endswith("_loss"))


def _test(ga: pd.DataFrame, gb: pd.DataFrame, metric: str, evals_a, evals_b, alpha: float, a: str, b: str) -> dict:
    ea, eb = _seed_evals(ga, evals_a, metric), _seed_evals(gb, evals_b, metric)
    if ea and eb:
        res = compare_arms(ea, eb, metric, alpha=alpha, name_a=a, name_b=b)
    else:
        res = compare_seed_values(R.seed_values(ga, metric), R.seed_values(gb, metric), alpha=alpha, name_a=a, name_b=b)
    res["higher_is_better"] = higher_is_better(metric, ea or eb)
    return res


def _with_holm(rows: list[dict], alpha: float) -> pd.DataFrame:
    """The rows as a table with Holm's adjusted p-values, and beside them each comparison's interval
    and equivalence bound at the level Holm held it to (`alpha_holm`, stats.holm_levels): the adjusted
    interval excludes 0 exactly when p_holm < alpha, so a verdict never contradicts the interval
    printed next to it. ci_low/ci_high/equivalence_bound stay the unadjusted ones."""
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out.insert(out.columns.get_loc("p_value") + 1, "p_holm", holm(out["p_value"]))
    out["significant_holm"] = out["p_holm"] < alpha
    levels = holm_levels(out["p_value"], alpha)
    nan = {"ci_low": math.nan, "ci_high": math.nan, "equivalence_bound": math.nan}
    adjusted = [interval_at(r, level) if not math.isnan(level) else nan for r, level in zip(rows, levels)]
    out["alpha_holm"] = levels
    for k in ("ci_low", "ci_high", "equivalence_bound"):
        out[f"{k}_holm"] = [a[k] for a in adjusted]
    return out


def paired_comparisons(df: pd.DataFrame, alpha: float = 0.05, study_dir: Path | None = None,
                       evals: dict[str, dict[str, PerExample]] | None = None) -> pd.DataFrame:
    """One row per (axis, A, B, other axes, metric): n (seeds), n_examples, mean_diff (A − B),
    se, df, ci_low, ci_high, p_value, p_holm, equivalence_bound, test, significant (unadjusted),
    significant_holm, verdict, higher_is_better. Tasks are not compared with each other."""
    if evals is None:
        evals = evaluations(df, study_dir) if study_dir is not None else {}
    group_axes = [a for a in R.group_axes(df) if a != R.TASK]
    rows = []
    for axis in group_axes:
        values = R.sorted_values(df[axis])
        if len(values) < 2:
            continue
        others = [a for a in group_axes if a != axis]
        for task in R.tasks_of(df):
            for key, ctx in R.groups(R.task_rows(df, task), others):
                ctx_label = R.label(key, others) if others else ""
                metrics = primary_metrics(task, R.with_attrs(ctx, df))
                for va, vb in itertools.combinations(values, 2):
                    ga, gb = ctx[ctx[axis] == va], ctx[ctx[axis] == vb]
                    if ga.empty or gb.empty:
                        continue
                    for m in metrics:
                        res = _test(ga, gb, m, evals, evals, alpha, str(va), str(vb))
                        rows.append({"axis": axis, "a": va, "b": vb, "context": ctx_label, "task": task, "metric": m, **res})
    return _with_holm(rows, alpha)


def baseline_comparisons(df: pd.DataFrame, study_dir: Path, alpha: float = 0.05,
                         evals: dict[str, dict[str, PerExample]] | None = None) -> pd.DataFrame:
    """Each group (all axes but seed) against its runs' starting models (zero-shot where the runs
    start from a base model), paired on seed and example: same columns as paired_comparisons,
    with ``group`` naming the group; Holm over these rows."""
    evals = evaluations(df, study_dir) if evals is None else evals
    starts = evaluations(df, study_dir, start=True)
    by = [a for a in R.group_axes(df) if a != R.TASK]
    rows = []
    for task, (key, g) in ((t, kg) for t in R.tasks_of(df) for kg in R.groups(R.task_rows(df, t), by)):
        for m in primary_metrics(task, R.with_attrs(g, df)):
            zero = g.assign(**{m: g[f"{R.ZERO_SHOT}.{m}"]}) if f"{R.ZERO_SHOT}.{m}" in g.columns else None
            if zero is None or zero[m].isna().all():
                continue
            res = _test(g, zero, m, evals, starts, alpha, "trained", "zero-shot")
            rows.append({"group": R.label(key, by), "a": "trained", "b": "zero-shot",
                         "task": task, "metric": m,
                         "zero_shot": float(zero[m].mean()), **res})
    return _with_holm(rows, alpha)


def _fmt(x: float) -> str:
    return f"{x:+.3g}" if math.isfinite(x) else ("n/a" if math.isnan(x) else f"{'+' if x > 0 else '−'}∞")


def findings(comp: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """Plain sentences: each comparison significant after Holm's correction; where there is none,
    the comparisons whose data rule out the smallest differences. Intervals and bounds are Holm's
    (the `_holm` columns), as the verdicts are. Rows with a ``stage`` (postlab.report.stages) say
    which stage's end they compare."""
    if comp.empty:
        return []
    out = []
    for _, r in comp[comp["significant_holm"]].sort_values("p_holm").iterrows():
        where = f"On {r['task']}" if not R.missing(r["task"]) else "Here"
        if not R.missing(r.get("stage")):
            where = f"At the end of stage {r['stage']}, {where[0].lower()}{where[1:]}"
        if r["context"]:
            where += f" ({r['context']})"
        up = r["mean_diff"] > 0
        better = up == bool(r["higher_is_better"])
        word = ("higher" if up else "lower")
        out.append(f"{where}, {r['a']} {'beats' if better else 'falls behind'} {r['b']}: {word} {r['metric']} by "
                   f"{abs(r['mean_diff']):.3g} ({r['a']} − {r['b']} = {_fmt(r['mean_diff'])}, {_ci_words(r)}; "
                   f"{_size(r)}; Holm-adjusted {format_p(r['p_holm'])}).")
    if out:
        return out
    tested = comp[comp["equivalence_bound_holm"].map(lambda x: isinstance(x, float) and math.isfinite(x))]
    for _, r in tested.sort_values("equivalence_bound_holm").head(3).iterrows():
        where = f"on {r['task']}" if not R.missing(r["task"]) else "here"
        if not R.missing(r.get("stage")):
            where = f"at the end of stage {r['stage']} {where}"
        effect = r.get("effect", math.nan)
        short = isinstance(effect, float) and math.isfinite(effect) and r["equivalence_bound_holm"] > effect
        head = (f"Cannot tell {where} whether {r['a']} and {r['b']} differ by the {effect:g} worth finding" if short
                else f"No difference found {where} between {r['a']} and {r['b']}")
        out.append(head + (f" ({r['context']})" if r["context"] else "")
                   + f" in {r['metric']}: the data rule out {'only ' if short else ''}differences larger than "
                   f"{r['equivalence_bound_holm']:.3g} ({r['a']} − {r['b']} = {_fmt(r['mean_diff'])}, {_ci_words(r)}; "
                   f"{_size(r)}; Holm-adjusted {format_p(r['p_holm'])}).")
    return out


def _ci_words(r: pd.Series) -> str:
    return f"Holm-adjusted CI {_fmt(r['ci_low_holm'])} to {_fmt(r['ci_high_holm'])}"


def _size(r: pd.Series) -> str:
    n = int(r["n"])
    text = f"{n} seed{'s' if n != 1 else ''}" + (f" × {int(r['n_examples'])} dev examples" if r.get("n_examples") else "")
    return text + (", ignoring training noise" if n == 1 else "")
