"""A stage: data (task) + objective + parameterization + schedule, trained in its own folder of a run
(``<run>/<i>-<name>/``). Everything about one stage lives here except the loop that trains it
(:mod:`postlab.train`):

* its data: the task's training examples, or preference pairs, tokenized (:func:`stage_items`);
* its preparation: the reference and teacher passes its objective needs, cached (:func:`stage_inputs`);
* its plan: what the loop trains with (:class:`StagePlan`, :class:`StageInputs`); the objective's
  options were parsed once, when the config was validated (``ObjectiveConfig.typed_args``), and the
  plan carries them to the loss;
* its reuse: an identical stage of another run (same key, ``RunConfig.stage_key``: the model, the
  seed and the stages so far, computed without torch for the planner) is copied instead of trained
  again (:func:`register_stage`, :func:`reuse_stage`);
* :func:`run_stage`: prepare, train, evaluate, write the model and ``done.json``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from . import distributed as dist
from . import faults
from .cache import cached_evaluation, location, tokenizer_fingerprint
from .checkpoint import (
    atomic_write_json,
    load_trainable,
    read_json,
    remove_dir,
    replace_dir,
    save_trainable,
    trainable_state,
)
from .config import ModelConfig, RunConfig, StageConfig
from .data import Tokenized, tokenize
from .diagnose import stage_against_reference
from .errors import ConfigError, DataError, PostlabError
from .logprobs import cached_token_logps
from .merge import extrapolate_in_place
from .models import LM, load_lm
from .objectives import ObjectiveArgs, ObjectiveSpec
from .parameterizations import adapter_of, count_parameters, describe, prepare, save_model
from .preferences import build_pairs, build_unpaired, needs_sampler, with_mismatched
from .runlog import MetricsLog, read_jsonl
from .tasks import evaluate_task, get_task, records_fingerprint, training_task
from .train import train_stage

log = logging.getLogger("postlab")


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

def cached_logps(cache: list[list[torch.Tensor]], idx: list[int], n_slots: int) -> torch.Tensor:
    """Cached per-token values (log-probs, or top-k rows of them) laid out like a score batch's
    answers (completion-major): [answers, slots, ...]."""
    n_comp = len(cache[idx[0]])
    first = cache[idx[0]][0]
    out = torch.zeros(n_comp * len(idx), n_slots, *first.shape[1:],
                      dtype=torch.long if first.dtype == torch.int32 else first.dtype)
    for k in range(n_comp):
        for b, i in enumerate(idx):
            t = cache[i][k]
            out[k * len(idx) + b, :len(t)] = t
    return out


@dataclass
class StageInputs:
    """The cached constants an objective declares it needs (its roles), per training item: per-token
    log-probs of the reference and of the teacher, and (log-probs, token ids) of the top-k tokens of
    the one the objective compares whole distributions with. Computed once before the stage."""

    reference: list[list[torch.Tensor]] | None = None
    teacher: list[list[torch.Tensor]] | None = None
    topk: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]] | None = None
    labels: list[bool] | None = None  # unpaired items: desirable or not

    def for_batch(self, idx: list[int], n_slots: int, device: torch.device) -> tuple[dict, torch.Tensor | None]:
        """(the objective's cached fields laid out like the batch's log-probs, and `desirable` [items]
        for unpaired items; the top-k token ids to score the policy at, or None)."""
        # non_blocking: a blocking copy to a GPU waits for the device to finish the work queued so far
        cached = {name: cached_logps(c, idx, n_slots).to(device, non_blocking=True)
                  for name, c in (("reference", self.reference), ("teacher", self.teacher)) if c is not None}
        if self.labels is not None:
            cached["desirable"] = torch.tensor([self.labels[i] for i in idx]).to(device, non_blocking=True)
        if self.topk is None:
            return cached, None
        cached["topk_target"] = cached_logps(self.topk[0], idx, n_slots).to(device, non_blocking=True)
        return cached, cached_logps(self.topk[1], idx, n_slots).to(device, non_blocking=True)


@dataclass
class StagePlan:
    """Everything a stage trains with, built once (run_stage builds it): its config, whose objective
    carries its parsed args, its tokenized items and the cached inputs of its objective."""

    cfg: StageConfig
    items: list[Tokenized]
    stage_dir: Path
    seed: int
    inputs: StageInputs = field(default_factory=StageInputs)
    parallel: str = "ddp"  # how several processes share the work (ddp or fsdp; see distributed.py, fsdp.py)
    compile: str | None = None  # a torch.compile backend for the body's training forwards (model.compile)

    @cached_property
    def spec(self) -> ObjectiveSpec:
        return self.cfg.objective.spec

    @property
    def args(self) -> ObjectiveArgs:
        return self.cfg.objective.typed_args

    @property
    def checkpoint(self) -> Path:
        return self.stage_dir / "checkpoint"


# --------------------------------------------------------------------------------------------
# Data and preparation
# --------------------------------------------------------------------------------------------

def stage_dir(out: Path, i: int, stage: StageConfig) -> Path:
    return out / f"{i}-{stage.name}"


def _rejected_sampler(lm: LM, stage: StageConfig, model_cfg: ModelConfig | None) -> LM:
    """The model a task that samples its rejected answers samples them from: `lm`
    (rejected_from: stage-start), the run's base model `model_cfg.name` (base), or a checkpoint path."""
    src = stage.task.pairs.rejected_from
    if src == "stage-start":
        return lm
    if src == "base" and model_cfg is None:
        raise ConfigError(f"stage {stage.name}: task.pairs.rejected_from=base needs the run's model config")
    m = model_cfg or ModelConfig()
    name = m.name if src == "base" else src
    log.info("stage %s: sampling rejected answers from %s", stage.name, name)
    return load_lm(name, m.device, m.precision, m.trust_remote_code, m.max_length)


def stage_items(lm: LM, stage: StageConfig, model_cfg: ModelConfig | None = None):
    """(the stage's task, its training data tokenized): prompt/completion examples for SFT objectives,
    prompt/chosen/rejected pairs for preference objectives (built by `preferences.build_pairs`;
    sampled rejected answers come from `_rejected_sampler`), labelled completions for unpaired ones
    (`preferences.build_unpaired`), each with a partner's completion where the objective needs a KL
    baseline (`preferences.with_mismatched`)."""
    task = get_task(stage.task)
    spec = stage.objective.spec
    source = training_task(stage.task)  # the task, or its train_records file
    sampler = _rejected_sampler(lm, stage, model_cfg) if spec.kind != "sft" and needs_sampler(source) else None
    raw = (source.train_examples() if spec.kind == "sft" else
           build_pairs(source, stage.task.pairs, sampler, location("samples")) if spec.kind == "preference" else
           build_unpaired(source, stage.task.pairs, sampler, location("samples")))
    items, report = tokenize(raw, lm.tokenizer, lm.max_length, stage.task.overlength,
                             append_eos=task.append_eos, source=f"stage {stage.name} ({stage.task.name} train)",
                             max_completion_tokens=stage.task.max_completion_tokens)
    if report.truncated:
        log.warning("stage %s: %d of %d examples were longer than %d tokens; their prompts were truncated",
                    stage.name, report.truncated, report.examples, lm.max_length)
    if spec.kind == "preference":
        return task, pairs_with_signal(items, stage.name)
    return task, with_mismatched(items, lm.max_length) if spec.needs_kl_baseline else items


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


def stage_inputs(lm: LM, m: ModelConfig, stage: StageConfig, items: list[Tokenized]) -> StageInputs:
    """Per-token log-probs of the reference (`reference`) and teacher (`teacher`) where the objective
    needs them, and for objectives over whole distributions the top-k of that model (`topk`). The
    reference is the policy as the stage begins, or the run's base model (`reference: base`); the
    teacher is `stage.teacher`. Each is loaded, scored once (cached on disk) and dropped: no second
    model stays in memory for training."""
    spec = stage.objective.spec
    cached: dict = {}
    for role, needed in (("reference", spec.needs_reference), ("teacher", spec.needs_teacher)):
        if not (needed or spec.topk_of == role):
            continue
        k = stage.objective.typed_args.topk if spec.topk_of == role else 0
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
    return StageInputs(**cached, labels=[bool(it.label) for it in items] if spec.kind == "unpaired" else None)


# --------------------------------------------------------------------------------------------
# Reuse: an identical stage of an earlier run is copied, not trained again
# --------------------------------------------------------------------------------------------

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


TRAINED = "trained.safetensors"  # an ExPO stage's weights as trained, before the extrapolation


def _trained_registry(cfg: RunConfig, i: int) -> Path:
    return location("stages") / f"trained-{cfg.stage_key(i, trained=True)}.json"


def keep_training(cfg: RunConfig, i: int, sdir: Path, model) -> None:
    """An ExPO stage keeps its trained weights (`trained.safetensors`, before the extrapolation) and
    records them, so that a λ sweep trains once per seed (`reuse_training`)."""
    if dist.is_main():
        save_trainable(sdir / TRAINED, model)
        if cfg.reuse_stages:
            atomic_write_json(_trained_registry(cfg, i), {"stage_dir": str(sdir.resolve())})


def reuse_training(lm: LM, cfg: RunConfig, i: int, metrics: MetricsLog) -> dict | None:
    """ExPO without training: where an earlier run trained this very stage with another expo_lambda
    (same model, seed and stages so far), its trained weights are loaded into `lm.model` and its
    training records copied. Returns the training summary (marked `training_reused_from`), or None."""
    if not cfg.reuse_stages or not _trained_registry(cfg, i).is_file():
        return None
    try:
        src = Path(read_json(_trained_registry(cfg, i))["stage_dir"])
        done = read_json(src / "done.json")
    except (PostlabError, KeyError):
        return None
    if not (src / TRAINED).is_file():
        return None
    load_trainable(src / TRAINED, lm.model)
    stage = cfg.stages[i]
    metrics.truncate_after(stage.name, -1)
    for rec in read_jsonl(src.parent / "metrics.jsonl"):
        if rec.get("stage") == stage.name and "expo_lambda" not in rec:  # its own extrapolation's is not ours
            metrics.write(rec)
    log.info("stage %s: trained as in %s (only expo_lambda differs); extrapolating without training", stage.name, src)
    keys = ("steps", "tokens", "wall_s", "peak_mem_mb", "device")
    return {**{k: done[k] for k in keys if k in done}, "metrics": {}, "training_reused_from": str(src)}


def _link_or_copy(src: str, dst: str) -> None:
    import os
    import shutil

    try:
        os.link(src, dst)  # model files are written once and never modified in place
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------
# Training a stage
# --------------------------------------------------------------------------------------------

def _parameterized(lm: LM, stage: StageConfig, sdir: Path) -> LM:
    """`lm` with the stage's parameterization applied; where an earlier adapter was merged, this
    stage's base exists only in memory, so it is written out (a new adapter must name a base on disk)."""
    model, merged = prepare(lm.model, stage.parameterization)
    lm = replace(lm, model=model)
    if not merged:
        return lm
    base = lm.model.get_base_model() if adapter_of(lm.model) is not None else lm.model
    with dist.main_only(f"stage {stage.name}: writing its base model"):
        if dist.is_main():
            base.save_pretrained(sdir / "base", safe_serialization=True)
            lm.tokenizer.save_pretrained(sdir / "base")
    return replace(lm, source=str(sdir / "base"))


def _evaluator(lm: LM, stage: StageConfig, task, sdir: Path) -> Callable[[int, bool], dict[str, float]]:
    """evaluate(step, final): the dev metrics of `lm` at a step, cached by weights and settings."""
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

    return evaluate


def run_stage(lm: LM, cfg: RunConfig, i: int, stage: StageConfig, sdir: Path, metrics: MetricsLog,
              last: bool = True) -> tuple[dict, LM]:
    """Train stage `i`; returns its done.json record and the LM the next stage starts from (the
    trained model, and as `source` where its base weights are on disk: what an adapter names)."""
    torch.manual_seed(cfg.seed + i)  # an adapter's initialisation is part of the seeded run
    lm = _parameterized(lm, stage, sdir)
    log.info("stage %s: %s, objective %s, %s", stage.name, stage.parameterization.method, stage.objective.name,
             describe(lm.model))
    t_prepare = time.perf_counter()
    with dist.main_first():  # the main process fills the caches (pairs, reference log-probs)
        task, items = stage_items(lm, stage, cfg.model)
        inputs = stage_inputs(lm, cfg.model, stage, items)
    sdir.mkdir(parents=True, exist_ok=True)
    evaluate = _evaluator(lm, stage, task, sdir)
    prepare_s = round(time.perf_counter() - t_prepare, 2)  # data, sampled pairs, reference pass
    start, summary = None, None
    if stage.expo_lambda is not None:  # ExPO needs the stage's starting weights
        start = {k: v.clone() for k, v in trainable_state(lm.model).items()}
        summary = reuse_training(lm, cfg, i, metrics)
    plan = StagePlan(stage, items, sdir, cfg.seed * 100 + i, inputs, cfg.parallel, cfg.model.compile)
    if summary is None:
        summary = train_stage(lm, plan, metrics, evaluate)
        if start is not None:
            keep_training(cfg, i, sdir, lm.model)
    if start is not None:
        extrapolate_in_place(lm.model, start, stage.expo_lambda)
        summary["metrics"] = evaluate(summary["steps"])
        metrics.write({"stage": stage.name, "split": "dev", "step": summary["steps"], "expo_lambda": stage.expo_lambda,
                       **summary["metrics"]})
    if stage.against_reference:
        extra = stage_against_reference(lm, cfg, i, sdir, task)
        summary["metrics"] = {**summary["metrics"], **extra}
        metrics.write({"stage": stage.name, "split": "dev", "step": summary["steps"], **extra})
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
