"""Where a study's runs execute: one after another in this process, side by side in N worker
processes on this machine (`--workers N`: one GPU each, or the CPU cores split between them), or as
Ray tasks (`--executor ray`: each run a task, `num_gpus` per run) over a Ray cluster.

Every executor runs the same job, `execute`: one planned run, resumable, its failure recorded in the
run's error.txt; results come back as they finish. Runs that share a stage or a cached result (a
reference pass, an evaluation, sampled pairs) compute it once: the others wait on its lock
(postlab.cache.lock) and reuse it, so the results do not depend on the number of workers.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_json, atomic_write_text
from ..config import RunConfig, dump_config, parse_run_config
from ..errors import PostlabError


@dataclass
class Job:
    """One planned run, as a worker needs it (picklable)."""

    study_dir: str
    run_id: str
    tree: dict  # its config tree (output_dir set by the worker)
    axes: dict[str, Any]


@dataclass
class Done:
    run_id: str
    error: str | None  # the first line of the error, or None
    seconds: float


def run_dir(study_dir: Path, rid: str) -> Path:
    return study_dir / "runs" / rid


def run_config_of(study_dir: Path, rid: str, tree: dict) -> RunConfig:
    return parse_run_config({**tree, "output_dir": str(run_dir(study_dir, rid))}, source=f"run {rid}")


def sync_output_dir(out: Path, cfg: RunConfig) -> None:
    """A study directory that moved (or was named another way) still resumes: when the saved config
    differs from the new one only in output_dir, rewrite it."""
    saved = out / "config.yaml"
    if not saved.is_file() or saved.read_text() == dump_config(cfg):
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        return
    new = cfg.model_dump(mode="json")
    if isinstance(old, dict) and {**old, "output_dir": None} == {**new, "output_dir": None}:
        atomic_write_text(saved, dump_config(cfg))


def add_axes(out: Path, axes: dict[str, Any]) -> None:
    """Put the run's axes into its result.json (atomically) if they are not there yet."""
    path = out / "result.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("axes") != axes:
        result["axes"] = axes
        atomic_write_json(path, result)


def execute(job: Job, threads: int | None = None) -> Done:
    """Run one planned run in this process (resuming it if it was interrupted)."""

    if threads:
        import torch

        torch.set_num_threads(threads)
    out = Path(job.study_dir) / "runs" / job.run_id
    t0 = time.perf_counter()
    try:
        from ..run import run

        cfg = run_config_of(Path(job.study_dir), job.run_id, job.tree)
        sync_output_dir(out, cfg)
        run(cfg, resume=True)
        add_axes(out, job.axes)
    except Exception as e:  # noqa: BLE001 - one failed run must not end the study
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = (f"{type(e).__name__}: {e}\n" if isinstance(e, PostlabError)
                  else f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        atomic_write_text(out / "error.txt", detail)
        return Done(job.run_id, first, time.perf_counter() - t0)
    (out / "error.txt").unlink(missing_ok=True)
    return Done(job.run_id, None, time.perf_counter() - t0)


def in_process(jobs: list[Job]) -> Iterator[Done]:
    for job in jobs:
        yield execute(job)


_GPU_QUEUE = None


def _worker_init(gpus) -> None:
    """Each worker process takes one GPU (CUDA_VISIBLE_DEVICES, before CUDA starts) when there are any."""
    global _GPU_QUEUE
    _GPU_QUEUE = gpus
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())


def local_workers(jobs: list[Job], workers: int) -> Iterator[Done]:
    """N worker processes (spawned: nothing of this process's state is shared) on this machine."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    n_gpus = _visible_gpus()
    gpus = None
    if n_gpus:
        gpus = ctx.Queue()
        for i in range(workers):
            gpus.put(i % n_gpus)
    threads = None if n_gpus else max(1, (os.cpu_count() or 1) // workers)  # split the cores between workers
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(gpus,)) as pool:
        futures = [pool.submit(execute, job, threads) for job in jobs]
        for f in as_completed(futures):
            yield f.result()


def ray_tasks(jobs: list[Job], gpus_per_run: float = 0.0, cpus_per_run: float = 1.0) -> Iterator[Done]:
    """Each run a Ray task (`pip install 'postlab[ray]'`): on the cluster `ray.init()` connects to
    (RAY_ADDRESS), or a local one. The study directory must be on storage every node sees."""
    try:
        import ray
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("--executor ray needs Ray: pip install 'postlab[ray]'") from None
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_gpus=gpus_per_run, num_cpus=cpus_per_run)(execute)
    pending = [task.remote(job, None if gpus_per_run else max(1, int(cpus_per_run))) for job in jobs]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0
