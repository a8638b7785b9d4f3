"""Reading study and run directories: the one reader of ``result.json``, ``metrics.jsonl``, the
per-example evaluation files and the axes of each run, used by the report, the plots and the demo.

A study directory holds ``runs/<run_id>/`` folders; a run is *complete* when it has a
``result.json`` (see :func:`load_runs` for the fields read). Also the small helpers that slice the
resulting table by task and by group (every axis but seed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from ..metrics import AGAINST_REFERENCE, PerExample, read_per_example
from ..runlog import read_jsonl

SEED = "seed"
TASK = "task"
ZERO_SHOT = "zero_shot"  # columns zero_shot.<metric>: the run's starting model (step 0 of its first stage)


def win_rate_column(versus: dict[str, Any]) -> str:
    """The column add_win_rates adds for a study's ``win_rate_vs`` (a metric every task reports)."""
    return "win_rate_vs_" + "_".join(str(v) for v in versus.values())


def run_dirs(study_dir: Path) -> list[Path]:
    runs = study_dir / "runs"
    if not runs.is_dir():
        raise DataError(f"{study_dir}: no runs/ directory; is this a study directory?")
    return sorted(p for p in runs.iterdir() if p.is_dir())


def is_number(v: Any) -> bool:
    """A number, numpy's included (a table's column of ints holds numpy integers)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _last_log(run_dir: Path) -> str:
    """'stage sft, step 40' for the last readable line of metrics.jsonl, or '' if none."""
    last = None
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        last = rec
    if last is None:
        return ""
    parts = [f"{k} {last[k]}" for k in ("stage", "split", "step") if k in last]
    return ", ".join(parts)


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
    for run_dir in run_dirs(Path(study_dir)):
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
    present = {p.name for p in run_dirs(Path(study_dir))}
    for planned in planned_runs(Path(study_dir)):
        if planned["run_id"] not in present:
            out.append({"run_id": planned["run_id"], "axes": planned.get("axes") or {}, "last_log": "",
                        "reason": "not started"})
    return out


def planned_runs(study_dir: Path) -> list[dict[str, Any]]:
    """The runs the study planned (``plan.json``: run_id, axes); [] where there is no readable plan."""
    try:
        runs = json.loads((study_dir / "plan.json").read_text(encoding="utf-8")).get("runs")
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, dict) and isinstance(r.get("run_id"), str)] if isinstance(runs, list) else []


def _result_row(result: dict[str, Any], run_id: str) -> tuple[dict, list[str], list[str], list]:
    """Flatten one result.json into a row; also return its axis, metric and stage names."""
    axes = dict(result.get("axes") or {})
    row: dict[str, Any] = {"run_id": run_id}  # the folder name, which locates metrics.jsonl
    row.update(axes)
    metrics = []
    for k, v in (result.get("metrics") or {}).items():
        if is_number(v):
            col = f"metric.{k}" if k in axes or k in row else k
            row[col] = float(v)
            metrics.append(col)
    stages = result.get("stages") or []
    names, devices = _stage_columns(stages, row)
    row["wall_s"] = float(result["wall_s"]) if is_number(result.get("wall_s")) else math.nan
    tok = [float(st["tokens"]) for st in stages if is_number(st.get("tokens"))]
    mem = [float(st["peak_mem_mb"]) for st in stages if is_number(st.get("peak_mem_mb"))]
    row["tokens"] = float(sum(tok)) if tok else math.nan
    row["peak_mem_mb"] = float(max(mem)) if mem else math.nan
    row["device"] = result.get("device") or ",".join(dict.fromkeys(devices)) or "unknown"
    for k in ("precision", "cpu"):
        if result.get(k):
            row[k] = str(result[k])
    if TASK not in axes and result.get("task"):  # the run records its task (the last stage's)
        row[TASK] = str(result["task"])
    for k, v in (result.get("versions") or {}).items():
        row[f"version.{k}"] = str(v)
    return row, list(axes), metrics, names


def _stage_columns(stages: list[dict], row: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Add each stage's wall_s, tokens, peak_mem_mb and dev metrics to `row` (``stage.<name>.<field>``);
    return the stage names (a repeated name numbered ``#2``, ``#3``, ...) and the devices they ran on."""
    names, devices = [], []
    for st in stages:
        name = str(st.get("name", f"stage{len(names)}"))
        base, i = name, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
        fields = {k: st.get(k) for k in ("wall_s", "tokens", "peak_mem_mb")} | dict(st.get("metrics") or {})
        row.update({f"stage.{name}.{k}": float(v) for k, v in fields.items() if is_number(v)})
        if st.get("device"):
            devices.append(str(st["device"]))
    return names, devices


def load_runs(study_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per completed run of a study (a run folder with a readable ``result.json``).

    Columns: ``run_id``; one per axis (``task``, ``regime``, ``param``, ``seed``, ...); one per
    numeric final metric (renamed ``metric.<name>`` if it clashes with an axis); ``wall_s``,
    ``tokens`` (sum over stages), ``peak_mem_mb`` (max over stages), ``device``;
    ``stage.<stage>.<field>`` for each stage's wall_s/tokens/peak_mem_mb and dev metrics;
    ``zero_shot.<metric>``, the metric of the run's starting model where it was evaluated; and
    ``version.<package>``.

    ``df.attrs`` carries ``axes``, ``metrics`` and ``stages`` (names in first-seen order) and
    ``incomplete`` (see :func:`find_incomplete`). Raises :class:`DataError` when ``study_dir``
    has no ``runs/`` folder.
    """
    study_dir = Path(study_dir)
    rows, axes, metrics, stages = [], [], [], []
    for run_dir in run_dirs(study_dir):
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
        row.update({f"{ZERO_SHOT}.{k}": v for k, v in start_metrics(run_dir).items() if k in me})
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


def stage_dirs(run_dir: Path) -> list[Path]:
    """A run's stage folders (``<index>-<name>``) in stage order."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()] if run_dir.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[0]))


def evaluation_dir(run_dir: Path, start: bool = False, stage: str | None = None) -> Path | None:
    """The folder of a run's final evaluation (the last stage's ``eval``), of the end of its stage named
    `stage`, or, with `start`, of its starting model's (the first stage's ``eval-start``: the zero-shot
    model of a run from a base); None where the run has no such stage."""
    stages = stage_dirs(run_dir)
    if stage is not None:
        stages = [p for p in stages if p.name.split("-", 1)[-1] == stage]  # (stage names are unique in a run)
    if not stages:
        return None
    return stages[0] / "eval-start" if start else stages[-1] / "eval"


def evaluation(run_dir: Path, start: bool = False) -> PerExample | None:
    """Per-example statistics of a run's final (or starting) evaluation; None where not recorded."""
    d = evaluation_dir(run_dir, start)
    return read_per_example(d) if d is not None else None


def evaluation_files(run_dir: Path, start: bool = False, stage: str | None = None) -> dict[str, PerExample]:
    """metric -> the per-example statistics that hold it, for the evaluation `evaluation_dir` names:
    its ``eval`` files and, at a stage's end, the stage's reading against its reference (``against-reference``,
    postlab.diagnose), whose pairs are other examples; {} where none were recorded."""
    d = evaluation_dir(run_dir, start, stage)
    parts = [] if d is None else [read_per_example(d)] + ([] if start else [read_per_example(d.parent / AGAINST_REFERENCE)])
    return {m: pe for pe in reversed(parts) if pe is not None for m in pe.stats}


def start_metrics(run_dir: Path) -> dict[str, float]:
    """The metrics of a run's starting model (the first dev record, at step 0 of its first stage, in
    metrics.jsonl): the zero-shot baseline of a run that starts from a base model."""
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if rec.get("split") == "dev" and rec.get("step") == 0:
            return {k: float(v) for k, v in rec.items() if is_number(v) and k not in ("step", "epoch", "eval_s")}
    return {}


def dev_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float], list[float], int | None]:
    """A run's learning curve of a dev metric: (steps counted across stages, values, the steps where
    a stage begins after the first, the dev subset size or None). A stage with ``curve_examples: N``
    evaluated mid-stage points on its first N dev examples; its start and end (whole dev set) are
    restricted to the same N from their per-example files, so the curve is one series."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        stages = [(str(s.get("name")), s.get("curve_examples")) for s in cfg["stages"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return [], [], [], None
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "dev" and is_number(r.get("step"))]
    dirs = stage_dirs(run_dir)
    xs: list[float] = []
    ys: list[float] = []
    bounds: list[float] = []
    offset, subset = 0.0, None
    for i, (name, n_curve) in enumerate(stages):
        recs = [r for r in records if r.get("stage") == name]
        if not recs:
            break
        last = max(r["step"] for r in recs)
        for r in recs:
            if i > 0 and r["step"] == 0:
                continue  # the previous stage's end, already drawn
            value = r.get(metric)
            if n_curve and r["step"] in (0, last) and i < len(dirs):  # whole dev set: restrict to the subset
                pe = read_per_example(dirs[i] / ("eval-start" if r["step"] == 0 else "eval"))
                value = (pe.value(metric, np.arange(min(n_curve, len(pe.ids))))
                         if pe is not None and metric in pe.stats else None)
            if is_number(value):
                xs.append(offset + r["step"])
                ys.append(float(value))
        if n_curve:
            subset = n_curve if subset is None else min(subset, n_curve)
        offset += last
        if i < len(stages) - 1:
            bounds.append(offset)
    return xs, ys, bounds[:len(stages) - 1], subset


def _per_example_scores(run_dir: Path) -> dict[str, float] | None:
    """id -> task score per dev example, from the last stage's evaluation (``per_example.jsonl``)."""
    d = evaluation_dir(run_dir)
    if d is None or not (d / "per_example.jsonl").is_file():
        return None
    return {str(r["id"]): float(r["score"]) for r in read_jsonl(d / "per_example.jsonl") if "id" in r and "score" in r}


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
    col = win_rate_column(versus)
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



def group_axes(df: pd.DataFrame) -> list[str]:
    return [a for a in df.attrs.get("axes", []) if a != SEED]


def sorted_values(values) -> list:
    vals = [v for v in pd.unique(pd.Series(list(values), dtype=object)) if not missing(v)]
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def metrics_with_data(df: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if m in df.columns and df[m].notna().any()]


def tasks_of(df: pd.DataFrame) -> list:
    """Task values (an axis of the study, or what each run recorded), or ``[None]`` when unknown."""
    if TASK in df.columns and df[TASK].notna().all():
        return sorted_values(df[TASK])
    return [None]


def task_rows(df: pd.DataFrame, task: Any) -> pd.DataFrame:
    return with_attrs(df if task is None else df[df[TASK] == task], df)


def groups(df: pd.DataFrame, by: list[str]):
    """(key tuple, sub-frame) per combination of ``by`` (NaN kept), in sorted key order."""
    if not by:
        yield (), df
        return
    found = list(df.groupby(by, dropna=False, sort=False))
    try:
        found.sort(key=lambda kv: tuple(kv[0]))
    except TypeError:
        found.sort(key=lambda kv: tuple(str(x) for x in kv[0]))
    for key, sub in found:
        yield (key if isinstance(key, tuple) else (key,)), sub



def seed_values(g: pd.DataFrame, metric: str) -> dict:
    """seed -> metric value (mean over duplicate runs of a seed) for one side of a comparison."""
    seeds = g[SEED] if SEED in g.columns else pd.Series(0, index=g.index)
    vals = pd.Series(g[metric].to_numpy(dtype=float), index=seeds.to_numpy()).dropna()
    return vals.groupby(level=0).mean().to_dict()


def label(key: Sequence, names: Sequence[str]) -> str:
    """'sft->dpo, lora-r8, lr=2e-05': strings as they are, numbers with their axis name."""
    parts = [f"{n}={v}" if is_number(v) else str(v) for n, v in zip(names, key)]
    return ", ".join(parts) if parts else "all"



def with_attrs(sub: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``sub`` carrying ``df``'s attrs (axes, metrics, ...)."""
    sub = sub.copy()
    sub.attrs = df.attrs
    return sub


def study_file(study_dir: Path) -> dict:
    """The study's copy of its study file, or {} if there is none or it does not parse."""
    path = study_dir / "study.yaml"
    try:
        import yaml
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception:
        cfg = None
    return cfg if isinstance(cfg, dict) else {}
