"""A run: a list of stages trained one after another in one directory, resumable at any point
(each stage's data, preparation, training and reuse: postlab.stage).

    <output_dir>/config.yaml       the validated config
    <output_dir>/metrics.jsonl     train and dev records of every stage
    <output_dir>/<i>-<stage>/      checkpoint/, model/ (final weights), done.json, eval outputs
    <output_dir>/result.json       written atomically when the last stage is done
"""
from __future__ import annotations

import contextlib
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import distributed as dist
from .allocator import release_freed_memory
from .cache import lock
from .checkpoint import atomic_write_json, atomic_write_text, existing_dir, read_json, remove_dir
from .config import RunConfig, dump_config, parse_run_config
from .errors import ConfigError, PostlabError
from .hardware import cpu_name  # noqa: F401 (re-exported)
from .models import load_lm
from .occupancy import training_on_cpu
from .runlog import MetricsLog
from .stage import register_stage, reuse_stage, run_stage, stage_dir
from .tasks import get_task, records_fingerprint, training_task
from .validate import output_location

log = logging.getLogger("postlab")


def versions() -> dict[str, str]:
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "postlab_commit": commit or "unknown"}


def check_inputs(runs: list[tuple[str, RunConfig]]) -> None:
    """Every input the runs name, checked before anything is written or loaded: each distinct local
    data set read (train, dev and the files tasks add), each model named (base, teachers, samplers)
    found. Raises ConfigError listing the problems and the runs they affect."""
    from .hub import is_hub_id
    from .validate import check_model

    users, models = _named_inputs(runs)
    problems = []

    def affected(rids: list[str]) -> str:
        rids = list(dict.fromkeys(rids))
        return "" if rids == [""] else f" (run {rids[0]}" + (f" and {len(rids) - 1} more)" if len(rids) > 1 else ")")

    for (name, field), rids in models.items():
        try:
            check_model(name, field)
        except ConfigError as e:
            problems.append(f"{e}{affected(rids)}")
    for task_cfg, rids in users.values():
        sources = [getattr(task_cfg, k) for k in ("train", "dev", "dev_reference") if getattr(task_cfg, k)]
        if any(is_hub_id(x) for x in sources):
            continue  # a hub dataset id: not downloaded just to check it
        try:
            task = get_task(task_cfg)
            training_task(task_cfg).train_examples()
            task.dev_examples()
            records_fingerprint(task_cfg)
        except PostlabError as e:
            problems.append(f"task {task_cfg.name}{affected(rids)}: {e}")
    if len(problems) == 1 and len(runs) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("problems found before training:\n  " + "\n  ".join(problems))


def _named_inputs(runs: list[tuple[str, RunConfig]]) -> tuple[dict, dict]:
    """(distinct task data -> (its task config, the runs reading it), (model, the key naming it) -> the
    runs naming it): base models, teachers and checkpoints that rejected answers are sampled from."""
    users: dict[str, tuple[Any, list[str]]] = {}
    models: dict[tuple[str, str], list[str]] = {}
    for rid, cfg in runs:
        models.setdefault((cfg.model.name, "model.name"), []).append(rid)
        for i, s in enumerate(cfg.stages):
            key = s.task.model_dump_json(exclude={"generation", "pairs", "overlength"})
            users.setdefault(key, (s.task, []))[1].append(rid)
            if s.teacher:
                models.setdefault((s.teacher, f"stages.{i}.teacher"), []).append(rid)
            if s.task.pairs.rejected_from not in ("stage-start", "base"):
                models.setdefault((s.task.pairs.rejected_from, f"stages.{i}.task.pairs.rejected_from"), []).append(rid)
    return users, models


def check_resume(out: Path, cfg: RunConfig, resume: bool) -> None:
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    if not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another output_dir")
    # Compared as parsed configs, so a postlab version that added a field (with its default) still resumes.
    try:
        same = parse_run_config(yaml.safe_load(saved.read_text())).model_dump() == cfg.model_dump()
    except (ConfigError, yaml.YAMLError):
        same = False
    if not same:
        raise ConfigError(f"{out}/config.yaml differs from the config given; a run resumes only with the same "
                          f"config (choose another output_dir to change it)")


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Train every stage of `cfg`; returns the result (also written to result.json)."""
    out = output_location(cfg.output_dir, "output_dir")
    check_resume(out, cfg, resume)
    if (out / "result.json").is_file():
        log.info("%s: run already complete", out)
        return read_json(out / "result.json")
    for s in cfg.stages:  # fail on a bad task before any model loads (objectives were parsed with the config)
        get_task(s.task)
    if not (out / "config.yaml").is_file():
        check_inputs([("", cfg)])  # (a study checked its runs' inputs already; resuming runs were checked)
    created = not out.exists()
    from .tracking import Trackers

    trackers = Trackers(cfg.tracking, out, out.name) if cfg.tracking and dist.is_main() else None
    try:
        return _run(cfg, out, MetricsLog(out / "metrics.jsonl", trackers))
    except PostlabError:
        if created and dist.is_main() and not _anything_trained(out):
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # a refused run leaves nothing that --resume would trip on
        raise
    finally:
        if trackers is not None:
            trackers.close()
        release_freed_memory()  # the next run in this process starts from an unfragmented heap


def _anything_trained(out: Path) -> bool:
    """Does the run folder hold work worth keeping: a checkpoint or a finished stage?"""
    return any(d.is_dir() and ((d / "done.json").is_file() or existing_dir(d / "checkpoint") is not None)
               for d in out.iterdir()) if out.is_dir() else False


def _run(cfg: RunConfig, out: Path, metrics: MetricsLog) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # every process checked for an earlier run before the main one writes
    with dist.main_only(f"{out}: writing config.yaml"):
        if dist.is_main():
            atomic_write_text(out / "config.yaml", dump_config(cfg))
    t0 = time.perf_counter()
    m = cfg.model
    lm = load_lm(m.name, m.device, m.precision, m.trust_remote_code, m.max_length)
    pending: Path | None = None  # final model of the last completed stage, loaded only if needed
    stages = []
    for i, stage in enumerate(cfg.stages):
        sdir = stage_dir(out, i, stage)
        if (sdir / "done.json").is_file():
            stages.append(read_json(sdir / "done.json"))
            pending = sdir / "model"
            if (pending.is_dir() or not stage.keep_weights) and dist.is_main():
                remove_dir(sdir / "checkpoint")  # a run stopped right after done.json left its checkpoint
            continue
        last = i == len(cfg.stages) - 1
        # one process trains a stage that runs side by side share (study --workers); the others reuse it
        with (lock(f"stage-{cfg.stage_key(i)}") if dist.world_size() == 1 else contextlib.nullcontext()):
            reused = reuse_stage(cfg, i, sdir, metrics, needs_model=not last) if dist.world_size() == 1 else None
            if reused is not None:
                stages.append(reused)
                pending = sdir / "model"
                continue
            if pending is not None:
                lm = load_lm(str(pending), m.device, m.precision, m.trust_remote_code, m.max_length)
                pending = None
            on_cpu = lm.device.type == "cpu"
            with (training_on_cpu(torch.get_num_threads(), f"{out.name}/{sdir.name}") if on_cpu
                  else contextlib.nullcontext()):
                done, lm = run_stage(lm, cfg, i, stage, sdir, metrics, last=last)
            stages.append(done)
            register_stage(cfg, i, sdir)
    result = {"run_id": out.name, "task": cfg.stages[-1].task.name, "metrics": stages[-1]["metrics"], "stages": stages,
              "wall_s": round(time.perf_counter() - t0, 2), "device": stages[-1].get("device"),
              "precision": lm.precision, "cpu": cpu_name(), "versions": versions()}
    with dist.main_only(f"{out}: writing result.json"):
        if dist.is_main():
            atomic_write_json(out / "result.json", result)
    return result
