"""Studies: a grid of runs under matched settings, planned (validated and costed) before anything
trains, run resumably one after another, and summed up by :func:`postlab.report.write_report`.

A study file (``studies/*.yaml``)::

    name: quick                      # optional; the report's title (default: the file's stem)
    description: ...                 # optional, free text
    output_dir: runs/quick           # optional; default runs/<file stem>; --output-dir overrides
    base:                            # a run config tree, as in configs/*.yaml (model, seed, stages)
      model: {name: smollm2-135m}
      eval_batch_size: 32            # a stage field at the top level applies to every stage
    axes:                            # the grid: the cartesian product of every axis's values
      task:                          # a *variant* axis: name -> partial config tree
        paraphrase: {task: {name: paraphrase, train_limit: 300}}
        sonnets: {task: {name: sonnets}}
      regime:
        sft: {stages: [{name: sft, objective: {name: nll}}]}
        "sft->dpo": {stages: [{name: sft}, {name: dpo, objective: {name: dpo, beta: 0.1}}]}
      optim.lr: [1.0e-5, 2.0e-5]     # a *scalar* axis: the axis name is a dotted config key
      seed: [0, 1, 2]
    win_rate_vs: {method: teacher}   # optional; the report adds win_rate_vs_teacher (see postlab.results)
    metrics: [dev_loss, chrf]        # optional; the metrics compared (default: each task's primary ones)
    exclude:                         # partial assignments: drop every run that matches one
      - {task: sonnets, optim.lr: 1.0e-5}
    include:                         # partial assignments: add back every run that matches one
      - {task: sonnets, regime: sft, optim.lr: 1.0e-5}   # (over all values of the other axes)
    overrides:                       # settings for the runs that match `when`, applied after the axes
      - when: {task: sonnets}
        set: {by_stage: {sft: {epochs: 3}}}

How a run's config is built, in this order (so a variant that replaces ``stages`` never erases
another axis's stage settings; where two axes set the same stage key, the later axis wins):

1. Run-level keys (``model``, ``seed``, ``stages``) of ``base``, then of each axis's variant, then
   of each matching override are deep-merged (mappings merge key by key; lists, ``stages`` included, and scalars replace).
2. Stage-level keys, of ``base``, each axis (in the file's order), each matching override: a key naming a stage
   field (``task``, ``objective``, ``parameterization``, ``optim``, ``epochs``, ...) is deep-merged
   into every stage; ``by_stage: {<stage name>: {...}}`` into the stages of that name only; a dotted
   key (``optim.lr: 1e-4``, ``stages.1.epochs: 6``) is set as ``postlab train`` overrides are set
   (:func:`postlab.config.apply_overrides`: a stage field applies to every stage). A scalar axis is
   such a dotted key.
3. ``output_dir`` is set to ``<study dir>/runs/<run id>``; the result is validated
   (:func:`postlab.config.parse_run_config`) at plan time, naming the run and the key at fault.

Run ids join ``axis=value`` over the axes (``task=paraphrase,regime=sft-to-dpo,param=lora-r8,seed=0``),
with a dotted axis shortened to its last part (``optim.lr`` -> ``lr``) when that is unambiguous,
``->`` written ``-to-`` and any other character outside ``[A-Za-z0-9._+=,@-]`` as ``_``.

A study directory::

    <study dir>/study.yaml             a copy of the study file (the report reads its name)
    <study dir>/plan.json              every planned run: index, run id, axes
    <study dir>/runs/<run id>/         one run (see postlab.run), plus
        axes.json                      its axes, written before it trains
        error.txt                      why it failed, if it did (removed once it succeeds)
        result.json                    written by the run; the study adds its axes ("axes")
    <study dir>/report/report.md       tables, plots and paired comparisons (postlab.report)

Cost estimates (``postlab study plan``) are estimates: token counts come from the configured
tokenizer on a sample of each data set when it loads locally (else characters / 4); time divides
training tokens by a throughput (tokens/s), measured here with ``--measure`` (a few training steps
of the configured model) or else a documented default per device (:data:`postlab.estimate.DEFAULT_TOKENS_PER_S`).
Forward-only tokens (reference log-probs, evaluation) count a third of a training token;
generation (sonnet evaluation, sampled preference pairs) counts decode steps times a per-step
latency (:data:`DEFAULT_DECODE_STEP_S`, or measured).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write_json, atomic_write_text
from .config import (RunConfig, StageConfig, apply_overrides, dump_config, parse_run_config,
                     read_yaml)
from .errors import ConfigError, PostlabError
from .estimate import RunEstimate, human_n, human_s
from .hub import is_hub_id
from .validate import output_location

log = logging.getLogger("postlab")

STUDY_KEYS = ("name", "description", "output_dir", "base", "axes", "exclude", "include", "overrides", "win_rate_vs",
              "metrics")
RUN_FIELDS = set(RunConfig.model_fields)
STAGE_FIELDS = set(StageConfig.model_fields)
BY_STAGE = "by_stage"




# --------------------------------------------------------------------------------------------
# Study file and grid
# --------------------------------------------------------------------------------------------

@dataclass
class Axis:
    name: str
    kind: str  # "scalar" | "variant"
    values: list[Any]  # scalars, or variant names (str)
    variants: dict[str, dict] = field(default_factory=dict)  # variant name -> partial tree

    def value_of(self, raw: Any, where: str, new_ok: bool = False) -> Any:
        """An assignment's value for this axis, checked (variant names must exist)."""
        if self.kind == "variant":
            key = str(raw)
            if key not in self.variants:
                raise ConfigError(f"{where}: axis {self.name!r} has no variant {key!r}; "
                                  f"its variants are {list(self.variants)}")
            return key
        if not new_ok and not any(_same(raw, v) for v in self.values):
            raise ConfigError(f"{where}: {raw!r} is not a value of axis {self.name!r} ({self.values})")
        return raw


@dataclass
class PlannedRun:
    index: int
    run_id: str
    axes: dict[str, Any]  # axis name -> value (variant name or scalar)
    tree: dict  # the merged config tree (output_dir not set)
    config: RunConfig  # validated


@dataclass
class Study:
    path: Path
    text: str
    name: str
    description: str
    output_dir: str | None
    base: dict
    axes: list[Axis]
    exclude: list[dict]
    include: list[dict]
    overrides: list[tuple[dict, dict]] = field(default_factory=list)  # (when, partial tree)

    def default_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.path.stem


def _same(a: Any, b: Any) -> bool:
    """Equal axis values (1 == 1.0, but True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def load_study(path: str | Path) -> Study:
    """Read and check a study file's structure (the runs' configs are checked by :func:`plan`)."""
    path = Path(path)
    tree = read_yaml(path)
    where = f"study {path}"
    unknown = [k for k in tree if k not in STUDY_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a study has {list(STUDY_KEYS)}")
    base = tree.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base: expected a run config tree (a mapping with model, seed, stages)")
    if "output_dir" in base:
        raise ConfigError(f"{where}: base.output_dir: the study sets each run's output_dir "
                          f"(<study dir>/runs/<run id>); set the study's output_dir instead")
    _check_partial(base, f"{where}: base")
    raw_axes = tree.get("axes")
    if not isinstance(raw_axes, dict) or not raw_axes:
        raise ConfigError(f"{where}: axes: expected a mapping of axis name -> list of values or "
                          f"mapping of variant name -> partial config, e.g. axes: {{seed: [0, 1, 2]}}")
    axes = []
    for name, spec in raw_axes.items():
        name = str(name)
        w = f"{where}: axes.{name}"
        if any(c in name for c in ",=") or not name.strip():
            raise ConfigError(f"{w}: an axis name may not be empty or hold ',' or '='")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{w}: no values")
            for v in spec:
                if isinstance(v, dict):
                    raise ConfigError(f"{w}: a list of values must hold scalars; for partial configs use a "
                                      f"mapping of variant name -> config")
            if len({_fmt(v) for v in spec}) != len(spec):
                raise ConfigError(f"{w}: repeated values {spec}")
            if name.split(".")[0] not in RUN_FIELDS | STAGE_FIELDS:
                raise ConfigError(f"{w}: a list of values sets the config key {name!r}, which is not one "
                                  f"(run keys: {sorted(RUN_FIELDS)}; stage keys: {sorted(STAGE_FIELDS)}); "
                                  f"to name variants, use a mapping of variant name -> partial config")
            axes.append(Axis(name, "scalar", list(spec)))
        elif isinstance(spec, dict):
            if not spec:
                raise ConfigError(f"{w}: no variants")
            variants = {}
            for vname, vtree in spec.items():
                vtree = {} if vtree is None else vtree
                if not isinstance(vtree, dict):
                    raise ConfigError(f"{w}.{vname}: expected a partial config tree (a mapping), got {vtree!r}")
                _check_partial(vtree, f"{w}.{vname}")
                variants[str(vname)] = vtree
            axes.append(Axis(name, "variant", list(variants), variants))
        else:
            raise ConfigError(f"{w}: expected a list of values or a mapping of variant name -> partial config")
    exclude, include = ([_assignment(e, axes, f"{where}: {key}[{i}]", new_ok=key == "include")
                         for i, e in enumerate(_as_list(tree.get(key), f"{where}: {key}"))]
                        for key in ("exclude", "include"))
    if "win_rate_vs" in tree:  # read by the report (postlab.report.add_win_rates); checked here
        versus = tree["win_rate_vs"]
        if not isinstance(versus, dict) or not versus:
            raise ConfigError(f"{where}: win_rate_vs: expected {{axis: value, ...}} naming the runs to compare with")
        _assignment(versus, axes, f"{where}: win_rate_vs", new_ok=False)
    metrics = tree.get("metrics")  # read by the report and the planner; checked here
    if metrics is not None and not (isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics)):
        raise ConfigError(f"{where}: metrics: expected a list of metric names to compare, e.g. [dev_loss, chrf]")
    overrides = []
    for i, o in enumerate(_as_list(tree.get("overrides"), f"{where}: overrides")):
        w = f"{where}: overrides[{i}]"
        if not isinstance(o, dict) or set(o) != {"when", "set"} or not isinstance(o["set"], dict):
            raise ConfigError(f"{w}: expected {{when: {{axis: value, ...}}, set: {{partial config}}}}")
        _check_partial(o["set"], f"{w}.set")
        overrides.append((_assignment(o["when"], axes, f"{w}.when", new_ok=False), o["set"]))
    name = tree.get("name") or path.stem
    return Study(path, path.read_text(encoding="utf-8"), str(name), str(tree.get("description") or ""),
                 tree.get("output_dir"), base, axes, exclude, include, overrides)


def _as_list(v: Any, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{where}: expected a list of partial axis assignments, e.g. [{{task: sonnets, seed: 0}}]")
    return v


def _assignment(entry: Any, axes: list[Axis], where: str, new_ok: bool) -> dict[str, Any]:
    if not isinstance(entry, dict) or not entry:
        raise ConfigError(f"{where}: expected a mapping of axis name -> value, e.g. {{regime: dpo}}")
    by_name = {a.name: a for a in axes}
    out = {}
    for k, v in entry.items():
        if str(k) not in by_name:
            raise ConfigError(f"{where}: {k!r} is not an axis (axes: {list(by_name)})")
        out[str(k)] = by_name[str(k)].value_of(v, where, new_ok)
    return out


def _check_partial(tree: dict, where: str) -> None:
    """Top-level keys of a base or variant tree: run keys, stage keys, by_stage, or dotted keys."""
    for k, v in tree.items():
        k = str(k)
        if "." in k:
            if k.split(".")[0] not in RUN_FIELDS | STAGE_FIELDS:
                raise ConfigError(f"{where}: {k}: unknown key {k.split('.')[0]!r}")
        elif k == BY_STAGE:
            if not isinstance(v, dict) or not all(isinstance(s, dict) for s in v.values()):
                raise ConfigError(f"{where}: by_stage: expected {{<stage name>: {{partial stage config}}}}")
        elif k not in RUN_FIELDS | STAGE_FIELDS:
            raise ConfigError(f"{where}: {k}: unknown key (run keys: {sorted(RUN_FIELDS)}; stage keys: "
                              f"{sorted(STAGE_FIELDS)}; also by_stage and dotted keys like optim.lr)")
        if k == "stages" and not (isinstance(v, list) and all(isinstance(s, dict) for s in v)):
            raise ConfigError(f"{where}: stages: expected a list of stage mappings")


def deep_merge(dst: dict, src: dict) -> dict:
    """Merge `src` into `dst` in place: mappings key by key, anything else (lists too) replaced."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _stage_name(stage: dict) -> str:
    return str(stage.get("name", StageConfig.model_fields["name"].default))


def build_tree(study: Study, axes: dict[str, Any]) -> dict:
    """The merged config tree of one run (see the module doc for the order)."""
    parts: list[dict] = [study.base]
    for axis in study.axes:
        value = axes[axis.name]
        parts.append(axis.variants[value] if axis.kind == "variant" else {axis.name: value})
    parts += [tree for when, tree in study.overrides if _matches(axes, when)]
    tree: dict = {}
    for p in parts:  # 1. run level
        deep_merge(tree, {k: v for k, v in p.items() if k in RUN_FIELDS})
    stages = tree.setdefault("stages", [{}])
    for p in parts:  # 2. stage level, then by stage name, then dotted keys
        every = {k: v for k, v in p.items() if k in STAGE_FIELDS and k not in RUN_FIELDS}
        for st in stages:
            deep_merge(st, every)
        for name, sub in (p.get(BY_STAGE) or {}).items():
            for st in stages:
                if _stage_name(st) == str(name):
                    deep_merge(st, sub)
        dotted = [(k, v) for k, v in p.items() if "." in str(k)]
        apply_overrides(tree, [f"{k}={yaml.safe_dump(v, default_flow_style=True)}" for k, v in dotted])
    tree.pop("output_dir", None)
    return tree


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


def _safe(text: str) -> str:
    text = text.replace("->", "-to-")
    return re.sub(r"[^A-Za-z0-9._+=,@-]+", "_", text)


def _short_names(axes: list[Axis]) -> dict[str, str]:
    last = {a.name: a.name.split(".")[-1] for a in axes}
    counts: dict[str, int] = {}
    for s in last.values():
        counts[s] = counts.get(s, 0) + 1
    return {n: (s if counts[s] == 1 else n) for n, s in last.items()}


def run_id(axes: dict[str, Any], short: dict[str, str]) -> str:
    rid = _safe(",".join(f"{short[k]}={_fmt(v)}" for k, v in axes.items()))
    if len(rid) > 150:  # keep directory names well under the file system's 255 bytes
        rid = rid[:140] + "-" + hashlib.sha1(rid.encode()).hexdigest()[:8]
    return rid


def _matches(axes: dict[str, Any], assignment: dict[str, Any]) -> bool:
    return all(_same(axes[k], v) for k, v in assignment.items())


def expand(study: Study) -> list[dict[str, Any]]:
    """The runs' axis assignments: the product of the axes (in file order), minus `exclude`, plus
    `include` (each entry expanded over the axes it leaves out), without duplicates."""
    names = [a.name for a in study.axes]
    combos = [dict(zip(names, vals)) for vals in itertools.product(*(a.values for a in study.axes))]
    out = [c for c in combos if not any(_matches(c, e) for e in study.exclude)]
    for entry in study.include:
        free = [a for a in study.axes if a.name not in entry]
        for vals in itertools.product(*(a.values for a in free)):
            fill = dict(zip((a.name for a in free), vals))
            c = {n: entry[n] if n in entry else fill[n] for n in names}
            if not any(_matches(o, c) for o in out):
                out.append(c)
    return out


def plan(study: Study) -> list[PlannedRun]:
    """Every run of the study, validated; raises ConfigError listing each bad run and key."""
    assignments = expand(study)
    if not assignments:
        raise ConfigError(f"study {study.path}: exclude leaves no runs")
    short = _short_names(study.axes)
    ids = [run_id(a, short) for a in assignments]
    seen: dict[str, int] = {}
    for rid in ids:
        seen[rid] = seen.get(rid, 0) + 1
    for i, (rid, a) in enumerate(zip(ids, assignments)):  # sanitizing made two ids equal
        if seen[rid] > 1:
            full = json.dumps({k: _fmt(v) for k, v in a.items()}, sort_keys=True)
            ids[i] = f"{rid[:140]}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    runs, errors = [], []
    for i, (rid, a) in enumerate(zip(ids, assignments)):
        try:
            tree = build_tree(study, a)
            cfg = parse_run_config({**tree, "output_dir": f"runs/{rid}"}, source=f"run {rid}")
            check_run(cfg, rid)
        except ConfigError as e:
            prefix = f"run {rid}: "
            errors.append((rid, str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)))
            continue
        runs.append(PlannedRun(i, rid, a, tree, cfg))
    if errors:
        grouped: dict[str, list[str]] = {}
        for rid, msg in errors:
            grouped.setdefault(msg, []).append(rid)
        lines = []
        for msg, rids in itertools.islice(grouped.items(), 8):
            more = (f" (and {len(rids) - 1} more: {', '.join(rids[1:4])}" + (", ..." if len(rids) > 4 else "") + ")"
                    if len(rids) > 1 else "")
            lines.append(f"run {rids[0]}{more}: {msg}")
        if len(grouped) > 8:
            lines.append(f"... and {len(grouped) - 8} more distinct error(s)")
        raise ConfigError(f"study {study.path}: {len(errors)} of {len(assignments)} run(s) have invalid "
                          f"configs:\n" + "\n".join(lines))
    _check_by_stage(study, runs)
    for i, (when, _) in enumerate(study.overrides):
        if not any(_matches(a, when) for a in assignments):
            raise ConfigError(f"study {study.path}: overrides[{i}].when {when} matches no run")
    return runs


def check_run(cfg: RunConfig, rid: str) -> None:
    """Checks beyond the config schema that need no model: task names (and so data readers)."""
    from .tasks import get_task

    for s in cfg.stages:
        try:
            get_task(s.task)
        except ConfigError as e:
            raise ConfigError(f"run {rid}: stage {s.name}: {e}") from None


def _check_by_stage(study: Study, runs: list[PlannedRun]) -> None:
    for axis in study.axes:
        for vname, vtree in axis.variants.items():
            for sname in (vtree.get(BY_STAGE) or {}):
                users = [r for r in runs if r.axes[axis.name] == vname]
                if users and not any(s.name == str(sname) for r in users for s in r.config.stages):
                    raise ConfigError(f"study {study.path}: axes.{axis.name}.{vname}.by_stage: no run with this "
                                      f"variant has a stage named {sname!r}")


def check_data(runs: list[PlannedRun]) -> None:
    """Read every distinct local data set the runs train and evaluate on (cheap next to training),
    so a missing or malformed file stops the study before anything trains, naming the runs."""
    from .tasks import get_task

    users: dict[str, tuple[Any, list[str]]] = {}
    for r in runs:
        for s in r.config.stages:
            key = s.task.model_dump_json(exclude={"generation", "pairs", "overlength"})
            users.setdefault(key, (s.task, []))[1].append(r.run_id)
    problems = []
    for task_cfg, rids in users.values():
        sources = [getattr(task_cfg, k) for k in ("train", "dev", "dev_reference") if getattr(task_cfg, k)]
        if any(is_hub_id(x) for x in sources):
            continue  # a hub dataset id: not downloaded just to check it
        try:
            task = get_task(task_cfg)
            task.train_examples()
            task.dev_examples()
        except PostlabError as e:
            rids = list(dict.fromkeys(rids))
            more = f" and {len(rids) - 1} more" if len(rids) > 1 else ""
            problems.append(f"task {task_cfg.name} (run {rids[0]}{more}): {e}")
    if problems:
        raise ConfigError("data problems, found before training:\n  " + "\n  ".join(problems))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2")
    return int(m.group(1)), int(m.group(2))


def shard_runs(runs: list[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    """Runs of shard i/n: those at plan index ≡ i (mod n); the shards partition the plan."""
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for r in runs if r.index % n == i]


def format_plan(study: Study, runs: list[PlannedRun], study_dir: Path, estimates: list[RunEstimate] | None = None,
                notes: dict | None = None, shard: tuple[int, int] | None = None, total: int | None = None) -> str:
    """The plan as text: one line per run (index, run id, stages), with estimates when given."""
    total = len(runs) if total is None else total
    sizes = " x ".join(f"{a.name} ({len(a.values)})" for a in study.axes)
    product = math.prod(len(a.values) for a in study.axes)
    rules = (f"; exclude {len(study.exclude)} rule(s), include {len(study.include)} rule(s)"
             if study.exclude or study.include else "")
    lines = [f"study {study.name} ({study.path}): {total} run(s) -> {study_dir}/runs/<run id>/",
             f"  grid: {sizes} = {product}{rules}"]
    if study.description:
        lines.append(f"  {study.description.strip()}")
    if shard:
        lines.append(f"  shard {shard[0]}/{shard[1]}: {len(runs)} of {total} run(s)")
    est = {e.run.run_id: e for e in estimates or []}
    table = [["#", "run id", "stages (examples x epochs)"] + (["est. tokens", "est. time"] if estimates is not None else [])]
    for r in runs:
        e = est.get(r.run_id)
        if e is None:
            table.append([str(r.index), r.run_id, ", ".join(f"{s.name} ?x{s.epochs}" for s in r.config.stages)])
            continue
        stages = ", ".join(f"{s.name} (reused)" if s.reused else
                           f"{s.name} {s.examples if s.examples is not None else '?'}x{s.epochs:g}" for s in e.stages)
        table.append([str(r.index), r.run_id, stages, human_n(e.train_tokens), human_s(e.seconds)])
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(table[0]))]
    right = {0, 3, 4}
    lines.append("")
    for row in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(("  " + "  ".join(cells)).rstrip())
    if estimates is not None:
        notes = notes or {}
        secs = [e.seconds for e in estimates]
        known = [s for s in secs if s is not None]
        toks = sum(e.train_tokens for e in estimates if e.train_tokens is not None)
        tps = notes.get("throughput", [])
        lines += ["", f"  total: {len(runs)} run(s), ~{human_n(toks)} training tokens, ~{human_s(sum(known))} "
                      f"one run after another" + (f" ({len(secs) - len(known)} run(s) not estimated)"
                                                  if len(known) < len(secs) else ""),
                  "  These are estimates. Tokens: " + notes.get("tokens", "?") + ". Throughput: " + "; ".join(tps)
                  + ("" if notes.get("measured")
                     else " (pass --measure to time training steps of the configured model here)")
                  + ". Time includes reference log-probs, evaluation and generation roughly; LoRA is assumed "
                    "as fast as full fine-tuning. A stage marked (reused) is identical to an earlier run's "
                    "(same model, seed and stages so far) and is copied, not trained."]
        lines += [f"  data problem (such runs would fail): {u}" for u in notes.get("unavailable", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

@dataclass
class StudyOutcome:
    study_dir: Path
    ran: list[str] = field(default_factory=list)  # trained to completion in this call
    skipped: list[str] = field(default_factory=list)  # already complete
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, first line of the error)
    report: Path | None = None


def run_dir(study_dir: Path, rid: str) -> Path:
    return study_dir / "runs" / rid


def run_config(study_dir: Path, r: PlannedRun) -> RunConfig:
    return parse_run_config({**r.tree, "output_dir": str(run_dir(study_dir, r.run_id))}, source=f"run {r.run_id}")


def _sync_output_dir(out: Path, cfg: RunConfig) -> None:
    """A study directory that moved (or was named another way) still resumes: when the saved config
    differs from the new one only in output_dir, rewrite it."""
    saved = out / "config.yaml"
    if not saved.is_file() or saved.read_text() == dump_config(cfg):
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        return
    new = cfg.model_dump(mode="json")
    if isinstance(old, dict) and {**old, "output_dir": None} == {**new, "output_dir": None}:
        atomic_write_text(saved, dump_config(cfg))


def _add_axes(out: Path, axes: dict[str, Any]) -> None:
    """Put the run's axes into its result.json (atomically) if they are not there yet."""
    path = out / "result.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("axes") != axes:
        result["axes"] = axes
        atomic_write_json(path, result)


def _complete(out: Path) -> bool:
    path = out / "result.json"
    if not path.is_file():
        return False
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def run_study(study: Study, study_dir: str | Path | None = None, shard: tuple[int, int] | None = None,
              runs: list[PlannedRun] | None = None, progress: bool = True, report: bool | None = None) -> StudyOutcome:
    """Run every run of `study` (or of one shard) in `study_dir`, skipping complete runs and
    resuming interrupted ones. A run that fails is recorded (error.txt) and the study goes on.
    Writes the report at the end unless sharded (or `report` says otherwise)."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .run import run

    study_dir = output_location(study_dir if study_dir is not None else study.default_dir(), "study directory")
    runs = plan(study) if runs is None else runs
    mine = shard_runs(runs, shard)
    check_data([r for r in mine if not _complete(run_dir(study_dir, r.run_id))])
    study_dir.mkdir(parents=True, exist_ok=True)
    saved = study_dir / "study.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != study.text:
        log.warning("%s differs from %s: runs whose config changed will fail (a run resumes only with the same "
                    "config); the copy is replaced", saved, study.path)
    atomic_write_text(saved, study.text)
    atomic_write_json(study_dir / "plan.json", {
        "study": study.name, "source": str(study.path),
        "runs": [{"index": r.index, "run_id": r.run_id, "axes": r.axes} for r in runs]})
    outcome = StudyOutcome(study_dir)
    done_times: list[float] = []
    todo = []
    for r in mine:
        out = run_dir(study_dir, r.run_id)
        atomic_write_json(out / "axes.json", r.axes)
        if _complete(out):
            _add_axes(out, r.axes)
            outcome.skipped.append(r.run_id)
        else:
            todo.append(r)
    if outcome.skipped:
        log.info("study %s: %d of %d run(s) already complete", study.name, len(outcome.skipped), len(mine))
    bar = tqdm(total=len(mine), initial=len(outcome.skipped), position=0, desc=f"study {study.name}", unit="run",
               dynamic_ncols=True, disable=not progress,
               bar_format="{desc}: {n}/{total} runs |{bar}| {elapsed}{postfix}")
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    try:
        with redirect:
            for k, r in enumerate(todo):
                out = run_dir(study_dir, r.run_id)
                left = len(todo) - k
                eta = human_s(sum(done_times) / len(done_times) * left) if done_times else "?"
                bar.set_postfix_str(f"now {r.run_id}, ETA {eta}")
                log.info("study %s: run %d/%d %s", study.name, len(outcome.skipped) + k + 1, len(mine), r.run_id)
                t0 = time.perf_counter()
                try:
                    cfg = run_config(study_dir, r)
                    _sync_output_dir(out, cfg)
                    run(cfg, resume=True)
                    _add_axes(out, r.axes)
                except Exception as e:  # noqa: BLE001 - one failed run must not end the study
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    detail = (f"{type(e).__name__}: {e}\n" if isinstance(e, PostlabError)
                              else f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
                    atomic_write_text(out / "error.txt", detail)
                    outcome.failed.append((r.run_id, first))
                    log.error("study %s: run %s failed: %s (details in %s)", study.name, r.run_id, first,
                              out / "error.txt")
                else:
                    (out / "error.txt").unlink(missing_ok=True)
                    done_times.append(time.perf_counter() - t0)
                    outcome.ran.append(r.run_id)
                bar.update(1)
            bar.set_postfix_str("done")
    finally:
        bar.close()
    if (report if report is not None else shard is None):
        from .report import write_report

        outcome.report = write_report(study_dir)
    return outcome


def format_outcome(o: StudyOutcome, shard: tuple[int, int] | None) -> str:
    lines = [f"study {o.study_dir}: {len(o.ran)} run(s) trained, {len(o.skipped)} already complete, "
             f"{len(o.failed)} failed" + (f" (shard {shard[0]}/{shard[1]})" if shard else "")]
    for rid, msg in o.failed:
        lines.append(f"  FAILED {rid}: {msg} (see {run_dir(o.study_dir, rid)}/error.txt)")
    if o.failed:
        lines.append("  rerun the same command to retry the failed runs (complete runs are skipped)")
    if o.report:
        lines.append(f"report: {o.report}")
    elif shard:
        lines.append(f"when every shard is done (copy their runs/ folders into one study dir): "
                     f"postlab study report {o.study_dir}")
    return "\n".join(lines)
