"""Data parallelism across processes started by `accelerate launch` (or `torchrun`): DDP semantics.

Every process holds the whole model and takes its share of each micro-batch; gradients are summed
across processes before the clip and the optimizer step, so every process takes the same step and
the weights stay identical. The global batch is the configured one (batch_size × grad_accum
examples per step) whatever the number of processes: more processes means fewer examples each, not
a bigger batch. Only the main process writes files (metrics, checkpoints, models, results) and
evaluates; the others wait at a barrier.

A single process (no launcher) never touches torch.distributed: every helper is a no-op there.
"""
from __future__ import annotations

import contextlib
import functools
import os

from .lazy import torch


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=None)
def _state():
    # accelerate picks the backend (NCCL on GPUs, gloo on CPU) and the device of this process; on a
    # machine without GPUs it joins the processes only when told they are CPU processes. A collective
    # that waits longer than POSTLAB_DIST_TIMEOUT seconds (default 30 min) fails instead of hanging.
    from datetime import timedelta

    from accelerate import PartialState

    timeout = timedelta(seconds=float(os.environ.get("POSTLAB_DIST_TIMEOUT", 1800)))
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


def world_size() -> int:
    return _state().num_processes if launched() else 1


def rank() -> int:
    return _state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return _state().device


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_only(what: str):
    """Around work that one process does while the others wait (writing a checkpoint, evaluating):
    afterwards every process learns whether it failed, so a failure on the main process stops all of
    them with an error instead of leaving the others waiting at the next collective."""
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
        error = e
    if launched():
        import torch.distributed as dist

        flag = torch.tensor([1.0 if error is not None else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and flag.item() > 0:
            from .errors import TrainingError

            raise TrainingError(f"{what} failed on another process (see its error); this process stops too")
    if error is not None:
        raise error


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (filling on-disk caches: pairs, reference log-probs);
    the others run it after, reading what it wrote."""
    if not launched():
        yield
        return
    with _state().main_process_first():
        yield


def my_share(idx: list[int], r: int | None = None) -> tuple[list[int], float]:
    """This process's (or process `r`'s) contiguous part of a micro-batch and its weight (its fraction
    of the examples)."""
    n, w, r = len(idx), world_size(), rank() if r is None else r
    if w == 1:
        return idx, 1.0
    lo, hi = r * n // w, (r + 1) * n // w
    return idx[lo:hi], (hi - lo) / n


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of `params` in one flat buffer."""
    if not launched():
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if p.grad is None else p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def forwards(items, idx: list[int], max_rows: int) -> list[tuple[list[int], float]]:
    """The forwards this process runs for micro-batch `idx`: its share cut into row-limited chunks,
    each with its weight in the micro-batch. A process whose share is empty (a last micro-batch
    smaller than the process count) runs one forward of weight 0, so that every process logs the
    same metrics."""
    from .data import forward_chunks

    mine, share = my_share(idx)
    if not mine:
        return [(idx[:1], 0.0)]
    return [(part, share * len(part) / len(mine)) for part in forward_chunks(items, mine, max_rows)]


def sum_scalars(values: list[float]) -> list[float]:
    if not launched():
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) a tensor across processes, on its device: no host synchronisation."""
    if not launched():
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t


def per_process(value: float) -> list[float]:
    """`value` of every process, in rank order (every process gets the list)."""
    slots = [0.0] * world_size()
    slots[rank()] = value
    return sum_scalars(slots)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (the 2-norm over all gradients, scaled by min(1, max_norm /
    (norm + 1e-6)), no host read), except that on the CPU the norm is taken over each gradient's
    rows, then over those: PyTorch's CPU norm of a whole tensor runs on one thread and sums long fp32
    runs (a 3e-4 relative error over the embedded model's gradients, against 3e-8 by rows, which use
    every thread: bench/clip_norm.py)."""
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    if not grads or grads[0].device.type != "cpu":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    row_norms = [torch.linalg.vector_norm(g.reshape(g.shape[0] if g.ndim > 1 else 1, -1), dim=1,
                                          dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
    total = torch.linalg.vector_norm(torch.cat(row_norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)
    return total


class Replicated:
    """DDP semantics (and the plain single process): every process holds the whole model; gradients
    are summed after the backward passes. `fsdp.FullyShard` is the sharded alternative with the same
    methods, so the training loop is the same for both."""

    def prepare(self, lm) -> torch.nn.Module:
        return lm.model

    def forwards(self, items, idx: list[int], max_rows: int) -> list[tuple[list[int], float]]:
        return forwards(items, idx, max_rows)

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        sum_gradients(params)

    def clip_gradients(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The gradient norm before clipping, as a tensor on the device (read when logging)."""
        return clip_grad_norm(params, max_norm)

    def fused_optimizer(self) -> bool:
        return True

    @contextlib.contextmanager
    def whole_model(self, lm):
        """On the main process, `lm.model` holds all the weights inside the block (for evaluation)."""
        yield

    def checkpoint_state(self, model: torch.nn.Module, optimizer) -> tuple[dict, dict | None]:
        """(trainable weights, optimizer state or None without an optimizer) for the main process to write."""
        from .checkpoint import trainable_state

        return trainable_state(model), None if optimizer is None else optimizer.state_dict()

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        if any(isinstance(k, str) for k in state.get("state", {})):
            from .errors import TrainingError

            raise TrainingError("the checkpoint was written with parallel: fsdp; resume it the same way")
        optimizer.load_state_dict(state)

    def finish(self, lm) -> None:
        """After the last step: `lm.model` is the whole trained model on every process."""
