"""Comparisons at the end of a named stage (a study's ``compare_stages``): an SFT->DPO study asks how its
arms differ after SFT as well as after DPO.

The same comparisons as between the runs' final evaluations (:func:`.comparisons.paired_comparisons`:
every axis but seed and task, pairs of values, seed x example tests), over the runs that have the
stage, on that stage's end-of-stage evaluation (``<i>-<stage>/eval``, and ``against-reference`` where
the stage reads its model against its reference) and its metrics as result.json records them. The
metrics compared are those compared on the run's task (:func:`.comparisons.compared_metrics`). Each
stage's comparisons are a Holm family of their own, apart from the final ones: each is a separate
question (after SFT; after DPO), as the comparisons with the zero-shot model are.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import results as R
from .comparisons import evaluations, paired_comparisons

STAGE_FIELDS = ("wall_s", "tokens", "peak_mem_mb")  # what results._stage_columns records besides metrics


def stage_frame(df: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The runs of `df` that have a stage named `stage`, with that stage's end-of-stage metrics in
    place of their final ones (``stage.<stage>.<metric>`` as ``<metric>``; renamed ``metric.<name>``
    where it clashes with an axis, as results.load_runs does); attrs as df's, ``metrics`` the stage's."""
    prefix = f"stage.{stage}."
    cols = [c for c in df.columns if c.startswith(prefix)]
    has = df[cols].notna().any(axis=1) if cols else pd.Series(False, index=df.index)
    keep = ["run_id"] + [a for a in df.attrs.get("axes", []) if a in df.columns]
    keep += [R.TASK] if R.TASK in df.columns and R.TASK not in keep else []
    out = df.loc[has, keep].copy()
    metrics = []
    for c in cols:
        name = c[len(prefix):]
        if name in STAGE_FIELDS:
            continue
        name = f"metric.{name}" if name in keep else name
        out[name] = df.loc[has, c]
        metrics.append(name)
    out.attrs = {**df.attrs, "metrics": metrics}
    return out.reset_index(drop=True)


def stage_comparisons(df: pd.DataFrame, study_dir: Path, stages: Sequence[str], alpha: float = 0.05) -> pd.DataFrame:
    """paired_comparisons at the end of each of `stages`, with a first column ``stage``; Holm's
    correction runs over each stage's rows alone (p_holm, the adjusted intervals)."""
    tables = []
    for stage in stages:
        sub = stage_frame(df, stage)
        if sub.empty:
            continue
        comp = paired_comparisons(sub, alpha=alpha, evals=evaluations(sub, study_dir, stage=stage))
        if not comp.empty:
            comp.insert(0, "stage", stage)
            tables.append(comp)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
