"""The report's figures. Matplotlib's Agg canvas directly (no pyplot, no global backend switch)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import results as R
from .comparisons import higher_is_better, primary_metrics
from .stats import format_p, summarize

PLOTS = {
    "primary_metrics.png": "Compared metrics per group: dots are seeds, the bar the mean over seeds with its 95% CI; "
                           "dashed line: zero-shot (the runs' starting model), dotted: always the majority class",
    "paired_comparisons.png": "Paired differences A − B with Holm-adjusted CIs (seed x example tests); red: significant "
                              "after Holm's correction, grey: not (the CI then shows which differences the data allow)",
    "dev_curves.png": "Dev metrics over training (steps counted across stages; thin lines: seeds, thick: their "
                      "mean; dotted verticals: where a stage hands off to the next)",
    "learning_curves.png": "Training loss per run (one line per seed, coloured by group)",
    "wall_clock.png": "Wall-clock time per group (bars: mean over seeds, stacked by stage; dots: each run's total)",
}


def figures(df: pd.DataFrame, study_dir: Path, comp: pd.DataFrame) -> dict:
    """file name -> a function drawing it (None when there is nothing to draw)."""
    return {"primary_metrics.png": lambda: _plot_main(df),
            "paired_comparisons.png": lambda: _plot_paired(comp),
            "dev_curves.png": lambda: _plot_dev_curves(df, study_dir),
            "learning_curves.png": lambda: _plot_curves(df, study_dir),
            "wall_clock.png": lambda: _plot_wall(df)}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: float | str = "figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _color(i: int) -> str:
    return f"C{i % 10}"


def _plot_main(df: pd.DataFrame) -> Figure | None:
    """One panel per (task, compared metric): a row per group, the seeds as dots, the mean with its
    95% CI, on an axis fitted to the data and the baselines (zero-shot, majority class)."""
    panels = [(task, m) for task in R.tasks_of(df) for m in primary_metrics(task, R.task_rows(df, task))]
    if not panels:
        return None
    rest = [a for a in R.group_axes(df) if a != R.TASK]
    n_groups = max(len(list(R.groups(R.task_rows(df, t), rest))) for t, _ in panels)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(5.6 * ncols, (1.3 + 0.45 * n_groups) * nrows + 0.6)
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (task, metric) in zip(axs, panels):
        sub = R.task_rows(df, task)
        groups = list(R.groups(sub, rest))
        for y, (key, g) in enumerate(groups):
            vals = g[metric].dropna().to_numpy(dtype=float)
            if vals.size == 0:
                continue
            s = summarize(vals)
            ax.scatter(vals, np.full(vals.size, y) + np.linspace(-0.12, 0.12, vals.size), s=16, color=_color(y),
                       alpha=0.7, zorder=3)
            if not math.isnan(s["ci_low"]):
                ax.errorbar(s["mean"], y, xerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]], fmt="none",
                            ecolor="black", capsize=4, lw=1.5, zorder=4)
            ax.plot([s["mean"]], [y], marker="|", ms=16, mew=2.5, color="black", zorder=5)
        for col, style, name in ((f"{R.ZERO_SHOT}.{metric}", "--", "zero-shot"), (f"majority_{metric}", ":", "majority class")):
            if col in sub.columns and sub[col].notna().any():
                value = float(sub[col].mean())
                ax.axvline(value, color="0.35", ls=style, lw=1.2)
                ax.annotate(f"{name} {value:.4g}", (value, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                            va="top", ha="right", fontsize="x-small", color="0.3")
        ax.set_yticks(range(len(groups)), [R.label(k, rest) for k, _ in groups], fontsize="small")
        ax.set_ylim(len(groups) - 0.5, -0.5)
        ax.margins(x=0.08)
        ax.set_xlabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
        ax.set_title(f"{task}: {metric}" if task is not None else metric, fontsize="medium")
        ax.grid(axis="x", alpha=0.3)
    for ax in axs[len(panels):]:
        ax.set_visible(False)
    return fig


def _train_curves(study_dir: Path, run_id: str) -> dict[str, tuple[list, list]]:
    """stage -> (steps, losses) from the train lines of a run's metrics.jsonl."""
    curves: dict[str, tuple[list, list]] = {}
    for rec in R.read_jsonl(study_dir / "runs" / run_id / "metrics.jsonl"):
        if rec.get("split", "train") != "train" or not R.is_number(rec.get("loss")):
            continue
        if not R.is_number(rec.get("step")):
            continue
        steps, losses = curves.setdefault(str(rec.get("stage", "train")), ([], []))
        steps.append(rec["step"])
        losses.append(rec["loss"])
    return curves


def _plot_curves(df: pd.DataFrame, study_dir: Path) -> Figure | None:
    """Train loss vs step: one row per task, one column per stage (losses of different
    objectives are not on one scale), one line per run coloured by group."""
    curves = {rid: _train_curves(study_dir, rid) for rid in df["run_id"]}
    stages = list(dict.fromkeys(s for c in curves.values() for s in c))
    if not stages:
        return None
    tasks = R.tasks_of(df)
    rest = [a for a in R.group_axes(df) if a != R.TASK]
    labels = {rid: R.label(k, rest) for k, g in R.groups(df, rest) for rid in g["run_id"]}
    order = dict.fromkeys(labels[r] for r in df["run_id"])
    colors = {lab: _color(i) for i, lab in enumerate(order)}
    fig = _new_figure(4.6 * len(stages) + 2.2, 3.4 * len(tasks))
    axs = fig.subplots(len(tasks), len(stages), squeeze=False)
    for r, task in enumerate(tasks):
        sub = R.task_rows(df, task)
        for c, stage in enumerate(stages):
            ax = axs[r, c]
            for rid in sub["run_id"]:
                if stage in curves[rid]:
                    steps, losses = curves[rid][stage]
                    ax.plot(steps, losses, color=colors[labels[rid]], alpha=0.7, lw=1.5,
                            label=labels[rid])
            ax.set_title(f"{task} / {stage}" if task is not None else stage)
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
            ax.grid(alpha=0.3)
    _figure_legend(fig, axs.ravel(), rest)
    return fig


def _plot_dev_curves(df: pd.DataFrame, study_dir: Path) -> Figure | None:
    """One panel per (task, compared metric): the metric at every dev evaluation of each run, across
    its stages, per group; drawn only where some run has more than its start and end points."""
    rest = [a for a in R.group_axes(df) if a != R.TASK]
    panels = []
    for task in R.tasks_of(df):
        sub = R.task_rows(df, task)
        for m in primary_metrics(task, sub):
            curves = {rid: R.dev_curve(study_dir / "runs" / rid, m) for rid in sub["run_id"]}
            if any(len(c[0]) > 2 for c in curves.values()):
                panels.append((task, m, sub, curves))
    if not panels:
        return None
    order = list(dict.fromkeys(R.label(k, rest) for k, _ in R.groups(df, rest)))
    colors = {lab: _color(i) for i, lab in enumerate(order)}
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(5.2 * ncols + 2.4, 3.6 * nrows)
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (task, m, sub, curves) in zip(axs, panels):
        _dev_panel(ax, task, m, sub, curves, rest, colors)
    for ax in axs[len(panels):]:
        ax.set_visible(False)
    _figure_legend(fig, axs, rest)
    return fig


def _dev_panel(ax, task, m: str, sub: pd.DataFrame, curves: dict, rest: list[str], colors: dict) -> None:
    """One (task, metric) panel of the dev curves: each run thin, each group's mean thick."""
    subsets = set()
    for key, g in R.groups(sub, rest):
        lab = R.label(key, rest)
        runs = [curves[rid] for rid in g["run_id"] if curves[rid][0]]
        for xs, ys, bounds, n in runs:
            ax.plot(xs, ys, color=colors[lab], alpha=0.25, lw=0.8)
            subsets.add(n)
            for b in bounds:
                ax.axvline(b, color="grey", ls=":", lw=0.8)
        common = sorted(set.intersection(*(set(xs) for xs, *_ in runs))) if runs else []
        if common:
            mean = [float(np.mean([ys[xs.index(x)] for xs, ys, *_ in runs])) for x in common]
            ax.plot(common, mean, color=colors[lab], lw=2, marker="o", ms=3, label=lab)
    n = [x for x in subsets if x]
    where = f" (first {min(n)} dev examples)" if n else ""
    ax.set_title(f"{task} / {m}{where}" if task is not None else f"{m}{where}", fontsize="medium")
    ax.set_xlabel("training step (all stages)")
    ax.set_ylabel(m)
    ax.grid(alpha=0.3)


def _figure_legend(fig: Figure, axs, rest: list[str]) -> None:
    """One legend for the figure: each label once, from whichever panel drew it."""
    handles = {}
    for ax in axs:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", title=", ".join(rest) or None,
                   fontsize="small")


def _plot_wall(df: pd.DataFrame) -> Figure | None:
    """Horizontal bars of mean wall-clock per group, stacked by stage when stages are known."""
    if df["wall_s"].isna().all():
        return None
    by = R.group_axes(df)
    stage_cols = [f"stage.{s}.wall_s" for s in df.attrs.get("stages", [])
                  if f"stage.{s}.wall_s" in df.columns]
    groups = list(R.groups(df, by))
    fig = _new_figure(10.0, 1.2 + 0.38 * len(groups))
    ax = fig.subplots()
    seen = set()
    for y, (key, g) in enumerate(groups):
        left = 0.0
        for i, col in enumerate(stage_cols):
            w = float(g[col].fillna(0).mean())
            if w > 0:
                name = col.split(".", 1)[1].rsplit(".", 1)[0]
                ax.barh(y, w, left=left, color=_color(i),
                        label=name if name not in seen else None)
                seen.add(name)
                left += w
        total = summarize(g["wall_s"].to_numpy(dtype=float))
        other = total["mean"] - left
        if not stage_cols or other > 0.01 * total["mean"]:
            name = "other (eval, loading)" if stage_cols else "total"
            ax.barh(y, other, left=left, color="0.7", label=name if name not in seen else None)
            seen.add(name)
        # each run's total as a dot: wall times are skewed (a run that shared the cores), so no t-interval
        runs = g["wall_s"].dropna().to_numpy(dtype=float)
        ax.scatter(runs, np.full(runs.size, y), s=14, color="black", zorder=3,
                   label="one run" if "one run" not in seen else None)
        seen.add("one run")
    ax.set_yticks(range(len(groups)), [R.label(k, by) for k, _ in groups], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock seconds per run (bars: mean over seeds, by stage; dots: each run)")
    ax.grid(axis="x", alpha=0.3)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    order = sorted(handles, key=lambda lab: lab.startswith(("other", "total")))  # stages first
    fig.legend([handles[k] for k in order], order, loc="outside right upper", fontsize="small",
               title="stage")
    return fig


def _plot_paired(comp: pd.DataFrame) -> Figure | None:
    """Forest plot of paired differences A − B with their Holm-adjusted CIs: one panel per metric."""
    if comp.empty:
        return None
    metrics = list(dict.fromkeys(comp["metric"]))
    counts = [int((comp["metric"] == m).sum()) for m in metrics]
    fig = _new_figure(9.0, 1.0 + sum(0.34 * c + 0.9 for c in counts))
    axs = fig.subplots(len(metrics), 1, squeeze=False, height_ratios=[c + 2 for c in counts])
    for ax, m in zip(axs[:, 0], metrics):
        rows = comp[comp["metric"] == m].reset_index(drop=True)
        for y, r in rows.iterrows():
            color = "C3" if r["significant_holm"] else "0.45"
            lo, hi = r["ci_low_holm"], r["ci_high_holm"]
            if math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - lo], [hi - r["mean_diff"]]],
                            fmt="o", color=color, capsize=3)
            else:
                ax.plot(r["mean_diff"], y, "o", mfc="none", color=color)
            p = r["p_holm"]
            ax.annotate(f"p(Holm) {format_p(p)[2:] if format_p(p).startswith('p=') else format_p(p)[1:]}", (1.0, y),
                        xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize="x-small", color=color)
        ax.set_yticks(range(len(rows)), [_comparison_label(r) for _, r in rows.iterrows()], fontsize="small")
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.axvline(0, color="black", lw=0.8)
        better = "higher" if bool(rows["higher_is_better"].iloc[0]) else "lower"
        ax.set_xlabel(f"difference in {m} (A − B; {better} is better)")
        ax.grid(axis="x", alpha=0.3)
    return fig


def _comparison_label(r: pd.Series) -> str:
    where = ", ".join(str(x) for x in (r["task"], r["context"])
                      if not R.missing(x) and x != "")
    return f"{r['a']} − {r['b']}" + (f"  [{where}]" if where else "")

