"""Power before a study runs: for each comparison the study will make, the smallest difference it can
detect at 80% power with its planned seeds and dev examples (`postlab study plan`).

The variance of a per-example difference (seed, example and residual components; postlab.report.paired)
comes, in this order, from `--variance-from DIR` (a study directory whose arms were compared
example by example), from runs of this study already complete in its directory, or from the
conservative defaults the tasks state for their metrics (MetricSpec.planning). Components are pooled
per (task, metric) as the median over that study's comparisons. A 1-seed design takes its training
noise from the task's default where that is larger than the source's: its test cannot measure any.

Besides the table, the plan says in words what a design cannot do: a 1-seed comparison cannot tell a
recipe effect from training noise (and how often it would be fooled), 2 seeds detect far less than 3,
and a study's `effects` (the smallest difference worth finding, per metric) that a comparison cannot
detect, with the number of seeds that would.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paired import Components, detectable_effect, one_seed_false_positive_rate, pooled_components

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
    stage: str | None = None  # compared at the end of this stage (the study's compare_stages); None: at the run's end


def planned_comparisons(study: Study, runs: list[PlannedRun]) -> list[PlannedComparison]:
    """The comparisons the report will make (postlab.report.comparisons.paired_comparisons), from the
    plan: each axis but seed and task with 2+ values, each pair of its values in the report's order
    (so A − B has the report's sign), per task, over runs that agree on every other axis; the metrics
    the report compares on that task (comparisons.compared_metrics) and the study's win rate. Then the
    same at the end of each stage the study names in `compare_stages` (postlab.report.stages), over
    the runs that have that stage, without the win rate (the report takes it from final evaluations)."""
    out = _comparisons_at(study, runs, None)
    for name in study.compare_stages or []:
        out += _comparisons_at(study, [r for r in runs if any(s.name == name for s in r.config.stages)], name)
    return out


def _comparisons_at(study: Study, runs: list[PlannedRun], stage_name: str | None) -> list[PlannedComparison]:
    from . import results as R

    group_axes = [a.name for a in study.axes if a.name not in (R.SEED, R.TASK)]
    dev_sizes: dict[str, int | None] = {}
    out = []
    for axis in group_axes:
        values = R.sorted_values(r.axes[axis] for r in runs)
        others = [a for a in group_axes if a != axis]
        for task in R.sorted_values(_task(r) for r in runs):
            of_task = [r for r in runs if _task(r) == task]
            contexts = sorted({tuple(r.axes[o] for o in others) for r in of_task}, key=lambda k: tuple(map(str, k)))
            for ctx in contexts:
                in_ctx = [r for r in of_task if tuple(r.axes[o] for o in others) == ctx]
                for va, vb in itertools.combinations(values, 2):
                    ra = [r for r in in_ctx if r.axes[axis] == va]
                    rb = [r for r in in_ctx if r.axes[axis] == vb]
                    if not ra or not rb:
                        continue
                    seeds = len({r.config.seed for r in ra} & {r.config.seed for r in rb})
                    # the evaluation compared: the named stage's end, or the run's final one (its last stage's)
                    stage = next((s for s in ra[0].config.stages if s.name == stage_name), ra[0].config.stages[-1])
                    key = stage.task.model_dump_json(include={"name", "dev", "dev_reference", "dev_limit", "validation"})
                    if key not in dev_sizes:
                        dev_sizes[key] = _dev_size(stage.task)
                    label = R.label(ctx, others) if others else ""
                    out += [PlannedComparison(axis, va, vb, label, task, m, seeds, _examples(stage, m, dev_sizes[key]),
                                              stage_name)
                            for m in _compared(study, task, stage, win_rate=stage_name is None)]
    return out


def _task(run: PlannedRun) -> str:
    return run.config.stages[-1].task.name  # what the run records as its task (its last stage's)


def _compared(study: Study, task: str, stage, win_rate: bool = True) -> list[str]:
    """What the report compares at the end of a run's `stage` (a StageConfig): the compared metrics of
    the run's task (a score_records log-likelihood only where the stage's task scores that file, the
    ref_* metrics only where the stage reads its model against its reference), then the study's win rate."""
    from ..metrics import AGAINST_REFERENCE_SPECS
    from .comparisons import LOGP_SUFFIX, compared_metrics
    from .results import win_rate_column

    metrics = compared_metrics(task, study.metrics) or []
    metrics = [m for m in metrics if not m.endswith(LOGP_SUFFIX) or m[:-len(LOGP_SUFFIX)] in stage.task.score_records]
    metrics = [m for m in metrics if m not in AGAINST_REFERENCE_SPECS or stage.against_reference]
    return metrics + ([win_rate_column(study.win_rate_vs)] if study.win_rate_vs and win_rate else [])


def _examples(stage, metric: str, dev: int | None) -> int | None:
    """The examples a comparison of `metric` pairs: the dev set, or for the ref_* metrics the held-out
    pairs the stage reads against its reference (its first `against_reference_examples`)."""
    from ..metrics import AGAINST_REFERENCE_SPECS

    if metric in AGAINST_REFERENCE_SPECS and stage.against_reference_examples and dev:
        return min(dev, stage.against_reference_examples)
    return dev


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
    from ..metrics import AGAINST_REFERENCE_SPECS
    from ..tasks import TASKS

    cls = TASKS.get(task)
    spec = getattr(cls, "metric_specs", {}).get(metric) if cls is not None else None
    spec = spec or AGAINST_REFERENCE_SPECS.get(metric)
    if spec is None or spec.planning is None:
        return None
    return Components(*spec.planning)


def power_table(comparisons: list[PlannedComparison], sources: list[tuple[str, dict]]) -> list[dict]:
    """Per comparison: the detectable effect at 80% power, where its variance came from, and the
    components themselves (`components`, for format_power's words). `sources`: (description,
    {(task, metric): Components}) in order of preference."""
    rows = []
    for c in comparisons:
        comps, origin = None, "none"
        for name, table in sources:
            comps = table.get((c.task, c.metric)) or table.get(("", c.metric))
            if comps is not None:
                origin = name
                break
        default = default_components(c.task, c.metric)
        if comps is None:
            comps, origin = default, "task default (conservative)" if default is not None else "unknown"
        elif c.seeds == 1 and default is not None and default.seed > comps.seed:
            # a 1-seed design measures no training noise: at least the task's stated amount
            comps = Components(default.seed, comps.example, comps.residual, comps.n_seeds, comps.n_examples)
            origin += " (seed variance: task default)"
        mde = _detectable(comps, c.seeds, c.examples) if comps is not None and c.examples else math.nan
        rows.append({"comparison": f"{c.axis}: {c.a} vs {c.b}" + (f" [{c.context}]" if c.context else "")
                     + (f" (end of stage {c.stage})" if c.stage else ""),
                     "task": c.task, "metric": c.metric, "seeds": c.seeds, "examples": c.examples,
                     "detectable": mde, "variance_from": origin, "components": comps})
    return rows


_DETECTABLE: dict[tuple, float] = {}


def _detectable(comps: Components, seeds: int, examples: int) -> float:
    """detectable_effect at the plan's alpha and power, remembered (the words ask again)."""
    key = (comps.seed, comps.example, comps.residual, seeds, examples)
    if key not in _DETECTABLE:
        _DETECTABLE[key] = detectable_effect(comps, seeds, examples, ALPHA, POWER)
    return _DETECTABLE[key]


def format_power(rows: list[dict], effects: dict[str, float] | None = None) -> str:
    """The power table, then in words what the designs cannot do (see the module doc). `effects`:
    the smallest difference worth finding per metric (the study's `effects`)."""
    if not rows:
        return "  Power: no comparisons (no axis other than seed and task has 2 values)."
    table = [["comparison", "task", "metric", "seeds x dev", "detectable |A − B|", "variance from"]]
    for r in rows:
        size = f"{r['seeds']} x {r['examples'] if r['examples'] else '?'}"
        table.append([r["comparison"], r["task"], r["metric"], size, _effect_cell(r), r["variance_from"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["", f"  Power: the smallest true difference each comparison finds with {POWER:.0%} probability "
                 f"(two-sided, alpha {ALPHA}; seed x example test, docs/statistics.md):"]
    for row in table:
        lines.append(("  " + "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))).rstrip())
    words = _design_words(rows) + _effect_words(rows, effects or {})
    return "\n".join(lines + [f"  {w}" for w in dict.fromkeys(words)])


def _effect_cell(r: dict) -> str:
    d = r["detectable"]
    if not isinstance(d, float) or math.isnan(d):
        return "?"
    return f"{d:.3g}" if math.isfinite(d) else ("none (1 seed)" if r["seeds"] == 1 else "none")


def _design_words(rows: list[dict]) -> list[str]:
    """What 1- and 2-seed designs cannot do, once per (task, metric, design)."""
    out = []
    for r in rows:
        comps, n = r["components"], r["examples"]
        if comps is None or not n or r["seeds"] >= 3:
            continue
        what = f"{r['task']} {r['metric']} ({r['seeds']} x {n})"
        three = f"3 seeds detect {_detectable(comps, 3, n):.3g}"
        if r["seeds"] == 1 and comps.seed > 0:
            fooled = one_seed_false_positive_rate(comps, n, ALPHA)
            out.append(f"{what}: with 1 seed the report's test is per example and ignores training noise. Retraining "
                       f"moves this difference with SD {math.sqrt(comps.seed):.3g} ({r['variance_from']}), so between "
                       f"two recipes that do not differ a 1-seed result is a false positive {fooled:.0%} of the time: "
                       f"no 1-seed design can tell a recipe effect from training noise ({three}).")
        elif r["seeds"] == 2:
            out.append(f"{what}: 2 seeds estimate training noise from 1 degree of freedom and detect only "
                       f"|A − B| >= {r['detectable']:.3g}, where {three}.")
    return out


def _effect_words(rows: list[dict], effects: dict[str, float]) -> list[str]:
    """For the comparisons that cannot detect the effect the study names for their metric: what they
    detect, and how many seeds would (up to 20); comparisons alike in design are named together."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        effect, comps, n = effects.get(r["metric"]), r["components"], r["examples"]
        if effect is None or comps is None or not n or not r["detectable"] > effect:
            continue
        key = (r["task"], r["metric"], effect, r["seeds"], n, r["detectable"], (comps.seed, comps.example, comps.residual))
        groups.setdefault(key, []).append((r["comparison"], comps))
    out = []
    for (task, metric, effect, n_seeds, n, detectable, _), named in groups.items():
        names, comps = [c for c, _ in named], named[0][1]
        seeds = _seeds_for(comps, n, effect, max(n_seeds + 1, 3))
        would = (f"{seeds} seeds would ({_detectable(comps, seeds, n):.3g})" if seeds else
                 "no number of seeds up to 20 would; more dev examples might")
        detects = "nothing" if not math.isfinite(detectable) else f"only |A − B| >= {detectable:.3g}"
        which = names[0] if len(names) == 1 else f"{len(names)} comparisons ({names[0]}, ...)"
        out.append(f"{task} {metric}: {which} cannot detect the effect you named, {effect:g}: "
                   f"{n_seeds} seed{'s' if n_seeds != 1 else ''} x {n} detect {detects}; {would}.")
    return out


def _seeds_for(comps: Components, examples: int, effect: float, start: int, most: int = 20) -> int | None:
    """The fewest seeds from `start` to `most` that detect `effect` (the detectable effect falls as
    seeds grow: bisection), or None."""
    if _detectable(comps, most, examples) > effect:
        return None
    lo, hi = start - 1, most  # detectable(lo) > effect (or lo below start), detectable(hi) <= effect
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _detectable(comps, mid, examples) <= effect else (mid, hi)
    return hi
