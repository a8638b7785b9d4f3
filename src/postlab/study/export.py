"""A study's results without its weights: what a results folder in a repository holds, and what a
study run on another machine, pointed at a copy of it, skips (complete runs are never trained again).

`postlab study export STUDY_DIR --out DEST` copies the study file, the plan, the report and every
complete run (config, metrics, result, evaluations with their per-example files, generated text),
leaving out weights (model/, checkpoint/, base/), learning-curve evaluation files (their metrics are
in metrics.jsonl) and TensorBoard logs. Each run is copied into place whole (atomically); a run
already exported with the same result.json is left as it is.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint import atomic_write_bytes, replace_dir
from ..errors import ConfigError

LEFT_OUT_DIRS = {"model", "checkpoint", "base", "curve", "tensorboard"}
LEFT_OUT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
STUDY_FILES = ("study.yaml", "plan.json")


def _ignore(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    return {n for n in names
            if ((here / n).is_dir() and (n in LEFT_OUT_DIRS or n.endswith((".old", ".tmp", ".reuse-tmp"))))
            or n.endswith(LEFT_OUT_SUFFIXES)}


def export_study(study_dir: str | Path, dest: str | Path) -> tuple[list[str], list[str]]:
    """Copy the study's light files to `dest`; returns (run ids copied, run ids already there)."""
    study_dir, dest = Path(study_dir), Path(dest)
    runs = study_dir / "runs"
    if not runs.is_dir():
        raise ConfigError(f"{study_dir}: no runs/ directory; is this a study directory?")
    if dest.resolve() == study_dir.resolve():
        raise ConfigError(f"--out {dest}: the study directory itself; choose another folder")
    (dest / "runs").mkdir(parents=True, exist_ok=True)
    for name in STUDY_FILES:
        if (study_dir / name).is_file():
            atomic_write_bytes(dest / name, (study_dir / name).read_bytes())
    copied, kept = [], []
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        result = run / "result.json"
        if not result.is_file():
            continue
        target = dest / "runs" / run.name
        if (target / "result.json").is_file() and (target / "result.json").read_bytes() == result.read_bytes():
            kept.append(run.name)
            continue
        tmp = target.with_name(run.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run, tmp, ignore=_ignore)
        replace_dir(tmp, target)
        copied.append(run.name)
    if (study_dir / "report").is_dir():
        tmp = dest / "report.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(study_dir / "report", tmp)
        replace_dir(tmp, dest / "report")
    return copied, kept
