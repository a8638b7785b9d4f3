"""Turn a study directory into tables, plots and a markdown report with honest statistics.

A study directory holds ``runs/<run_id>/`` folders; a run is *complete* when it has a
``result.json`` (see :func:`load_runs` for the fields read). :func:`write_report` writes, into
``<study>/report/`` by default:

* ``report.md``: per-task tables of every metric (mean ± std and 95% CI over seeds), paired
  comparisons across seeds with a plain verdict, the plots, incomplete runs, versions/devices;
* ``runs.csv``: one row per completed run;
* ``main_table.png``, ``learning_curves.png``, ``wall_clock.png``, ``paired_comparisons.png``.

Statistics come from :mod:`postlab.stats`. Plots use matplotlib's Agg canvas directly (no
pyplot, no global backend switch). Every file is written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from postlab.errors import DataError
from postlab.stats import format_p, holm, paired_test, summarize

__all__ = ["PRIMARY_METRICS", "load_runs", "find_incomplete", "summary_table",
           "paired_comparisons", "write_report"]

SEED = "seed"
TASK = "task"
#: Metrics that matter per task; a task not listed here uses all its numeric metrics.
PRIMARY_METRICS: dict[str, tuple[str, ...]] = {
    "paraphrase": ("accuracy", "macro_f1"),
    "sonnets": ("chrf",),
}
PLOTS = {
    "main_table.png": "Primary metrics per group (bars: mean over seeds, error bars: 95% CI, "
                      "dots: individual seeds)",
    "learning_curves.png": "Training loss per run (one line per seed, coloured by group)",
    "wall_clock.png": "Wall-clock time per group (mean over seeds, stacked by stage; "
                      "error bar: 95% CI of the total)",
    "paired_comparisons.png": "Paired differences A − B over seeds with 95% CI "
                              "(red: p < alpha, grey: within noise)",
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _run_dirs(study_dir: Path) -> list[Path]:
    runs = study_dir / "runs"
    if not runs.is_dir():
        raise DataError(f"{study_dir}: no runs/ directory; is this a study directory?")
    return sorted(p for p in runs.iterdir() if p.is_dir())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _last_log(run_dir: Path) -> str:
    """'stage sft, step 40' for the last readable line of metrics.jsonl, or '' if none."""
    last = None
    for rec in _read_jsonl(run_dir / "metrics.jsonl"):
        last = rec
    if last is None:
        return ""
    parts = [f"{k} {last[k]}" for k in ("stage", "split", "step") if k in last]
    return ", ".join(parts)


def _read_jsonl(path: Path):
    """Yield the JSON objects of a .jsonl file, skipping blank or torn lines (crashed runs)."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def _config_axes(run_dir: Path) -> dict[str, Any]:
    """Axes of a run from its config.yaml (key ``axes``), else from the ``axes.json`` that
    ``postlab study run`` writes (a study run's config.yaml holds only the run config)."""
    path = run_dir / "config.yaml"
    cfg = None
    if path.is_file():
        try:
            import yaml
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # a torn or unreadable config must not break the report
            cfg = None
    axes = cfg.get("axes") if isinstance(cfg, dict) else None
    if not isinstance(axes, dict) and (run_dir / "axes.json").is_file():
        try:
            axes = json.loads((run_dir / "axes.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            axes = None
    return dict(axes) if isinstance(axes, dict) else {}


def find_incomplete(study_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Runs without a readable ``result.json``: ``[{"run_id", "axes", "last_log", "reason"}]``.

    ``axes`` come from ``config.yaml`` (key ``axes``) when present; ``last_log`` describes the
    last line of ``metrics.jsonl`` (how far the run got).
    """
    out = []
    for run_dir in _run_dirs(Path(study_dir)):
        path = run_dir / "result.json"
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = f"unreadable result.json ({exc.__class__.__name__})"
        else:
            reason = "no result.json"
        out.append({"run_id": run_dir.name, "axes": _config_axes(run_dir),
                    "last_log": _last_log(run_dir), "reason": reason})
    return out


def _result_row(result: dict[str, Any], run_id: str) -> tuple[dict, list[str], list[str], list]:
    """Flatten one result.json into a row; also return its axis, metric and stage names."""
    axes = dict(result.get("axes") or {})
    row: dict[str, Any] = {"run_id": run_id}  # the folder name, which locates metrics.jsonl
    row.update(axes)
    metrics = []
    for k, v in (result.get("metrics") or {}).items():
        if _is_number(v):
            col = f"metric.{k}" if k in axes or k in row else k
            row[col] = float(v)
            metrics.append(col)
    stages = result.get("stages") or []
    names, tokens, mems, devices = [], [], [], []
    for st in stages:
        name = str(st.get("name", f"stage{len(names)}"))
        base, i = name, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
        for k in ("wall_s", "tokens", "peak_mem_mb"):
            if _is_number(st.get(k)):
                row[f"stage.{name}.{k}"] = float(st[k])
        for k, v in (st.get("metrics") or {}).items():
            if _is_number(v):
                row[f"stage.{name}.{k}"] = float(v)
        tokens.append(st.get("tokens"))
        mems.append(st.get("peak_mem_mb"))
        if st.get("device"):
            devices.append(str(st["device"]))
    row["wall_s"] = float(result["wall_s"]) if _is_number(result.get("wall_s")) else math.nan
    tok = [t for t in tokens if _is_number(t)]
    mem = [m for m in mems if _is_number(m)]
    row["tokens"] = float(sum(tok)) if tok else math.nan
    row["peak_mem_mb"] = float(max(mem)) if mem else math.nan
    row["device"] = result.get("device") or ",".join(dict.fromkeys(devices)) or "unknown"
    for k, v in (result.get("versions") or {}).items():
        row[f"version.{k}"] = str(v)
    return row, list(axes), metrics, names


def load_runs(study_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per completed run of a study (a run folder with a readable ``result.json``).

    Columns: ``run_id``; one per axis (``task``, ``regime``, ``param``, ``seed``, ...); one per
    numeric final metric (renamed ``metric.<name>`` if it clashes with an axis); ``wall_s``,
    ``tokens`` (sum over stages), ``peak_mem_mb`` (max over stages), ``device``;
    ``stage.<stage>.<field>`` for each stage's wall_s/tokens/peak_mem_mb and dev metrics; and
    ``version.<package>``.

    ``df.attrs`` carries ``axes``, ``metrics`` and ``stages`` (names in first-seen order) and
    ``incomplete`` (see :func:`find_incomplete`). Raises :class:`DataError` when ``study_dir``
    has no ``runs/`` folder.
    """
    study_dir = Path(study_dir)
    rows, axes, metrics, stages = [], [], [], []
    for run_dir in _run_dirs(study_dir):
        path = run_dir / "result.json"
        if not path.is_file():
            continue
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # reported by find_incomplete
        if isinstance(result, dict) and not result.get("axes"):
            result["axes"] = _config_axes(run_dir)  # a study run killed before it added them
        row, ax, me, st = _result_row(result, run_dir.name)
        rows.append(row)
        for names, new in ((axes, ax), (metrics, me), (stages, st)):
            names.extend(x for x in new if x not in names)
    df = pd.DataFrame(rows)
    if not df.empty:
        by = [a for a in axes if a != SEED] + ([SEED] if SEED in axes else [])
        try:
            df = df.sort_values(by + ["run_id"], kind="stable").reset_index(drop=True)
        except TypeError:  # an axis mixing numbers and strings
            df = df.sort_values("run_id").reset_index(drop=True)
        front = ["run_id"] + axes + metrics
        df = df[front + [c for c in df.columns if c not in front]]
    df.attrs.update(axes=axes, metrics=metrics, stages=stages,
                    incomplete=find_incomplete(study_dir))
    return df


def _per_example_scores(run_dir: Path) -> dict[str, float] | None:
    """id -> task score per dev example, from the last stage's evaluation (``per_example.jsonl``)."""
    files = [p for p in run_dir.glob("*/eval/per_example.jsonl") if p.parts[-3].split("-")[0].isdigit()]
    if not files:
        return None
    last = max(files, key=lambda p: int(p.parts[-3].split("-")[0]))
    return {str(r["id"]): float(r["score"]) for r in _read_jsonl(last) if "id" in r and "score" in r}


def win_rate(scores: dict[str, float], versus: dict[str, float]) -> float:
    """Share of the examples both have on which ``scores`` beats ``versus`` (ties count half)."""
    common = [i for i in scores if i in versus]
    if not common:
        return math.nan
    return sum(1.0 if scores[i] > versus[i] else 0.5 if scores[i] == versus[i] else 0.0 for i in common) / len(common)


def add_win_rates(df: pd.DataFrame, study_dir: Path, versus: dict[str, Any]) -> pd.DataFrame:
    """Column ``win_rate_vs_<values>``: for each run, example by example on the dev set, how often its
    task score (paraphrase: correct or not; sonnets: chrF of the continuation) beats that of the run
    with the axis values ``versus`` and every other axis equal (same task, same seed): e.g. a
    distilled student against its teacher. 0.5 = as good as the reference row."""
    axes = df.attrs.get("axes", [])
    if df.empty or not all(a in axes for a in versus):
        return df
    col = "win_rate_vs_" + "_".join(str(v) for v in versus.values())
    scores = {rid: _per_example_scores(study_dir / "runs" / rid) for rid in df["run_id"]}
    others = [a for a in axes if a not in versus]
    values = []
    for _, row in df.iterrows():
        match = df
        for a, v in versus.items():
            match = match[match[a].astype(str) == str(v)]
        for a in others:
            match = match[match[a].astype(str) == str(row[a])]
        mine = scores.get(row["run_id"])
        ref = scores.get(match["run_id"].iloc[0]) if len(match) else None
        values.append(win_rate(mine, ref) if mine and ref else math.nan)
    out = df.copy()
    out[col] = values
    out.attrs = {**df.attrs, "metrics": df.attrs.get("metrics", []) + [col]}
    return out


# --------------------------------------------------------------------------------------------
# Tables and comparisons
# --------------------------------------------------------------------------------------------

def _group_axes(df: pd.DataFrame) -> list[str]:
    return [a for a in df.attrs.get("axes", []) if a != SEED]


def _sorted_values(values) -> list:
    vals = [v for v in pd.unique(pd.Series(list(values), dtype=object)) if not _missing(v)]
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _metrics_with_data(df: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if m in df.columns and df[m].notna().any()]


def _primary(task: Any, df: pd.DataFrame) -> list[str]:
    """Primary metrics of ``task`` that have data in ``df``; all its metrics for other tasks."""
    metrics = _metrics_with_data(df, df.attrs.get("metrics", []))
    wanted = [m for m in PRIMARY_METRICS.get(task, ()) if m in metrics]
    if not wanted:
        return metrics
    return wanted + [m for m in metrics if m.startswith("win_rate_vs_")]  # asked for by the study (add_win_rates)


def _tasks(df: pd.DataFrame) -> list:
    """Task values, or ``[None]`` when the study has no task axis."""
    if TASK in df.columns and TASK in df.attrs.get("axes", []):
        return _sorted_values(df[TASK])
    return [None]


def _task_rows(df: pd.DataFrame, task: Any) -> pd.DataFrame:
    return _with_attrs(df if task is None else df[df[TASK] == task], df)


def _groups(df: pd.DataFrame, by: list[str]):
    """(key tuple, sub-frame) per combination of ``by`` (NaN kept), in sorted key order."""
    if not by:
        yield (), df
        return
    groups = list(df.groupby(by, dropna=False, sort=False))
    try:
        groups.sort(key=lambda kv: tuple(kv[0]))
    except TypeError:
        groups.sort(key=lambda kv: tuple(str(x) for x in kv[0]))
    for key, sub in groups:
        yield (key if isinstance(key, tuple) else (key,)), sub


def summary_table(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (group, metric) with n, mean, std, ci_low, ci_high over seeds.

    Groups are all axes except ``seed``; metrics are those of ``df.attrs["metrics"]`` that
    have data within the group's task.
    """
    by = _group_axes(df)
    rows = []
    for task in _tasks(df):
        sub = _task_rows(df, task)
        metrics = _metrics_with_data(sub, df.attrs.get("metrics", []))
        for key, g in _groups(sub, by):
            for m in metrics:
                s = summarize(g[m].to_numpy(dtype=float), confidence=confidence)
                rows.append({**dict(zip(by, key)), "metric": m, "runs": len(g), **s})
    return pd.DataFrame(rows)


def _seed_values(g: pd.DataFrame, metric: str) -> dict:
    """seed -> metric value (mean over duplicate runs of a seed) for one side of a comparison."""
    seeds = g[SEED] if SEED in g.columns else pd.Series(0, index=g.index)
    vals = pd.Series(g[metric].to_numpy(dtype=float), index=seeds.to_numpy()).dropna()
    return vals.groupby(level=0).mean().to_dict()


def _label(key: Sequence, names: Sequence[str]) -> str:
    """'sft->dpo, lora-r8, lr=2e-05': strings as they are, numbers with their axis name."""
    parts = [f"{n}={v}" if _is_number(v) else str(v) for n, v in zip(names, key)]
    return ", ".join(parts) if parts else "all"


def paired_comparisons(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Paired-by-seed tests for every axis with 2 or more values (except seed and task).

    For axis X and each pair of its values (A, B), runs that agree on every other axis are
    paired on seed and compared on the primary metrics of their task (:data:`PRIMARY_METRICS`).
    Tasks are not compared with each other (their metrics differ). Columns: axis, a, b,
    context (other axes), task, metric, n, mean_diff (A − B), ci_low, ci_high, p_value,
    p_holm (Holm-adjusted over all rows), test, significant, verdict.
    """
    group_axes = _group_axes(df)
    rows = []
    for axis in group_axes:
        if axis == TASK:
            continue
        values = _sorted_values(df[axis])
        if len(values) < 2:
            continue
        others = [a for a in group_axes if a != axis]
        for key, ctx in _groups(df, others):
            context = dict(zip(others, key))
            task = context.get(TASK)
            rest = [k for k in context if k != TASK]
            ctx_label = _label([context[k] for k in rest], rest) if rest else ""
            metrics = _primary(task, _with_attrs(ctx, df))
            for va, vb in itertools.combinations(values, 2):
                ga, gb = ctx[ctx[axis] == va], ctx[ctx[axis] == vb]
                if ga.empty or gb.empty:
                    continue
                for m in metrics:
                    res = paired_test(_seed_values(ga, m), _seed_values(gb, m), alpha=alpha,
                                      name_a=str(va), name_b=str(vb))
                    rows.append({"axis": axis, "a": va, "b": vb, "context": ctx_label,
                                 "task": task, "metric": m, **res})
    out = pd.DataFrame(rows)
    if not out.empty:
        out.insert(out.columns.get_loc("p_value") + 1, "p_holm", holm(out["p_value"]))
    return out


def _with_attrs(sub: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``sub`` carrying ``df``'s attrs (axes, metrics, ...)."""
    sub = sub.copy()
    sub.attrs = df.attrs
    return sub


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _color(i: int) -> str:
    return f"C{i % 10}"


def _plot_main(df: pd.DataFrame) -> Figure | None:
    """Grouped bars of each task's primary metrics: x = first non-task axis, hue = the rest."""
    panels = [(task, m) for task in _tasks(df) for m in _primary(task, _task_rows(df, task))]
    if not panels:
        return None
    rest = [a for a in _group_axes(df) if a != TASK]
    x_axis, hue_axes = (rest[0], rest[1:]) if rest else (None, [])
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(5.2 * ncols, 4.0 * nrows)
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rng = np.random.default_rng(0)
    for ax, (task, metric) in zip(axs, panels):
        sub = _task_rows(df, task)
        xs = _sorted_values(sub[x_axis]) if x_axis else [None]
        hues = [k for k, _ in _groups(sub, hue_axes)]
        width = 0.8 / max(1, len(hues))
        for h, hue in enumerate(hues):
            sel = sub
            for a, v in zip(hue_axes, hue):
                sel = sel[sel[a] == v] if not _missing(v) else sel[sel[a].isna()]
            for i, xv in enumerate(xs):
                g = sel if x_axis is None else sel[sel[x_axis] == xv]
                vals = g[metric].dropna().to_numpy(dtype=float)
                if vals.size == 0:
                    continue
                s = summarize(vals)
                pos = i - 0.4 + width * (h + 0.5)
                err = None
                if not math.isnan(s["ci_low"]):
                    err = [[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]]
                ax.bar(pos, s["mean"], width * 0.9, color=_color(h), yerr=err, capsize=3,
                       label=_label(hue, hue_axes) if i == 0 or x_axis is None else None,
                       alpha=0.85)
                jitter = rng.uniform(-width * 0.2, width * 0.2, vals.size)
                ax.scatter(pos + jitter, vals, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(xs)), [str(x) if x is not None else "all" for x in xs])
        ax.set_xlabel(x_axis or "")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric}" if task is not None else metric)
        ax.grid(axis="y", alpha=0.3)
        if hue_axes:
            ax.legend(title=", ".join(hue_axes), fontsize="small")
    for ax in axs[len(panels):]:
        ax.set_visible(False)
    return fig


def _train_curves(study_dir: Path, run_id: str) -> dict[str, tuple[list, list]]:
    """stage -> (steps, losses) from the train lines of a run's metrics.jsonl."""
    curves: dict[str, tuple[list, list]] = {}
    for rec in _read_jsonl(study_dir / "runs" / run_id / "metrics.jsonl"):
        if rec.get("split", "train") != "train" or not _is_number(rec.get("loss")):
            continue
        if not _is_number(rec.get("step")):
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
    tasks = _tasks(df)
    rest = [a for a in _group_axes(df) if a != TASK]
    labels = {rid: _label(k, rest) for k, g in _groups(df, rest) for rid in g["run_id"]}
    order = dict.fromkeys(labels[r] for r in df["run_id"])
    colors = {lab: _color(i) for i, lab in enumerate(order)}
    fig = _new_figure(4.6 * len(stages) + 2.2, 3.4 * len(tasks))
    axs = fig.subplots(len(tasks), len(stages), squeeze=False)
    for r, task in enumerate(tasks):
        sub = _task_rows(df, task)
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
    handles = {}
    for ax in axs.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper",
                   title=", ".join(rest) or None, fontsize="small")
    return fig


def _plot_wall(df: pd.DataFrame) -> Figure | None:
    """Horizontal bars of mean wall-clock per group, stacked by stage when stages are known."""
    if df["wall_s"].isna().all():
        return None
    by = _group_axes(df)
    stage_cols = [f"stage.{s}.wall_s" for s in df.attrs.get("stages", [])
                  if f"stage.{s}.wall_s" in df.columns]
    groups = list(_groups(df, by))
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
        if not math.isnan(total["ci_low"]):
            ax.errorbar(total["mean"], y, xerr=[[total["mean"] - total["ci_low"]],
                                                [total["ci_high"] - total["mean"]]],
                        color="black", capsize=3)
    ax.set_yticks(range(len(groups)), [_label(k, by) for k, _ in groups], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock seconds per run (mean over seeds)")
    ax.grid(axis="x", alpha=0.3)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    order = sorted(handles, key=lambda lab: lab.startswith(("other", "total")))  # stages first
    fig.legend([handles[k] for k in order], order, loc="outside right upper", fontsize="small",
               title="stage")
    return fig


def _plot_paired(comp: pd.DataFrame) -> Figure | None:
    """Forest plot of paired differences with CIs: one panel per metric."""
    if comp.empty:
        return None
    metrics = list(dict.fromkeys(comp["metric"]))
    counts = [int((comp["metric"] == m).sum()) for m in metrics]
    fig = _new_figure(9.0, 1.0 + sum(0.32 * c + 0.8 for c in counts))
    axs = fig.subplots(len(metrics), 1, squeeze=False, height_ratios=[c + 2 for c in counts])
    for ax, m in zip(axs[:, 0], metrics):
        rows = comp[comp["metric"] == m].reset_index(drop=True)
        for y, r in rows.iterrows():
            color = "C3" if r["significant"] else "0.45"
            if not math.isnan(r["ci_low"]):
                ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - r["ci_low"]],
                                                     [r["ci_high"] - r["mean_diff"]]],
                            fmt="o", color=color, capsize=3)
            else:
                ax.plot(r["mean_diff"], y, "o", mfc="none", color=color)
        labels = [_comparison_label(r) for _, r in rows.iterrows()]
        ax.set_yticks(range(len(rows)), labels, fontsize="small")
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"difference in {m} (A − B)")
        ax.grid(axis="x", alpha=0.3)
    return fig


def _comparison_label(r: pd.Series) -> str:
    where = ", ".join(str(x) for x in (r["task"], r["context"])
                      if not _missing(x) and x != "")
    return f"{r['a']} − {r['b']}" + (f"  [{where}]" if where else "")


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def _cell(v: Any) -> str:
    return "–" if _missing(v) else str(v).replace("|", "\\|")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _md_main_tables(df: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    lines = ["## Results", "",
             "Mean ± sample std (ddof=1) and two-sided 95% Student-t CI over seeds, per group of "
             "all axes except seed. With one seed there is no spread estimate (shown as –).", ""]
    by = _group_axes(df)
    cols = [a for a in by if a != TASK]
    for task in _tasks(df):
        sub = summary if task is None else summary[summary[TASK] == task]
        if sub.empty:
            continue
        primary = _primary(task, _task_rows(df, task))
        metrics = list(dict.fromkeys(primary + list(sub["metric"])))
        if task is not None:
            lines += [f"### {TASK} = {task}", ""]
        headers = cols + ["n seeds"]
        for m in metrics:
            star = " (primary)" if m in primary and len(primary) < len(metrics) else ""
            headers += [f"{m}{star} mean ± std", f"{m} 95% CI"]
        rows = []
        for key, g in _groups(sub, cols):
            row = list(key) + [int(g["runs"].iloc[0])]
            for m in metrics:
                s = g[g["metric"] == m]
                if s.empty:
                    row += ["–", "–"]
                    continue
                s = s.iloc[0]
                note = f" (n={s['n']})" if s["n"] != s["runs"] else ""
                row += [f"{_num(s['mean'])} ± {_num(s['std'])}{note}",
                        f"[{_num(s['ci_low'])}, {_num(s['ci_high'])}]"
                        if not math.isnan(s["ci_low"]) else "–"]
            rows.append(row)
        lines += _md_table(headers, rows) + [""]
    return lines


def _md_comparisons(comp: pd.DataFrame, alpha: float) -> list[str]:
    lines = ["## Paired comparisons", ""]
    if comp.empty:
        return lines + ["No axis (other than seed and task) has two or more values with "
                        "matching runs, so there is nothing to compare.", ""]
    tested = comp["p_value"].notna()
    n_sig = int(comp["significant"].sum())
    n_holm = int((comp["p_holm"] < alpha).sum())
    lines += [
        f"Differences are A − B, paired on seed between runs that agree on every other axis, on "
        f"each task's primary metrics; two-sided paired t-test at alpha = {alpha}. "
        f"Verdicts use the unadjusted p-value. This report makes {int(tested.sum())} tests: "
        f"{n_sig} significant unadjusted, {n_holm} after Holm correction over all of them "
        f"(column p (Holm)). \"within noise\" means the data do not show a difference, not that "
        f"there is none.", ""]
    has_task = comp["task"].notna().any()
    for axis, g in comp.groupby("axis", sort=False):
        lines += [f"### {axis}", ""]
        rows = []
        for _, r in g.iterrows():
            verdict = f"**{r['verdict']}**" if r["significant"] else r["verdict"]
            ci = (f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
                  if not math.isnan(r["ci_low"]) else "–")
            rows.append([r["a"], r["b"]] + ([r["task"]] if has_task else [])
                        + [r["context"] or "–", r["metric"], r["n"], _num(r["mean_diff"]), ci,
                           _p_cell(r["p_value"]), _p_cell(r["p_holm"]), r["test"], verdict])
        headers = (["A", "B"] + (["task"] if has_task else [])
                   + ["other axes", "metric", "n seeds", "mean diff (A − B)", "95% CI", "p",
                      "p (Holm)", "test", "verdict"])
        lines += _md_table(headers, rows)
        lines.append("")
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
    rows = [["device", _value_counts(df["device"])]]
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


def _study_file(study_dir: Path) -> dict:
    """The study's copy of its study file, or {} if there is none or it does not parse."""
    path = study_dir / "study.yaml"
    try:
        import yaml
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception:
        cfg = None
    return cfg if isinstance(cfg, dict) else {}


def _study_name(study_dir: Path) -> str:
    name = _study_file(study_dir).get("name")
    return str(name) if name else study_dir.resolve().name


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 alpha: float = 0.05) -> Path:
    """Write ``report.md``, ``runs.csv`` and the PNG plots for a study; return report.md's path.

    ``out_dir`` defaults to ``<study_dir>/report``. Plots that have no data (e.g. no training
    logs) are skipped and the report says so.
    """
    study_dir = Path(study_dir)
    out = Path(out_dir) if out_dir is not None else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = load_runs(study_dir)
    versus = _study_file(study_dir).get("win_rate_vs")
    if isinstance(versus, dict) and versus:
        df = add_win_rates(df, study_dir, versus)
    incomplete = df.attrs["incomplete"]
    _atomic_write(out / "runs.csv", df.to_csv(index=False))

    lines = [f"# Study report: {_study_name(study_dir)}", "",
             f"{len(df)} completed run(s), {len(incomplete)} incomplete. "
             f"Axes: {', '.join(df.attrs['axes']) or 'none'}. "
             "Primary metrics: " + "; ".join(f"{t} → {', '.join(m)}"
                                            for t, m in PRIMARY_METRICS.items())
             + "; other tasks: all numeric metrics"
             + "".join(f"; {m} (every task)" for m in df.attrs["metrics"] if m.startswith("win_rate_vs_"))
             + ". All runs: [runs.csv](runs.csv).", ""]
    if df.empty:
        lines += ["No completed runs yet.", ""]
        comp = pd.DataFrame()
    else:
        lines += _md_main_tables(df, summary_table(df))
        comp = paired_comparisons(df, alpha=alpha)
        lines += _md_comparisons(comp, alpha)
        lines += ["## Plots", ""]
        figures = {"main_table.png": lambda: _plot_main(df),
                   "learning_curves.png": lambda: _plot_curves(df, study_dir),
                   "wall_clock.png": lambda: _plot_wall(df),
                   "paired_comparisons.png": lambda: _plot_paired(comp)}
        for name, make in figures.items():
            fig = make()
            if fig is None:
                lines += [f"- {PLOTS[name]}: no data.", ""]
                continue
            _atomic_write(out / name, _png_bytes(fig))
            lines += [f"**{PLOTS[name]}**", "", f"![{name[:-4]}]({name})", ""]
    lines += _md_incomplete(incomplete)
    lines += _md_environment(df)
    report = out / "report.md"
    _atomic_write(report, "\n".join(lines) + "\n")
    return report
