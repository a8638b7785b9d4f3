"""The one training loop. It knows nothing of any algorithm: it batches tokenized items, computes
policy log-probs at scored positions, attaches cached reference/teacher log-probs, and hands them to
the stage's objective (a pure function) for a loss."""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import distributed as dist
from . import faults
from .checkpoint import existing_dir, load_checkpoint, save_checkpoint
from .config import StageConfig
from .data import Tokenized, length_grouped_batches, score_batch
from .errors import TrainingError
from .fsdp import strategy as parallel_strategy
from .logprobs import score
from .models import LM
from .objectives import ObjectiveArgs, ObjectiveSpec, PairLogps, TokenLogps

log = logging.getLogger("postlab")


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (flushed per line)."""

    def __init__(self, path: Path, trackers=None):
        self.path = path
        self.trackers = trackers  # postlab.tracking.Trackers: TensorBoard / MLflow views of the records
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop records of `stage` logged after its checkpoint (they will be logged again)."""
        if not dist.is_main() or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("stage") == stage and rec.get("step", 0) > step:
                continue
            keep.append(line)
        from .checkpoint import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


def objective_inputs(spec: ObjectiveSpec, logps, mask, n_items: int, **cached) -> TokenLogps | PairLogps:
    """The objective's input: `cached` holds the optional TokenLogps fields (reference, teacher,
    topk_policy, topk_target), laid out like `logps`."""
    if spec.kind == "sft":
        return TokenLogps(logps, mask, **cached)

    def part(sl):
        return TokenLogps(logps[sl], mask[sl], **{k: None if v is None else v[sl] for k, v in cached.items()})

    return PairLogps(part(slice(0, n_items)), part(slice(n_items, 2 * n_items)))


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


def train_stage(lm: LM, cfg: StageConfig, spec: ObjectiveSpec, args: ObjectiveArgs, items: list[Tokenized],
                stage_dir: Path, seed: int, metrics: MetricsLog, evaluate: Callable[[int], dict[str, float]],
                reference: list[list[torch.Tensor]] | None = None,
                teacher: list[list[torch.Tensor]] | None = None,
                topk: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]] | None = None,
                parallel: str = "ddp") -> dict:
    """Train `lm.model` in place on `items` with `spec`; resumes from `stage_dir/checkpoint` when
    present. Returns a summary (steps, tokens, wall time, peak memory, last losses, eval metrics).
    `reference`/`teacher`: cached per-token log-probs; `topk`: cached (log-probs, token ids) of the
    reference's or teacher's k most likely tokens at each completion position. `parallel`: how
    several processes share the work (ddp or fsdp; see distributed.py and fsdp.py)."""
    device = lm.device
    lengths = [it.length for it in items]
    schedule = Schedule(lambda e: length_grouped_batches(lengths, cfg.optim.batch_size, seed * 1000 + e,
                                                         cfg.group_by_length),
                        cfg.optim.grad_accum, cfg.epochs, cfg.max_steps)
    total = schedule.total_steps
    if cfg.optim.batch_size < dist.world_size():
        raise TrainingError(f"stage {cfg.name}: optim.batch_size={cfg.optim.batch_size} is smaller than the "
                            f"{dist.world_size()} processes sharing each micro-batch; raise it or launch fewer")
    ckpt = stage_dir / "checkpoint"
    step, epoch, group0, tokens, wall0 = 0, 0, 0, 0, 0.0
    last_eval: dict[str, float] = {}
    resumed = existing_dir(ckpt) is not None
    if resumed:
        optim_state, sched_state, state = load_checkpoint(ckpt, lm.model)
        step, epoch, group0, tokens, wall0 = (state["step"], state["epoch"], state["group"], state["tokens"], state["wall_s"])
        last_eval = state.get("last_eval", {})
        metrics.truncate_after(cfg.name, step)
        log.info("stage %s: resuming at step %d/%d (epoch %d)", cfg.name, step, total, epoch + 1)
    else:
        metrics.truncate_after(cfg.name, -1)  # a run killed before its first checkpoint starts the stage over
        torch.manual_seed(seed)
    par = parallel_strategy(parallel)
    model = par.prepare(lm)  # lm.model, or (fsdp) its sharded copy
    opt, sched = make_optimizer(model, cfg, total, fused=par.fused_optimizer())
    if resumed:
        try:
            par.load_optimizer_state(model, opt, optim_state)
        except TrainingError as e:
            raise TrainingError(f"{existing_dir(ckpt)}: {e}") from None
        sched.load_state_dict(sched_state)

    t_start = time.perf_counter() - wall0

    def checkpoint(ep: int, group: int) -> None:
        weights, optim_state = par.checkpoint_state(model, opt)  # gathered to the main process
        if dist.is_main():
            save_checkpoint(ckpt, weights, optim_state, sched, {"step": step, "epoch": ep, "group": group, "tokens": tokens,
                                                      "wall_s": time.perf_counter() - t_start, "last_eval": last_eval})
        dist.barrier()

    def run_eval(ep_float: float) -> None:
        nonlocal last_eval
        with par.whole_model(lm):
            if dist.is_main():  # the other processes wait at the barrier
                t = time.perf_counter()
                last_eval = evaluate(step)
                metrics.write({"stage": cfg.name, "split": "dev", "step": step, "epoch": round(ep_float, 4),
                               "eval_s": round(time.perf_counter() - t, 2), **last_eval})
            dist.barrier()

    if step == 0 and (cfg.eval_at_start or total == 0):  # max_steps: 0 evaluates only
        run_eval(0.0)
    model.train()
    pad = lm.tokenizer.pad_token_id
    bar = tqdm(total=total, initial=step, desc=f"{cfg.name} ({spec.name})", unit="step", dynamic_ncols=True,
               disable=not dist.is_main())
    grad_norm_ema, window_tokens, window_t = None, 0, time.perf_counter()
    while step < total and epoch < cfg.epochs:
        groups = schedule.groups(epoch)
        for g in range(group0, len(groups)):
            if step >= total:
                break
            loss_sum, step_metrics, step_tokens = 0.0, {}, 0
            n_micro = len(groups[g])
            for full_idx in groups[g]:
                # this process's share of the micro-batch (all of it in a single process), in forwards
                # of at most forward_rows rows, each weighted by its part of the micro-batch
                for idx, share in par.forwards(items, full_idx, cfg.optim.forward_rows or cfg.optim.batch_size):
                    batch = score_batch([items[i] for i in idx], pad).to(device)
                    cached = {name: cached_logps(c, idx, batch.n_slots).to(device)
                              for name, c in (("reference", reference), ("teacher", teacher)) if c is not None}
                    if topk is None:
                        logps, mask = score(lm, batch)
                    else:  # the policy's log-probs at the cached top-k tokens of each position
                        cached["topk_target"] = cached_logps(topk[0], idx, batch.n_slots).to(device)
                        logps, mask, cached["topk_policy"] = score(lm, batch, at=cached_logps(topk[1], idx, batch.n_slots).to(device))
                    loss, m = spec.fn(objective_inputs(spec, logps, mask, len(idx), **cached), args)
                    if not torch.isfinite(loss):
                        bar.close()
                        raise TrainingError(f"stage {cfg.name}: loss is {loss.item()} at step {step + 1}; stopped. The last "
                                            f"good checkpoint is {ckpt if existing_dir(ckpt) else 'the stage start'}; "
                                            f"try a lower optim.lr or optim.grad_clip")
                    (loss * (share / n_micro)).backward()
                    faults.point("step")
                    for k, v in m.items():  # every key, so that all processes sum the same list
                        step_metrics[k] = step_metrics.get(k, 0.0) + (float(v) * share / n_micro if share else 0.0)
                    if share:  # (not a weight-0 forward that keeps the processes in step)
                        loss_sum += loss.item() * share / n_micro
                        step_tokens += batch.n_tokens
            params = [p for p in model.parameters() if p.requires_grad]
            if dist.world_size() > 1:  # every process then takes the same step
                par.reduce_gradients(params)
                keys = sorted(step_metrics)
                loss_sum, step_tokens, *vals = dist.sum_scalars([loss_sum, step_tokens] + [step_metrics[k] for k in keys])
                step_metrics, step_tokens = dict(zip(keys, vals)), int(step_tokens)
            tokens += step_tokens
            window_tokens += step_tokens
            gn = par.clip_gradients(params, cfg.optim.grad_clip or float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if grad_norm_ema is not None and gn > 10 * grad_norm_ema:
                log.warning("stage %s step %d: gradient norm spike %.3g (running mean %.3g)", cfg.name, step, gn, grad_norm_ema)
                metrics.write({"stage": cfg.name, "split": "train", "step": step, "event": "grad_norm_spike", "grad_norm": gn})
            grad_norm_ema = gn if grad_norm_ema is None else 0.9 * grad_norm_ema + 0.1 * gn
            ep_float = epoch + (g + 1) / len(groups)
            if step % cfg.log_every == 0 or step == total:
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt if dt > 0 else 0.0
                metrics.write({"stage": cfg.name, "split": "train", "step": step, "epoch": round(ep_float, 4),
                               "loss": loss_sum, "lr": sched.get_last_lr()[0], "grad_norm": gn,
                               "tokens_per_s": round(tps, 1), **step_metrics})
                window_tokens, window_t = 0, time.perf_counter()
                bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            at_epoch_end = g == len(groups) - 1
            if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and not at_epoch_end:
                run_eval(ep_float)
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and not at_epoch_end:
                checkpoint(epoch, g + 1)
        epoch, group0 = epoch + 1, 0
        run_eval(float(epoch))
        checkpoint(epoch, 0)
    bar.close()
    par.finish(lm)
    wall = time.perf_counter() - t_start
    peaks = [round(m, 1) for m in dist.per_process(peak_memory_mb(device))]
    return {"steps": step, "tokens": tokens, "wall_s": round(wall, 2), "peak_mem_mb": max(peaks),
            **({"peak_mem_mb_per_process": peaks} if len(peaks) > 1 else {}), "device": str(device),
            "metrics": last_eval}
