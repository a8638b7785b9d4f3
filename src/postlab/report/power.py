"""Power before a study runs: for each comparison the study will make, the smallest difference it can
detect at 80% power with its planned seeds and dev examples (`postlab study plan`).

The variance of a per-example difference (seed, example and residual components; postlab.report.paired)
comes, in this order, from `--variance-from DIR` (a study directory whose arms were compared
example by example), from runs of this study already complete in its directory, or from the
conservative defaults the tasks state for their metrics (MetricSpec.planning). Components are pooled
per (task, metric) as the median over that study's comparisons.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paired import Components, detectable_effect, pooled_components

if TYPE_CHECKING:
    from ..study import PlannedRun, Study

POWER = 0.8
ALPHA = 0.05


@dataclass
class PlannedComparison:
    axis: str
    a: Any
    b: Any
    context: str  # the other axes' values, as the report labels them
    task: str
    metric: str
    seeds: int  # seeds both arms share
    examples: int | None  # dev examples (None: unknown before the data loads)


def _label(axes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                     for k, v in axes.items())


def planned_comparisons(study: Study, runs: list[PlannedRun]) -> list[PlannedComparison]:
    """The comparisons the report will make, from the plan: each axis but seed and task with 2+
    values, each pair of its values, over runs that agree on every other axis."""
    from .results import task_primary_metrics

    axes = [a.name for a in study.axes]
    group_axes = [a for a in axes if a != "seed"]
    metrics = _study_metrics(study)
    dev_sizes: dict[str, int | None] = {}
    out = []
    for axis in group_axes:
        if axis == "task":
            continue
        values = list(dict.fromkeys(r.axes[axis] for r in runs))
        others = [a for a in group_axes if a != axis]
        contexts = list(dict.fromkeys(tuple(r.axes[o] for o in others) for r in runs))
        for ctx in contexts:
            in_ctx = [r for r in runs if tuple(r.axes[o] for o in others) == ctx]
            for va, vb in itertools.combinations(values, 2):
                ra = [r for r in in_ctx if r.axes[axis] == va]
                rb = [r for r in in_ctx if r.axes[axis] == vb]
                if not ra or not rb:
                    continue
                seeds = len({r.config.seed for r in ra} & {r.config.seed for r in rb})
                stage = ra[0].config.stages[-1]  # the final evaluation is the last stage's
                task = stage.task.name
                key = stage.task.model_dump_json(include={"name", "dev", "dev_reference", "dev_limit"})
                if key not in dev_sizes:
                    dev_sizes[key] = _dev_size(stage.task)
                rest = {o: v for o, v in zip(others, ctx) if o != "task"}
                for m in _task_metrics(task, metrics) if metrics else task_primary_metrics(task):
                    out.append(PlannedComparison(axis, va, vb, _label(rest), task, m, seeds, dev_sizes[key]))
    return out


def _task_metrics(task: str, metrics: list[str]) -> list[str]:
    """The study's metrics that `task` reports (the report compares a metric only where runs have it):
    a two-task study's list names each task's own."""
    from ..tasks import TASKS

    known = set(getattr(TASKS.get(task), "metric_specs", {}) or {})
    return [m for m in metrics if m in known] if known else metrics


def _study_metrics(study: Study) -> list[str]:
    import yaml

    tree = yaml.safe_load(study.text) or {}
    return [str(m) for m in tree.get("metrics") or []]


def _dev_size(task_cfg) -> int | None:
    from ..errors import PostlabError
    from ..tasks import get_task

    try:
        return len(get_task(task_cfg).dev_examples())
    except (PostlabError, OSError):
        return None


def components_from(study_dir: Path) -> dict[tuple[str, str], Components]:
    """(task, metric) -> components pooled over the crossed seed x example comparisons of a study
    directory's complete runs; {} when it has none (fewer than 2 seeds, or no per-example data)."""
    from ..errors import DataError
    from .comparisons import paired_comparisons
    from .paired import CROSSED
    from .results import load_runs, study_file

    try:
        df = load_runs(study_dir)
    except DataError:
        return {}
    if df.empty:
        return {}
    metrics = study_file(study_dir).get("metrics")
    if isinstance(metrics, list):
        df.attrs["compare_metrics"] = [str(m) for m in metrics]
    comp = paired_comparisons(df, study_dir=study_dir)
    if comp.empty:
        return {}
    comp = comp[comp["test"] == CROSSED]
    found: dict[tuple[str, str], list[Components]] = {}
    for _, r in comp.iterrows():
        task = str(r["task"]) if r["task"] is not None and r["task"] == r["task"] else ""
        found.setdefault((task, r["metric"]), []).append(
            Components(r["comp_seed"], r["comp_example"], r["comp_residual"], int(r["n"]), int(r["n_examples"])))
    return {k: pooled_components(v) for k, v in found.items()}


def default_components(task: str, metric: str) -> Components | None:
    """The task's stated conservative default for a metric (MetricSpec.planning), if any."""
    from ..tasks import TASKS

    cls = TASKS.get(task)
    spec = getattr(cls, "metric_specs", {}).get(metric) if cls is not None else None
    if spec is None or spec.planning is None:
        return None
    return Components(*spec.planning)


def power_table(comparisons: list[PlannedComparison], sources: list[tuple[str, dict]]) -> list[dict]:
    """Per comparison: the detectable effect at 80% power and where its variance came from.
    `sources`: (description, {(task, metric): Components}) in order of preference."""
    rows = []
    cache: dict[tuple, float] = {}
    for c in comparisons:
        comps, origin = None, "none"
        for name, table in sources:
            comps = table.get((c.task, c.metric)) or table.get(("", c.metric))
            if comps is not None:
                origin = name
                break
        if comps is None:
            comps = default_components(c.task, c.metric)
            origin = "task default (conservative)" if comps is not None else "unknown"
        mde = math.nan
        if comps is not None and c.examples:
            key = (comps.seed, comps.example, comps.residual, c.seeds, c.examples)
            if key not in cache:
                cache[key] = detectable_effect(comps, c.seeds, c.examples, ALPHA, POWER)
            mde = cache[key]
        rows.append({"comparison": f"{c.axis}: {c.a} vs {c.b}" + (f" [{c.context}]" if c.context else ""),
                     "task": c.task, "metric": c.metric, "seeds": c.seeds, "examples": c.examples,
                     "detectable": mde, "variance_from": origin})
    return rows


def format_power(rows: list[dict]) -> str:
    if not rows:
        return "  Power: no comparisons (no axis other than seed and task has 2 values)."
    table = [["comparison", "task", "metric", "seeds x dev", "detectable |A − B|", "variance from"]]
    for r in rows:
        size = f"{r['seeds']} x {r['examples'] if r['examples'] else '?'}"
        mde = f"{r['detectable']:.3g}" if isinstance(r["detectable"], float) and math.isfinite(r["detectable"]) else "?"
        table.append([r["comparison"], r["task"], r["metric"], size, mde, r["variance_from"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["", f"  Power: the smallest true difference each comparison finds with {POWER:.0%} probability "
                 f"(two-sided, alpha {ALPHA}; seed x example test, docs/statistics.md):"]
    for row in table:
        lines.append(("  " + "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))).rstrip())
    if any(r["seeds"] < 2 for r in rows):
        lines.append("  With 1 seed the test is per example and ignores training noise; plan 3 or more seeds.")
    return "\n".join(lines)
