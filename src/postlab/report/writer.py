"""Turn a study directory into a markdown report with honest statistics, tables and plots.

:func:`write_report` writes, into ``<study>/report/`` by default:

* ``report.md``: the finding in plain sentences first; per-task tables of the compared metrics
  (mean ± std and 95% CI over seeds, zero-shot and majority baselines); paired comparisons between
  arms (seed x example tests, Holm-corrected, equivalence bounds where nothing is found); trained
  arms against their zero-shot models; all metrics; plots; incomplete runs; versions and devices;
  with the study's ``compare_stages``, the same comparisons at the end of each named stage (:mod:`.stages`);
* ``comparisons.csv``, ``baselines.csv``, ``stage_comparisons.csv`` (with ``compare_stages``): every test
  with its statistics; ``runs.csv``: one row per run;
* the plots of :data:`postlab.report.plots.PLOTS`.

Reading runs is :mod:`.results`, the tests :mod:`.comparisons` (statistics in :mod:`.paired` and
:mod:`.stats`), figures :mod:`.plots`. Every file is written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoint import atomic_write_bytes, atomic_write_text
from . import plots
from . import results as R
from .comparisons import (
    baseline_comparisons,
    evaluations,
    findings,
    paired_comparisons,
    primary_metrics,
    task_primary_metrics,
)
from .results import add_win_rates, load_runs
from .stages import stage_comparisons
from .stats import format_p, summarize


def summary_table(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (group, metric) with n, mean, std, ci_low, ci_high over seeds.

    Groups are all axes except ``seed``; metrics are those of ``df.attrs["metrics"]`` that
    have data within the group's task.
    """
    by = [a for a in R.group_axes(df) if a != R.TASK]
    rows = []
    for task in R.tasks_of(df):
        sub = R.task_rows(df, task)
        metrics = R.metrics_with_data(sub, df.attrs.get("metrics", []))
        for key, g in R.groups(sub, by):
            for m in metrics:
                s = summarize(g[m].to_numpy(dtype=float), confidence=confidence)
                zero = g[f"{R.ZERO_SHOT}.{m}"].mean() if f"{R.ZERO_SHOT}.{m}" in g.columns else math.nan
                rows.append({R.TASK: task, **dict(zip(by, key)), "metric": m, "runs": len(g), **s, "zero_shot": float(zero)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def _cell(v: Any) -> str:
    return "–" if R.missing(v) else str(v).replace("|", "\\|")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _p_cell(p: float) -> str:
    """'0.012', '<0.001' or 'n/a' for a table cell."""
    text = format_p(p)
    return text[2:] if text.startswith("p=") else text[1:]


def _md_incomplete(incomplete: list[dict]) -> list[str]:
    lines = ["## Incomplete runs", ""]
    if not incomplete:
        return lines + ["None: every run folder has a result.json.", ""]
    lines += [f"{len(incomplete)} run(s) have no usable result.json and are left out of all "
              "tables, tests and plots above.", ""]
    rows = [[r["run_id"], ", ".join(f"{k}={v}" for k, v in r["axes"].items()) or "–",
             r["last_log"] or "no metrics logged", r["reason"]] for r in incomplete]
    return lines + _md_table(["run", "axes (config.yaml)", "last log line", "reason"], rows) + [""]


def _md_environment(df: pd.DataFrame) -> list[str]:
    lines = ["## Versions and devices", ""]
    if df.empty:
        return lines + ["No completed runs.", ""]
    rows = [[k, _value_counts(df[k])] for k in ("device", "precision", "cpu") if k in df.columns]
    for col in [c for c in df.columns if c.startswith("version.")]:
        rows.append([col.split(".", 1)[1], _value_counts(df[col])])
    lines += _md_table(["", "value (runs)"], rows)
    mixed = [r[0] for r in rows if ";" in r[1]]
    if mixed:
        lines += ["", f"Warning: runs differ in {', '.join(mixed)}; comparisons across them may "
                      "mix environment effects with the effects studied."]
    return lines + [""]


def _value_counts(col: pd.Series) -> str:
    counts = col.fillna("unknown").astype(str).value_counts()
    return "; ".join(f"{v} ({n})" for v, n in counts.items())


def _study_name(study_dir: Path) -> str:
    name = R.study_file(study_dir).get("name")
    return str(name) if name else study_dir.resolve().name



def _md_findings(comp: pd.DataFrame, alpha: float, stage_comp: pd.DataFrame | None = None) -> list[str]:
    lines = ["## Finding", ""]
    sentences = findings(comp, alpha) if not comp.empty else []
    if not sentences:
        lines += ["No comparison between arms could be tested (see Paired comparisons).", ""]
    elif len(sentences) == 1:
        lines += sentences + [""]
    else:
        lines += _bullets(sentences, "Paired comparisons")
    for stage, g in ([] if stage_comp is None or stage_comp.empty else stage_comp.groupby("stage", sort=False)):
        said = findings(g.reset_index(drop=True), alpha)
        if said:
            lines += [f"At the end of stage {stage} (a Holm family of its own):", ""] + _bullets(said, STAGES_TITLE)
    return lines


def _bullets(sentences: list[str], section: str) -> list[str]:
    more = [f"- … and {len(sentences) - 5} more (see {section})."] if len(sentences) > 5 else []
    return [f"- {x}" for x in sentences[:5]] + more + [""]


def _md_main_tables(df: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    lines = ["## Results", "",
             "Mean ± sample std over seeds and the two-sided 95% Student-t CI of the mean, per group of "
             "all axes except seed; zero-shot: the runs' starting model (step 0 of the first stage). "
             "With one seed there is no spread estimate (–).", ""]
    cols = [a for a in R.group_axes(df) if a != R.TASK]
    for task in R.tasks_of(df):
        sub = summary if task is None else summary[summary[R.TASK] == task]
        if sub.empty:
            continue
        metrics = primary_metrics(task, R.task_rows(df, task))
        if task is not None:
            lines += [f"### {R.TASK} = {task}", ""]
        headers = cols + ["n seeds"]
        for m in metrics:
            headers += [f"{m} mean ± std", f"{m} 95% CI", f"{m} zero-shot"]
        rows = []
        for key, g in R.groups(sub, cols):
            row = list(key) + [int(g["runs"].iloc[0])]
            for m in metrics:
                s = g[g["metric"] == m]
                if s.empty:
                    row += ["–", "–", "–"]
                    continue
                s = s.iloc[0]
                row += [f"{_num(s['mean'])} ± {_num(s['std'])}",
                        f"[{_num(s['ci_low'])}, {_num(s['ci_high'])}]" if not math.isnan(s["ci_low"]) else "–",
                        _num(s["zero_shot"])]
            rows.append(row)
        lines += _md_table(headers, rows) + [""]
        majority = [f"{m} {_num(sub[sub['metric'] == f'majority_{m}']['mean'].mean())}"
                    for m in metrics if (sub["metric"] == f"majority_{m}").any()]
        if majority:
            lines += ["Always answering the majority class: " + ", ".join(majority) + ".", ""]
    return lines


def _md_all_metrics(df: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    lines = ["## All metrics", "", "Mean ± std over seeds of every metric the evaluations report.", ""]
    cols = [a for a in R.group_axes(df) if a != R.TASK]
    for task in R.tasks_of(df):
        sub = summary if task is None else summary[summary[R.TASK] == task]
        if sub.empty:
            continue
        if task is not None:
            lines += [f"### {R.TASK} = {task}", ""]
        metrics = list(dict.fromkeys(sub["metric"]))
        rows = [list(key) + [f"{_num(g[g['metric'] == m]['mean'].iloc[0])} ± {_num(g[g['metric'] == m]['std'].iloc[0])}"
                             if (g["metric"] == m).any() else "–" for m in metrics]
                for key, g in R.groups(sub, cols)]
        lines += _md_table(cols + metrics, rows) + [""]
    return lines


def _ci(r: pd.Series) -> str:
    """The Holm-adjusted interval: the one that agrees with the verdict beside it."""
    return f"[{_num(r['ci_low_holm'])}, {_num(r['ci_high_holm'])}]" if not math.isnan(r["ci_low_holm"]) else "–"


HOLM_WORDS = ("Verdicts use the Holm-adjusted p, and the interval beside each is adjusted the same way: it is the "
              "interval at the level Holm held that comparison to (Bonferroni's alpha / m for the smallest p, up to "
              "alpha for the last), so it excludes 0 exactly when p (Holm) < alpha; the unadjusted 95% intervals are "
              "in comparisons.csv. Where nothing is found, \"no difference larger than X\" is the equivalence bound at "
              "the same level: two one-sided tests rule out any |A − B| above X.")


def _md_comparisons(comp: pd.DataFrame, alpha: float) -> list[str]:
    lines = ["## Paired comparisons", ""]
    if comp.empty:
        return lines + ["No axis (other than seed and task) has two or more values with "
                        "matching runs, so there is nothing to compare.", ""]
    tested = int(comp["p_value"].notna().sum())
    lines += [
        f"A − B between runs that agree on every other axis, paired on seed and on dev example: the seed x "
        f"example test combines training noise (seeds) and the sampling of dev examples "
        f"(postlab's docs/statistics.md); "
        f"runs without per-example statistics fall back to a paired t-test over seeds. {tested} tests at "
        f"alpha = {alpha}, Holm-corrected over all of them: {int(comp['significant_holm'].sum())} significant "
        f"({int(comp['significant'].sum())} before correction). {HOLM_WORDS}", ""]
    return lines + _md_comparison_tables(comp, alpha, "###")


STAGES_TITLE = "Comparisons at the end of a stage"


def _md_stage_comparisons(stage_comp: pd.DataFrame, stages: list[str], alpha: float) -> list[str]:
    """The study's `compare_stages`: per stage, the paired comparisons of its end-of-stage evaluations."""
    lines = [f"## {STAGES_TITLE}", "",
             "The same comparisons and tests as above, on each named stage's end-of-stage evaluation (its "
             "`eval/` and, where the stage reads its model against its reference, `against-reference/`), over "
             "the runs that have that stage. Holm families: the comparisons at the end of each stage are a family "
             "of their own, apart from the final ones (Paired comparisons) and from the zero-shot ones.", ""]
    for stage in stages:
        g = stage_comp[stage_comp["stage"] == stage] if not stage_comp.empty else stage_comp
        lines += [f"### At the end of stage {stage}", ""]
        if g.empty:
            lines += ["No axis (other than seed and task) has two or more values among the runs with this stage.", ""]
            continue
        lines += [f"{int(g['p_value'].notna().sum())} tests at alpha = {alpha}, Holm-corrected over this stage's: "
                  f"{int(g['significant_holm'].sum())} significant ({int(g['significant'].sum())} before correction).",
                  ""]
        lines += _md_comparison_tables(g, alpha, "####")
    return lines


def _md_comparison_tables(comp: pd.DataFrame, alpha: float, heading: str) -> list[str]:
    """One table per axis of a family of comparisons."""
    lines = []
    has_task = comp["task"].notna().any()
    for axis, g in comp.groupby("axis", sort=False):
        lines += [f"{heading} {axis}", ""]
        rows = []
        for _, r in g.iterrows():
            verdict = _verdict(r, alpha)
            rows.append([r["a"], r["b"]] + ([r["task"]] if has_task else [])
                        + [r["context"] or "–", r["metric"], _size(r), _num(r["mean_diff"]), _ci(r),
                           _p_cell(r["p_value"]), _p_cell(r["p_holm"]), r["test"], verdict])
        headers = (["A", "B"] + (["task"] if has_task else [])
                   + ["other axes", "metric", "seeds × examples", "A − B", "CI (Holm)", "p", "p (Holm)", "test",
                      "verdict"])
        lines += _md_table(headers, rows) + [""]
    return lines


def with_effects(comp: pd.DataFrame, effects) -> pd.DataFrame:
    """Each comparison with the study's `effects` for its metric (the smallest difference worth finding;
    NaN where none is named): a comparison whose data cannot rule out that effect says it cannot tell."""
    if comp.empty or not isinstance(effects, dict):
        return comp
    comp = comp.copy()
    comp["effect"] = comp["metric"].map(lambda m: float(effects[m]) if m in effects else math.nan)
    return comp


def _verdict(r: pd.Series, alpha: float) -> str:
    if math.isnan(r["p_value"]):
        return str(r["verdict"])
    if r["significant_holm"]:
        return f"**{r['a']} {'>' if r['mean_diff'] > 0 else '<'} {r['b']}**"
    bound = r.get("equivalence_bound_holm", math.nan)
    if not (isinstance(bound, float) and math.isfinite(bound)):
        return "within noise"
    effect = r.get("effect", math.nan)
    if isinstance(effect, float) and math.isfinite(effect) and bound > effect:  # the plan called it underpowered
        return f"cannot tell at this scale: rules out only differences larger than {bound:.3g} (effect worth finding: {effect:g})"
    return f"no difference larger than {bound:.3g}"


def _size(r: pd.Series) -> str:
    return f"{int(r['n'])} × {int(r['n_examples'])}" if r.get("n_examples") else f"{int(r['n'])} seeds"


def _md_baselines(base: pd.DataFrame, alpha: float) -> list[str]:
    lines = ["## Against the zero-shot model", ""]
    if base.empty:
        return lines + ["No run recorded its starting model's evaluation (stage option eval_at_start).", ""]
    lines += [f"Each group against the model it started from (zero-shot), paired on seed and dev example, same "
              f"tests; Holm over these {len(base)} rows (a family of its own), intervals adjusted alike.", ""]
    has_task = base["task"].notna().any()
    rows = [[r["group"]] + ([r["task"]] if has_task else []) + [r["metric"], _num(r["zero_shot"]), _num(r["mean_diff"]),
            _ci(r), _p_cell(r["p_holm"]), _verdict(r, alpha)]
            for _, r in base.iterrows()]
    headers = ["group"] + (["task"] if has_task else []) + ["metric", "zero-shot", "trained − zero-shot",
                                                               "CI (Holm)", "p (Holm)", "verdict"]
    return lines + _md_table(headers, rows) + [""]

# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 alpha: float = 0.05) -> Path:
    """Write ``report.md``, ``runs.csv``, ``comparisons.csv``, ``baselines.csv`` and the plots for a
    study; return report.md's path. ``out_dir`` defaults to ``<study_dir>/report``. Plots that have
    no data (e.g. no training logs) are skipped and the report says so."""
    study_dir = Path(study_dir)
    out = Path(out_dir) if out_dir is not None else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = load_runs(study_dir)
    study = R.study_file(study_dir)
    versus = study.get("win_rate_vs")
    if isinstance(versus, dict) and versus:
        df = add_win_rates(df, study_dir, versus)
    if isinstance(study.get("metrics"), list):
        df.attrs["compare_metrics"] = [str(m) for m in study["metrics"]]
    stages = [str(x) for x in study["compare_stages"]] if isinstance(study.get("compare_stages"), list) else []
    incomplete = df.attrs["incomplete"]
    atomic_write_text(out / "runs.csv", df.to_csv(index=False))

    chosen = df.attrs.get("compare_metrics")
    lines = [f"# Study report: {_study_name(study_dir)}", "",
             f"{len(df)} completed run(s), {len(incomplete)} incomplete. Axes: {', '.join(df.attrs['axes']) or 'none'}. "
             + (f"Compared metrics (the study's choice): {', '.join(chosen)}" if chosen else
                "Compared metrics (each task's primary ones): "
                + ("; ".join(f"{t} → {', '.join(task_primary_metrics(t)) or 'all numeric metrics'}"
                             for t in R.tasks_of(df) if t is not None) or "all numeric metrics"))
             + "".join(f"; {m} (every task)" for m in df.attrs["metrics"] if m.startswith("win_rate_vs_"))
             + ". All runs: [runs.csv](runs.csv).", ""]
    if incomplete:
        planned = len(df) + len(incomplete)
        lines += [f"**Partial report: {len(df)} of {planned} planned runs are complete**; the other "
                  f"{len(incomplete)} (listed under Incomplete runs) are left out of every table, test and plot, "
                  f"so what follows may change when they are done.", ""]
    if df.empty:
        lines += ["No completed runs yet.", ""]
    else:
        evals = evaluations(df, study_dir)
        comp = paired_comparisons(df, alpha=alpha, evals=evals)
        base = baseline_comparisons(df, study_dir, alpha=alpha, evals=evals)
        stage_comp = stage_comparisons(df, study_dir, stages, alpha=alpha)
        for name, table in (("comparisons.csv", comp), ("baselines.csv", base)) + (
                (("stage_comparisons.csv", stage_comp),) if stages else ()):
            atomic_write_text(out / name, table.to_csv(index=False))
        summary = summary_table(df)
        comp = with_effects(comp, study.get("effects"))
        stage_comp = with_effects(stage_comp, study.get("effects"))
        lines += _md_findings(comp, alpha, stage_comp)
        lines += _md_main_tables(df, summary)
        lines += _md_comparisons(comp, alpha)
        lines += _md_stage_comparisons(stage_comp, stages, alpha) if stages else []
        lines += _md_baselines(base, alpha)
        lines += ["## Plots", ""]
        for name, make in plots.figures(df, study_dir, comp).items():
            fig = make()
            if fig is None:
                lines += [f"- {plots.PLOTS[name]}: no data.", ""]
                continue
            atomic_write_bytes(out / name, plots.png_bytes(fig))
            lines += [f"**{plots.PLOTS[name]}**", "", f"![{name[:-4]}]({name})", ""]
        lines += _md_all_metrics(df, summary)
    lines += _md_incomplete(incomplete)
    lines += _md_environment(df)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def summary_text(report: Path) -> str:
    """What a person reads at a glance in the terminal: the report's finding and its main tables."""
    lines = report.read_text(encoding="utf-8").splitlines()

    def section(title: str) -> list[str]:
        if f"## {title}" not in lines:
            return []
        i = lines.index(f"## {title}") + 1
        j = next((k for k in range(i, len(lines)) if lines[k].startswith("## ")), len(lines))
        return lines[i:j]

    partial = [x for x in lines if x.startswith("**Partial report")]
    finding = partial + [x for x in section("Finding") if x.strip()]
    tables = [x for x in section("Results") if x.startswith(("|", "###", "Always"))]
    left_out = [x for x in section("Incomplete runs") if x.strip()]
    left_out = [] if not left_out or left_out[0].startswith("None") else ["", "Left out (no usable result):"] + [
        f"  {x}" for x in left_out if x.startswith("|") and not x.startswith(("| run", "|---"))]
    return "\n".join(["Finding:"] + [f"  {x}" for x in finding] + ["", "Results (mean ± std over seeds):"] + tables
                     + left_out)
