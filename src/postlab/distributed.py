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

import torch


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=None)
def _state():
    from accelerate import PartialState

    # accelerate picks the backend (NCCL on GPUs, gloo on CPU) and the device of this process; on a
    # machine without GPUs it joins the processes only when told they are CPU processes.
    return PartialState(cpu=not torch.cuda.is_available())


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
def main_first():
    """The main process runs the block first (filling on-disk caches: pairs, reference log-probs);
    the others run it after, reading what it wrote."""
    if not launched():
        yield
        return
    with _state().main_process_first():
        yield


def my_share(idx: list[int]) -> tuple[list[int], float]:
    """This process's contiguous part of a micro-batch and its weight (its fraction of the examples)."""
    n, w, r = len(idx), world_size(), rank()
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


def sum_scalars(values: list[float]) -> list[float]:
    if not launched():
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()
