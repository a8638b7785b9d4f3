"""The one training loop. It knows nothing of any algorithm: it batches tokenized items, computes
policy log-probs at scored positions, attaches cached reference/teacher log-probs, and hands them to
the stage's objective (a pure function) for a loss (one forward: postlab.forward). What it trains with
is a StagePlan (postlab.stage); the steps share one small state (`_Loop`)."""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import __version__, faults
from . import distributed as dist
from .checkpoint import existing_dir, load_checkpoint, save_checkpoint
from .config import StageConfig
from .data import length_grouped_batches
from .decoder import compiled_body
from .errors import TrainingError
from .forward import batch_loss
from .fsdp import strategy as parallel_strategy
from .models import LM, own_trainable_weights
from .progress import bar as progress_bar
from .runlog import MetricsLog

if TYPE_CHECKING:
    from .stage import StagePlan  # (postlab.stage builds the plan and calls train_stage)

log = logging.getLogger("postlab")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Schedule:
    batches: Callable[[int], list[list[int]]]  # epoch -> micro-batches (lists of item indices)
    grad_accum: int
    epochs: int
    max_steps: int | None

    def groups(self, epoch: int) -> list[list[list[int]]]:
        b = self.batches(epoch)
        return [b[s:s + self.grad_accum] for s in range(0, len(b), self.grad_accum)]

    @property
    def total_steps(self) -> int:
        per_epoch = len(self.groups(0))
        return min(per_epoch * self.epochs, 10**12 if self.max_steps is None else self.max_steps)


def make_optimizer(model: torch.nn.Module, cfg: StageConfig, total_steps: int, fused: bool = True):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]  # no optimizer state for frozen weights
    o = cfg.optim
    opt = None
    if fused:
        try:
            opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)
        except (RuntimeError, TypeError):
            pass
    if opt is None:
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[o.schedule]
    sched = get_scheduler(name, opt, num_warmup_steps=int(o.warmup_ratio * total_steps), num_training_steps=total_steps)
    return opt, sched


@dataclass
class Progress:
    """Where a stage is; saved with each checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    group: int = 0  # the next optimizer step's index within the epoch
    tokens: int = 0
    wall_s: float = 0.0
    last_eval: dict = field(default_factory=dict)


@dataclass
class _Loop:
    """What every step of a stage shares, built once by train_stage: the model it trains (lm.model, or
    with fsdp its sharded copy) and how the processes share it, the optimizer and its scheduler, the
    batches, where the stage is, and where dev results and records go."""

    lm: LM
    plan: StagePlan
    par: Any  # distributed.Replicated or fsdp.FullyShard (fsdp.strategy)
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any  # a transformers learning-rate scheduler
    schedule: Schedule
    at: Progress
    metrics: MetricsLog
    evaluate: Callable[[int, bool], dict[str, float]]
    t_start: float  # perf_counter() when the stage started (a resumed stage's earlier time included)


def train_stage(lm: LM, plan: StagePlan, metrics: MetricsLog,
                evaluate: Callable[[int, bool], dict[str, float]]) -> dict:
    """Train `lm.model` in place as `plan` says, resuming from the stage's checkpoint when there is
    one. Returns a summary (steps, tokens, wall time, peak memory, device, the last dev metrics).
    `evaluate(step, final)` gives the dev metrics at a step (`final`: the stage's last evaluation).
    A step's loss, metrics and gradient norm stay on the device until they are read (every
    `log_every` steps, and before a checkpoint, an evaluation and the end): at most one host sync."""
    cfg = plan.cfg
    schedule = Schedule(lambda e: length_grouped_batches([it.length for it in plan.items], cfg.optim.batch_size,
                                                         plan.seed * 1000 + e, cfg.group_by_length),
                        cfg.optim.grad_accum, cfg.epochs, cfg.max_steps)
    total = schedule.total_steps
    if cfg.optim.batch_size < dist.world_size():
        raise TrainingError(f"stage {cfg.name}: optim.batch_size={cfg.optim.batch_size} is smaller than the "
                            f"{dist.world_size()} processes sharing each micro-batch; raise it or launch fewer")
    own_trainable_weights(lm.model)  # before a checkpoint's weights are copied in
    at, saved = _resume(lm, plan, metrics, total)
    par = parallel_strategy(plan.parallel)
    model = par.prepare(lm)  # lm.model, or (fsdp) its sharded copy
    opt, sched = make_optimizer(model, cfg, total, fused=par.fused_optimizer())
    loop = _Loop(lm, plan, par, model, opt, sched, schedule, at, metrics, evaluate, time.perf_counter() - at.wall_s)
    if saved is not None:
        _restore_optimizer(loop, saved)
    if at.step == 0 and (cfg.eval_at_start or total == 0):  # max_steps: 0 evaluates only
        _evaluate(loop, 0.0, final=total == 0)
    model.train()
    bar = progress_bar(total=total, initial=at.step, desc=f"{cfg.name} ({plan.spec.name})", unit="step",
                       dynamic_ncols=True, main_process=dist.is_main())
    pending = _Pending(plan, at, metrics, bar)
    with compiled_body(model, plan.compile), dropout_off(model, _dropout_disabled(plan)):
        _train_epochs(loop, pending)
    pending.flush()
    bar.close()
    par.finish(lm)
    peaks = [round(m, 1) for m in dist.per_process(peak_memory_mb(lm.device))]
    return {"steps": at.step, "tokens": at.tokens, "wall_s": round(time.perf_counter() - loop.t_start, 2),
            "peak_mem_mb": max(peaks), **({"peak_mem_mb_per_process": peaks} if len(peaks) > 1 else {}),
            "device": str(lm.device), "metrics": at.last_eval}


def _dropout_disabled(plan: StagePlan) -> bool:
    if plan.cfg.disable_dropout is not None:
        return plan.cfg.disable_dropout
    return plan.spec.kind == "preference" or plan.spec.needs_reference or plan.spec.needs_teacher


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module, off: bool):
    """With `off`, every dropout of the model (nn.Dropout modules, attention dropout rates) is 0 inside
    the block and restored after it."""
    saved = []
    if off:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                saved.append((m, "p", m.p))
                m.p = 0.0
            elif isinstance(getattr(m, "attention_dropout", None), float):
                saved.append((m, "attention_dropout", m.attention_dropout))
                m.attention_dropout = 0.0
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _train_epochs(loop: _Loop, pending: _Pending) -> None:
    """The epochs and steps of a stage, from where `loop.at` says it is."""
    cfg, at, total = loop.plan.cfg, loop.at, loop.schedule.total_steps
    while at.step < total and at.epoch < cfg.epochs:
        groups = loop.schedule.groups(at.epoch)
        for g in range(at.group, len(groups)):
            if at.step >= total:
                break
            values = _forward_backward(loop, groups[g])
            grad_norm = _optimizer_step(loop)
            at.step += 1
            ep_float = at.epoch + (g + 1) / len(groups)
            pending.add(at.step, ep_float, values, grad_norm, loop.sched.get_last_lr()[0])
            if at.step % cfg.log_every == 0 or at.step == total:
                pending.flush(record=True)
            pending.bar.update(1)
            # (the stage's last step is evaluated and saved once, after the loop, even mid-epoch)
            mid_epoch = g < len(groups) - 1 and at.step < total
            if mid_epoch and cfg.eval_every_steps and at.step % cfg.eval_every_steps == 0:
                pending.flush()
                _evaluate(loop, ep_float, final=False)
            if mid_epoch and cfg.save_every_steps and at.step % cfg.save_every_steps == 0:
                pending.flush()  # (a non-finite loss stops here: no checkpoint holds its update)
                _save(loop, group=g + 1)
        at.epoch, at.group = at.epoch + 1, 0
        pending.flush()
        finished = at.step >= total or at.epoch >= cfg.epochs
        _evaluate(loop, float(at.epoch), final=finished)
        _save(loop, group=0, finished=finished)


class _Pending:
    """Steps whose values are still on the device. `flush` reads them all in one transfer, stops on a
    non-finite loss (naming its step), counts tokens, watches for gradient-norm spikes and, with
    `record`, writes the last step's train record (and the throughput since the last logged step)."""

    def __init__(self, plan: StagePlan, at: Progress, metrics: MetricsLog, bar):
        self.plan, self.at, self.metrics, self.bar = plan, at, metrics, bar
        self.steps: list[tuple[int, float, dict, torch.Tensor, float]] = []
        self.grad_norm_ema: float | None = None
        self.window_tokens, self.window_steps, self.window_t = 0, 0, time.perf_counter()

    def add(self, step: int, epoch: float, values: dict[str, torch.Tensor], grad_norm: torch.Tensor, lr: float) -> None:
        self.steps.append((step, epoch, values, grad_norm, lr))

    def flush(self, record: bool = False) -> None:
        if not self.steps:
            return
        keys = list(self.steps[0][2])
        rows = torch.stack([torch.stack([*(v[k].float() for k in keys), gn.float()])
                            for _, _, v, gn, _ in self.steps]).tolist()  # the one host transfer
        name = self.plan.cfg.name
        for (step, _, _, _, _), row in zip(self.steps, rows):
            rec, gn = dict(zip(keys, row)), row[-1]
            if not math.isfinite(rec["loss"]):
                self.bar.close()
                ckpt = self.plan.checkpoint
                raise TrainingError(f"stage {name}: loss is {rec['loss']} at step {step}; stopped. The last good "
                                    f"checkpoint is {ckpt if existing_dir(ckpt) else 'the stage start'}; "
                                    f"try a lower optim.lr or optim.grad_clip")
            tokens = int(round(rec["tokens"]))
            self.at.tokens += tokens
            self.window_tokens += tokens
            self.window_steps += 1
            if self.grad_norm_ema is not None and gn > 10 * self.grad_norm_ema:
                log.warning("stage %s step %d: gradient norm spike %.3g (running mean %.3g)", name, step, gn,
                             self.grad_norm_ema)
                self.metrics.write({"stage": name, "split": "train", "step": step, "event": "grad_norm_spike",
                                    "grad_norm": gn})
            self.grad_norm_ema = gn if self.grad_norm_ema is None else 0.9 * self.grad_norm_ema + 0.1 * gn
        if record:
            dt = time.perf_counter() - self.window_t
            tps = self.window_tokens / dt if dt > 0 else 0.0
            step, epoch, _, _, lr = self.steps[-1]
            objective = {k: v for k, v in rec.items() if k not in ("loss", "tokens")}
            self.metrics.write({"stage": name, "split": "train", "step": step, "epoch": round(epoch, 4),
                                "loss": rec["loss"], "lr": lr, "grad_norm": gn, "tokens_per_s": round(tps, 1),
                                "step_s": round(dt / max(self.window_steps, 1), 4), "tokens_seen": self.at.tokens,
                                **objective})
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:.0f}")
            self.window_tokens, self.window_steps, self.window_t = 0, 0, time.perf_counter()
        self.steps.clear()


def _resume(lm: LM, plan: StagePlan, metrics: MetricsLog, total: int) -> tuple[Progress, tuple | None]:
    """(where the stage is, the saved optimizer and scheduler states or None). A fresh stage seeds
    torch with the plan's seed; a resumed one loads its checkpoint's weights into `lm.model`."""
    name = plan.cfg.name
    if existing_dir(plan.checkpoint) is None:
        metrics.truncate_after(name, -1)  # a run killed before its first checkpoint starts the stage over
        torch.manual_seed(plan.seed)
        return Progress(), None
    optim_state, sched_state, state = load_checkpoint(plan.checkpoint, lm.model)
    at = Progress(state["step"], state["epoch"], state["group"], state["tokens"], state["wall_s"],
                  state.get("last_eval", {}))
    metrics.truncate_after(name, at.step)
    log.info("stage %s: resuming at step %d/%d (epoch %d)", name, at.step, total, at.epoch + 1)
    written_by = state.get("postlab", "0.1.0 or older")
    if written_by != __version__ and at.step < total:  # another version may order an epoch's batches otherwise
        log.warning("%s: written by postlab %s, resumed by %s: the rest of epoch %d may follow another batch "
                    "order (some examples seen twice or not at all this epoch); delete the checkpoint to train "
                    "stage %s again from its start", existing_dir(plan.checkpoint), written_by, __version__,
                    at.epoch + 1, name)
    return at, (optim_state, sched_state)


def _restore_optimizer(loop: _Loop, saved: tuple) -> None:
    optim_state, sched_state = saved
    ckpt = loop.plan.checkpoint
    if optim_state is None:  # a finished stage's checkpoint: nothing left to train, no optimizer kept
        if loop.at.step < loop.schedule.total_steps:
            raise TrainingError(f"{existing_dir(ckpt)}: the checkpoint of a finished stage (no optimizer state), "
                                f"but the stage now has steps left (did its data change?); delete the checkpoint "
                                f"to train the stage again")
        return
    try:
        loop.par.load_optimizer_state(loop.model, loop.opt, optim_state)
    except TrainingError as e:
        raise TrainingError(f"{existing_dir(ckpt)}: {e}") from None
    loop.sched.load_state_dict(sched_state)


def _forward_backward(loop: _Loop, group: list[list[int]]) -> dict[str, torch.Tensor]:
    """Gradients of one optimizer step's micro-batches, accumulated (each forward weighted by its share
    of its micro-batch). Returns the step's loss, tokens and objective metrics as device tensors,
    summed over processes; nothing here waits for the device."""
    lm, plan = loop.lm, loop.plan
    cfg, device = plan.cfg, lm.device
    values: dict[str, torch.Tensor] = {}
    tokens = 0
    for full_idx in group:
        # this process's share of the micro-batch (all of it in one process), in forwards of at most
        # forward_rows rows
        for idx, share in loop.par.forwards(plan.items, full_idx, cfg.optim.forward_rows or cfg.optim.batch_size):
            loss, m, n_tokens = batch_loss(lm, plan, idx)
            weight = share / len(group)
            (loss * weight).backward()
            faults.point("step")
            # every key on every process (a weight-0 forward keeps the processes in step), so they sum alike
            for k, v in {"loss": loss, **m}.items():
                values[k] = values.get(k, 0.0) + v.detach().float() * weight
            tokens += n_tokens if share else 0
    # torch.full, not torch.tensor: the value travels as a kernel argument, not as a blocking copy
    values = {"loss": values.pop("loss"), "tokens": torch.full((), float(tokens), device=device), **values}
    if dist.world_size() > 1:  # the logged values are the whole global batch's
        keys = list(values)
        summed = dist.sum_tensor(torch.stack([values[k] for k in keys]))
        values = dict(zip(keys, summed.unbind()))
    return values


def _optimizer_step(loop: _Loop) -> torch.Tensor:
    """Sum the gradients over processes (so every process takes the same step), clip, step, schedule,
    zero; returns the gradient norm before clipping (a device tensor)."""
    params = [p for p in loop.model.parameters() if p.requires_grad]
    if dist.world_size() > 1:
        loop.par.reduce_gradients(params)
    gn = loop.par.clip_gradients(params, loop.plan.cfg.optim.grad_clip or float("inf"))
    loop.opt.step()
    loop.sched.step()
    loop.opt.zero_grad(set_to_none=True)
    return gn


def _evaluate(loop: _Loop, epoch: float, final: bool) -> None:
    """Evaluate on the main process (the others wait) and log a dev record."""
    at, stage = loop.at, loop.plan.cfg.name
    with loop.par.whole_model(loop.lm):
        with dist.main_only(f"stage {stage}: the evaluation at step {at.step}"):
            if dist.is_main():
                t = time.perf_counter()
                at.last_eval = loop.evaluate(at.step, final)
                loop.metrics.write({"stage": stage, "split": "dev", "step": at.step, "epoch": round(epoch, 4),
                                    "eval_s": round(time.perf_counter() - t, 2), **at.last_eval})


def _save(loop: _Loop, group: int, finished: bool = False) -> None:
    """Checkpoint the weights, optimizer and scheduler and where the stage is (main process writes).
    A `finished` stage's checkpoint keeps no optimizer state: a run resumes only with the same
    config, so nothing will train from it again (for AdamW in fp32 that is twice the weights' size)."""
    at = loop.at
    # gathered to the main process
    weights, optim_state = loop.par.checkpoint_state(loop.model, None if finished else loop.opt)
    with dist.main_only(f"stage {loop.plan.cfg.name}: the checkpoint at step {at.step}"):
        if dist.is_main():
            save_checkpoint(loop.plan.checkpoint, weights, optim_state, loop.sched,
                            {"step": at.step, "epoch": at.epoch, "group": group, "tokens": at.tokens,
                             "wall_s": time.perf_counter() - loop.t_start, "last_eval": at.last_eval,
                             "postlab": __version__})
