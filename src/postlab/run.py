"""A run: a list of stages trained one after another in one directory, resumable at any point.

    <output_dir>/config.yaml       the validated config
    <output_dir>/metrics.jsonl     train and dev records of every stage
    <output_dir>/<i>-<stage>/      checkpoint/, model/ (final weights), done.json, eval outputs
    <output_dir>/result.json       written atomically when the last stage is done
"""
from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import replace
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import distributed as dist
from . import faults
from .allocator import release_freed_memory
from .cache import cached_evaluation, location, lock, tokenizer_fingerprint
from .checkpoint import (atomic_write_json, atomic_write_text, existing_dir, read_json, remove_dir, replace_dir,
                         trainable_state)
from .config import ModelConfig, RunConfig, StageConfig, dump_config, parse_run_config
from .data import tokenize
from .errors import ConfigError, DataError, PostlabError
from .merge import extrapolate_in_place
from .logprobs import cached_token_logps
from .hardware import cpu_name  # noqa: F401 (re-exported)
from .models import LM, load_lm
from .objectives import get_objective, parse_args
from .occupancy import training_on_cpu
from .validate import output_location
from .parameterizations import adapter_of, count_parameters, describe, prepare, save_model
from .preferences import build_pairs, needs_sampler
from .tasks import evaluate_task, get_task, records_fingerprint, training_task
from .runlog import MetricsLog, read_jsonl
from .train import StageInputs, StagePlan, train_stage

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


def stage_dir(out: Path, i: int, stage: StageConfig) -> Path:
    return out / f"{i}-{stage.name}"


def stage_items(lm: LM, stage: StageConfig, model_cfg: ModelConfig | None = None):
    """The stage's training data, tokenized: prompt/completion examples for SFT objectives,
    prompt/chosen/rejected pairs for preference objectives (built by `preferences.build_pairs`;
    a task that samples its rejected answers samples them from `lm` (rejected_from: stage-start),
    the run's base model `model_cfg.name` (base), or a checkpoint path)."""
    task = get_task(stage.task)
    spec = get_objective(stage.objective.name)
    source = training_task(stage.task)  # the task, or its train_records file
    if spec.kind == "preference":
        pcfg, sampler = stage.task.pairs, None
        if needs_sampler(source):
            src = pcfg.rejected_from
            if src == "stage-start":
                sampler = lm
            else:
                if src == "base" and model_cfg is None:
                    raise ConfigError(f"stage {stage.name}: task.pairs.rejected_from=base needs the run's model config")
                m = model_cfg or ModelConfig()
                name = m.name if src == "base" else src
                log.info("stage %s: sampling rejected answers from %s", stage.name, name)
                sampler = load_lm(name, m.device, m.precision, m.trust_remote_code, m.max_length)
        raw = build_pairs(source, pcfg, sampler, location("samples"))
    else:
        raw = source.train_examples()
    items, report = tokenize(raw, lm.tokenizer, lm.max_length, stage.task.overlength,
                             append_eos=task.append_eos, source=f"stage {stage.name} ({stage.task.name} train)",
                             max_completion_tokens=stage.task.max_completion_tokens)
    if report.truncated:
        log.warning("stage %s: %d of %d examples were longer than %d tokens; their prompts were truncated",
                    stage.name, report.truncated, report.examples, lm.max_length)
    if spec.kind == "preference":
        items = pairs_with_signal(items, stage.name)
    return task, spec, items


def pairs_with_signal(items: list, stage: str) -> list:
    """Preference pairs whose chosen and rejected answers differ once tokenized (and cut to
    max_completion_tokens): an identical pair has no preference to learn (its loss gradient is 0).
    Such pairs are dropped with a warning naming them; if none is left the stage is refused."""
    same = [it.id for it in items if it.completions[0] == it.completions[1]]
    if len(same) == len(items):
        raise DataError(f"stage {stage}: all {len(items)} preference pairs have the same chosen and rejected answer "
                        f"(after tokenizing and task.max_completion_tokens), so there is nothing to learn; "
                        f"check the data's chosen/rejected columns (first: {same[:3]})")
    if same:
        log.warning("stage %s: %d of %d preference pairs have the same chosen and rejected answer and were dropped "
                    "(first: %s)", stage, len(same), len(items), same[:3])
        return [it for it in items if it.completions[0] != it.completions[1]]
    return items


def stage_data(lm: LM, cfg: RunConfig, stage: StageConfig):
    """(task, objective spec, tokenized training items, cached constants): per-token log-probs of the
    reference (`reference`) and teacher (`teacher`) where the objective needs them, and for objectives
    over whole distributions the top-k of that model (`topk`). The reference is the policy as the
    stage begins, or the run's base model (`reference: base`); the teacher is `stage.teacher`. Each is
    loaded, scored once (cached on disk) and dropped: no second model stays in memory for training."""
    task, spec, items = stage_items(lm, stage, cfg.model)
    m = cfg.model
    cached: dict = {}
    for role, needed in (("reference", spec.needs_reference), ("teacher", spec.needs_teacher)):
        if not (needed or spec.topk_of == role):
            continue
        k = parse_args(spec, stage.objective.args).topk if spec.topk_of == role else 0
        if role == "teacher":
            if stage.teacher is None:
                raise ConfigError(f"stage {stage.name}: objective {spec.name} needs a teacher; set teacher: MODEL")
            source = load_lm(stage.teacher, m.device, m.precision, m.trust_remote_code, m.max_length)
            if tokenizer_fingerprint(source.tokenizer) != tokenizer_fingerprint(lm.tokenizer):
                raise ConfigError(f"stage {stage.name}: teacher {stage.teacher} has another tokenizer than the "
                                  f"student; token-level distillation needs the same vocabulary")
        elif stage.reference == "base":
            source = load_lm(m.name, m.device, m.precision, m.trust_remote_code, m.max_length)
        else:
            source = lm
        got = cached_token_logps(source, items, role, stage.eval_batch_size, topk=k)
        cached[role], *topk = got if k else (got,)
        if k:
            cached["topk"] = tuple(topk)
        del source
    return task, spec, items, cached


def check_inputs(runs: list[tuple[str, RunConfig]]) -> None:
    """Every input the runs name, checked before anything is written or loaded: each distinct local
    data set read (train, dev and the files tasks add), each model named (base, teachers, samplers)
    found. Raises ConfigError listing the problems and the runs they affect."""
    from .hub import is_hub_id
    from .validate import check_model

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
    for s in cfg.stages:  # fail on a bad objective/task name before any model loads
        parse_args(get_objective(s.objective.name), s.objective.args)
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


def _stage_registry(key: str) -> Path:
    return location("stages") / f"{key}.json"


def register_stage(cfg: RunConfig, i: int, sdir: Path) -> None:
    """Record that `sdir` holds a completed stage `i` of `cfg`, for `reuse_stage` in later runs."""
    if cfg.reuse_stages and dist.is_main():
        atomic_write_json(_stage_registry(cfg.stage_key(i)), {"stage_dir": str(sdir.resolve())})


def reuse_stage(cfg: RunConfig, i: int, sdir: Path, metrics: MetricsLog, needs_model: bool) -> dict | None:
    """Copy a completed identical stage (same model, seed and stages up to this one) from an earlier
    run instead of training it again: an SFT->DPO run in a study shares its SFT stage with the
    SFT-only run. Training is deterministic for a given seed on CPU; on GPU the copy is one valid
    sample of the same recipe. Returns its done.json (marked `reused_from`), or None."""
    import shutil

    if not cfg.reuse_stages:
        return None
    entry = _stage_registry(cfg.stage_key(i))
    if not entry.is_file():
        return None
    try:
        src = Path(read_json(entry)["stage_dir"])
    except (PostlabError, KeyError):
        return None
    if src == sdir.resolve() or not (src / "done.json").is_file() or (needs_model and not (src / "model").is_dir()):
        return None
    stage = cfg.stages[i]
    records = [rec for rec in read_jsonl(src.parent / "metrics.jsonl") if rec.get("stage") == stage.name]
    tmp = sdir.with_name(sdir.name + ".reuse-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoint", "done.json"),
                    copy_function=_link_or_copy)
    metrics.truncate_after(stage.name, -1)
    for rec in records:
        metrics.write(rec)
    done = {**read_json(src / "done.json"), "reused_from": str(src)}
    replace_dir(tmp, sdir)
    atomic_write_json(sdir / "done.json", done)  # last: marks the stage complete
    log.info("stage %s: identical to %s (same model, seed and stages); reused instead of trained", stage.name, src)
    return done


def _link_or_copy(src: str, dst: str) -> None:
    import os
    import shutil

    try:
        os.link(src, dst)  # model files are written once and never modified in place
    except OSError:
        shutil.copy2(src, dst)


def run_stage(lm: LM, cfg: RunConfig, i: int, stage: StageConfig, sdir: Path, metrics: MetricsLog,
              last: bool = True) -> tuple[dict, LM]:
    """Train stage `i`; returns its done.json record and the LM the next stage starts from (the
    trained model, and as `source` where its base weights are on disk: what an adapter names)."""
    torch.manual_seed(cfg.seed + i)  # an adapter's initialisation is part of the seeded run
    model, merged = prepare(lm.model, stage.parameterization)
    lm = replace(lm, model=model)
    if merged:
        # The earlier adapter was merged: this stage's base exists only in memory, so write it out
        # (a new adapter must name a base that loads from disk).
        base = lm.model.get_base_model() if adapter_of(lm.model) is not None else lm.model
        with dist.main_only(f"stage {stage.name}: writing its base model"):
            if dist.is_main():
                base.save_pretrained(sdir / "base", safe_serialization=True)
                lm.tokenizer.save_pretrained(sdir / "base")
        lm = replace(lm, source=str(sdir / "base"))
    log.info("stage %s: %s, objective %s, %s", stage.name, stage.parameterization.method, stage.objective.name,
             describe(lm.model))
    t_prepare = time.perf_counter()
    with dist.main_first():  # the main process fills the caches (pairs, reference log-probs)
        task, spec, items, cached = stage_data(lm, cfg, stage)
    args = parse_args(spec, stage.objective.args)
    sdir.mkdir(parents=True, exist_ok=True)

    def settings_of(t) -> dict:
        return {"task": t.cfg.evaluation_settings(), "batch_size": stage.eval_batch_size,
                **({"records": records_fingerprint(t.cfg)} if t.cfg.score_records else {})}

    curve_task = (get_task(stage.task.model_copy(update={"dev_limit": min(stage.curve_examples, stage.task.dev_limit
                                                                             or stage.curve_examples)}))
                  if stage.curve_examples else None)

    def evaluate(step: int, final: bool = True) -> dict[str, float]:
        faults.point("eval")
        if curve_task is not None and step > 0 and not final:  # a point of the learning curve
            return cached_evaluation(lm, settings_of(curve_task), sdir / "curve" / f"step-{step:06d}",
                                     lambda out: evaluate_task(curve_task, lm, out, stage.eval_batch_size))
        # The starting model's evaluation (the zero-shot one in a run's first stage) keeps its own
        # files: a study report compares trained arms with it example by example.
        start = step == 0 and stage.max_steps != 0  # (max_steps: 0 evaluates the start model as the stage's result)
        return cached_evaluation(lm, settings_of(task), sdir / ("eval-start" if start else "eval"),
                                 lambda out: evaluate_task(task, lm, out, stage.eval_batch_size))

    prepare_s = round(time.perf_counter() - t_prepare, 2)  # data, sampled pairs, reference pass
    start = None
    if stage.expo_lambda is not None:  # ExPO needs the stage's starting weights
        start = {k: v.clone() for k, v in trainable_state(lm.model).items()}
    plan = StagePlan(stage, spec, args, items, sdir, cfg.seed * 100 + i, StageInputs(**cached), cfg.parallel,
                     cfg.model.compile)
    summary = train_stage(lm, plan, metrics, evaluate)
    if start is not None:
        extrapolate_in_place(lm.model, start, stage.expo_lambda)
        summary["metrics"] = evaluate(summary["steps"])
        metrics.write({"stage": stage.name, "split": "dev", "step": summary["steps"], "expo_lambda": stage.expo_lambda,
                       **summary["metrics"]})
    saves_model = stage.save_model or not last
    if saves_model:  # later stages (and their resumption) start from this model
        with dist.main_only(f"stage {stage.name}: writing its model"):
            if dist.is_main():
                save_model(lm.model, lm.tokenizer, sdir / "model", lm.source)
        if adapter_of(lm.model) is None:
            lm = replace(lm, source=str(sdir / "model"))
    trainable, total = count_parameters(lm.model)
    done = {"name": stage.name, "objective": stage.objective.name, "parameterization": stage.parameterization.method,
            "trainable_params": trainable, "total_params": total, "examples": len(items), **summary,
            "train_s": summary["wall_s"], "prepare_s": prepare_s, "wall_s": round(summary["wall_s"] + prepare_s, 2)}
    with dist.main_only(f"stage {stage.name}: writing done.json"):
        if dist.is_main():
            atomic_write_json(sdir / "done.json", done)
            # its checkpoint's weights duplicate model/ (~4 bytes per parameter in FFT), or nothing will read them
            if saves_model or not stage.keep_weights:
                remove_dir(plan.checkpoint)
        faults.point("stage-done")
    return done, lm
