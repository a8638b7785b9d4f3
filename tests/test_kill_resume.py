"""Kill and resume: `postlab train` and `postlab study run` run as subprocesses and are killed with
SIGKILL at seeded points (a training step, a checkpoint write, a directory swap, an evaluation, a
cache write, a scored batch of the reference pass, the end of a stage, any atomic file write; see
postlab/faults.py), then resumed. After every kill, each file that exists under its final name is
complete (JSON parses, safetensors load); after resuming, the final weights and metrics are
bit-identical to an uninterrupted run's. The full set (20 train + 5 study kill points) is `slow`;
CI runs a reduced set, one kill point per kind of point."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from helpers import outcome, tiny_study, write_pairs


def postlab(args: list[str], cache: Path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "POSTLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "postlab", *args], env=e, capture_output=True, text=True, timeout=600)


def run_config(tmp: Path, model: Path) -> Path:
    data = str(write_pairs(tmp / "pairs.tsv", 16))
    task = {"name": "paraphrase", "train": data, "dev": data, "dev_limit": 6}
    tree = {"model": {"name": str(model), "device": "cpu", "precision": "fp32"}, "seed": 0, "reuse_stages": False,
            "stages": [{"name": "sft", "task": task, "objective": {"name": "nll"}, "epochs": 2, "log_every": 1,
                        "save_every_steps": 2, "optim": {"lr": 1e-3, "batch_size": 4}},
                       {"name": "dpo", "task": task, "objective": {"name": "dpo", "beta": 0.1}, "epochs": 1,
                        "log_every": 1, "optim": {"lr": 1e-4, "batch_size": 4}}]}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def check_complete_files(root: Path) -> None:
    """Every file under its final name is whole: temporary names start with '.'."""
    for p in root.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        elif p.name == "metrics.jsonl":  # appended per line: at most the last line is cut short
            lines = p.read_text().splitlines()
            for line in lines[:-1]:
                json.loads(line)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = run_config(tmp, tiny_llama)
    trace = tmp / "trace.txt"
    r = postlab(["train", str(cfg), "--output-dir", str(tmp / "run")], tmp / "cache", POSTLAB_FAULT_TRACE=str(trace))
    assert r.returncode == 0, r.stderr[-3000:]
    points = trace.read_text().split()
    return cfg, outcome(tmp / "run"), points


def kill_points(points: list[str], n: int | None, seed: int = 0) -> list[str]:
    """n seeded points of the trace; None: the first occurrence of each kind, after the first step."""
    if n is not None:
        return sorted(random.Random(seed).sample(points, min(n, len(points))), key=points.index)
    kinds: dict[str, str] = {}
    for p in points[points.index("step#2"):]:
        kinds.setdefault(p.split("#")[0], p)
    return list(kinds.values())


def kill_and_resume(cfg: Path, tmp: Path, point: str, reference: dict) -> None:
    out, cache = tmp / "run", tmp / "cache"
    r = postlab(["train", str(cfg), "--output-dir", str(out)], cache, POSTLAB_KILL_AT=point)
    assert r.returncode == -9, f"{point}: expected a SIGKILL, got {r.returncode}\n{r.stderr[-2000:]}"
    if out.exists():
        check_complete_files(out)
    r = postlab(["train", str(cfg), "--output-dir", str(out), "--resume"], cache)
    assert r.returncode == 0, f"resume after a kill at {point} failed:\n{r.stderr[-3000:]}"
    got = outcome(out)
    assert got["weights"] == reference["weights"], f"kill at {point}: final weights differ"
    assert got["stages"] == reference["stages"], f"kill at {point}: metrics differ"
    assert got["records"] == reference["records"], f"kill at {point}: metrics.jsonl differs"


def test_trace_covers_every_kind_of_point(uninterrupted):
    kinds = {p.split("#")[0] for p in uninterrupted[2]}
    assert {"step", "checkpoint-write", "dir-swap", "eval", "cache-write", "score-batch", "stage-done",
            "file-write"} <= kinds


def kill_and_resume_each(cfg: Path, tmp: Path, points: list[str], reference: dict) -> None:
    """Two at a time: each kill is its own pair of single-threaded processes with its own output and
    cache, so on a 2-core machine the pairs overlap (mostly interpreter start-up and imports)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda ip: kill_and_resume(cfg, tmp / f"k{ip[0]}", ip[1], reference), enumerate(points)))


def test_kill_and_resume_reduced(uninterrupted, tmp_path):
    cfg, reference, points = uninterrupted
    chosen = kill_points(points, None)
    assert len(chosen) >= 6
    kill_and_resume_each(cfg, tmp_path, chosen, reference)


@pytest.mark.slow
def test_kill_and_resume_20_seeded_points(uninterrupted, tmp_path):
    cfg, reference, points = uninterrupted
    chosen = kill_points(points, 20, seed=1)
    assert len(chosen) == 20
    kill_and_resume_each(cfg, tmp_path, chosen, reference)


def study_outcome(study_dir: Path) -> dict:
    return {run.name: outcome(run) for run in sorted((study_dir / "runs").iterdir())}


@pytest.mark.parametrize("n_points", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_killed_study_resumes_to_the_same_results(tiny_llama, tmp_path, n_points):
    study = tiny_study(tmp_path, tiny_llama, seeds=(0,))
    ref_dir, trace = tmp_path / "ref", tmp_path / "trace.txt"
    r = postlab(["study", "run", str(study), "--output-dir", str(ref_dir), "--no-progress"], tmp_path / "c0",
                POSTLAB_FAULT_TRACE=str(trace))
    assert r.returncode == 0, r.stderr[-3000:]
    reference = study_outcome(ref_dir)
    points = trace.read_text().split()
    chosen = kill_points(points, n_points, seed=2)
    for i, point in enumerate(chosen):
        out = tmp_path / f"s{i}"
        r = postlab(["study", "run", str(study), "--output-dir", str(out), "--no-progress"], tmp_path / f"c{i + 1}",
                    POSTLAB_KILL_AT=point)
        assert r.returncode == -9, f"{point}: {r.returncode}\n{r.stderr[-2000:]}"
        check_complete_files(out)
        r = postlab(["study", "run", str(study), "--output-dir", str(out), "--no-progress"], tmp_path / f"c{i + 1}")
        assert r.returncode == 0, f"study resume after a kill at {point}:\n{r.stderr[-3000:]}"
        assert study_outcome(out) == reference, f"study killed at {point}: results differ"
        assert (out / "report" / "report.md").is_file()
