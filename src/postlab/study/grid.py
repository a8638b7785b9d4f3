"""The grid of a study: every run's config tree (base, axes, overrides merged in a fixed order), its
run id, and the validated plan."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import RunConfig, StageConfig, apply_overrides, parse_run_config
from ..errors import ConfigError
from .file import BY_STAGE, RUN_FIELDS, STAGE_FIELDS, Axis, Study
from .file import fmt as _fmt
from .file import same as _same


@dataclass
class PlannedRun:
    index: int
    run_id: str
    axes: dict[str, Any]  # axis name -> value (variant name or scalar)
    tree: dict  # the merged config tree (output_dir not set)
    config: RunConfig  # validated


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
    ids = _unique_ids(assignments, _short_names(study.axes))
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
        raise ConfigError(f"study {study.path}: {len(errors)} of {len(assignments)} run(s) have invalid "
                          f"configs:\n" + "\n".join(_grouped_errors(errors)))
    _check_by_stage(study, runs)
    _check_compare_stages(study, runs)
    for i, (when, _) in enumerate(study.overrides):
        if not any(_matches(a, when) for a in assignments):
            raise ConfigError(f"study {study.path}: overrides[{i}].when {when} matches no run")
    return runs


def _unique_ids(assignments: list[dict], short: dict) -> list[str]:
    """Run ids of the assignments; where sanitizing made two equal, each gets a hash of its axes."""
    ids = [run_id(a, short) for a in assignments]
    seen: dict[str, int] = {}
    for rid in ids:
        seen[rid] = seen.get(rid, 0) + 1
    for i, (rid, a) in enumerate(zip(ids, assignments)):
        if seen[rid] > 1:
            full = json.dumps({k: _fmt(v) for k, v in a.items()}, sort_keys=True)
            ids[i] = f"{rid[:140]}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    return ids


def _grouped_errors(errors: list[tuple[str, str]]) -> list[str]:
    """One line per distinct error (8 at most), naming the first run and counting the others."""
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
    return lines


def check_run(cfg: RunConfig, rid: str) -> None:
    """Checks beyond the config schema that need no model: task names (and so data readers)."""
    from ..tasks import get_task

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


def _check_compare_stages(study: Study, runs: list[PlannedRun]) -> None:
    """Each stage the report is to compare is a stage of some run (runs without it are left out of its table)."""
    names = list(dict.fromkeys(s.name for r in runs for s in r.config.stages))
    for name in study.compare_stages or []:
        if name not in names:
            raise ConfigError(f"study {study.path}: compare_stages: no run has a stage named {name!r} (stages: "
                              f"{', '.join(names)})")
