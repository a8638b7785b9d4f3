"""Peak resident memory per process and training speed of `parallel: ddp` vs `parallel: fsdp`.

Each measurement is one `accelerate launch --num_processes N -m postlab train CONFIG` (CPU processes
over gloo on a machine without GPUs) with the same global batch, plus one plain process for
reference. Peak RSS is each process's own (done.json's peak_mem_mb_per_process: the whole stage,
including the model load, the end-of-stage evaluation and checkpoint); speed is the median
tokens/s of the logged training steps after the first. Writes bench/results/parallel.json.

    .venv/bin/python bench/parallel.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, processes: int, config: str, overrides: list[str], env_extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        args = ["-m", "postlab", "train", config, *overrides, f"parallel={mode}", "--output-dir", d]
        if processes > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), *args]
            threads = max(1, (os.cpu_count() or 1) // processes)
        else:
            cmd, threads = [sys.executable, *args], os.cpu_count() or 1
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", **env_extra}
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{mode} x{processes} failed:\n{p.stderr[-3000:]}")
        done = json.loads(next(Path(d).glob("0-*/done.json")).read_text())
        train = [r for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    return {"peak_mem_mb_per_process": done.get("peak_mem_mb_per_process", [done["peak_mem_mb"]]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:]), "steps": done["steps"],
            "train_s": done["train_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/paraphrase-sft-fft.yaml")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mmap-threshold", type=int,
                    help="MALLOC_MMAP_THRESHOLD_ for the processes: glibc then returns freed blocks of at least "
                         "this many bytes to the system (by default it keeps them, and RSS counts them)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parallel.json"))
    a = ap.parse_args()
    env_extra = {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold else {}
    overrides = [f"max_steps={a.steps}", "task.dev_limit=32", "eval_at_start=false", "log_every=1", "reuse_stages=false"]
    cases = [("ddp", 1), ("ddp", a.processes), ("fsdp", a.processes)]
    results = {}
    for mode, n in cases:
        runs = [measure(mode, n, a.config, overrides, env_extra) for _ in range(a.repeats)]
        key = f"{mode} x{n}" if n > 1 else "one process"
        peaks = [statistics.median(r["peak_mem_mb_per_process"][i] for r in runs) for i in range(n)]
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        results[key] = {"runs": runs, "median_peak_mem_mb_per_process": peaks, "median_tokens_per_s": tps}
        print(f"{key:12s} peak RSS per process {', '.join(f'{m:.0f}' for m in peaks)} MB; {tps:.0f} tokens/s "
              f"(median of {a.repeats})", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "config": a.config, "overrides": overrides,
            "env": env_extra, "machine": platform.machine(), "cpus": os.cpu_count(), "repeats": a.repeats}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
