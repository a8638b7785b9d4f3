"""Run one measurement in a fresh interpreter (peak RSS and timings are per process) and read the
JSON line it prints last."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Limits that make an AVX-512 CPU run the code paths of an AVX2-only one (ATen's kernels, oneDNN's
# bf16/fp32 matmuls, MKL's sgemm): a stand-in for an AVX2 machine when none is at hand. The clock,
# caches and memory stay this machine's, so compare ratios measured in the same run, not seconds.
ISA_LIMITS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def limit_isa(isa: str | None) -> dict:
    """Set the environment (inherited by every worker) that limits the instruction set; returns it."""
    env = ISA_LIMITS[isa] if isa else {}
    os.environ.update(env)
    return env


def run_worker(script: str, args: list[str], label: str, path: list[Path] | None = None, cwd: Path | None = None,
               env_extra: dict[str, str] | None = None) -> dict:
    """Run `script args` in a fresh interpreter with `path` (default: this bench folder) first on
    PYTHONPATH, from `cwd`, with `env_extra` added to the environment; return the JSON line it prints last."""
    cmd = [sys.executable, str(script), *args]
    pythonpath = os.pathsep.join(str(x) for x in (path or [Path(__file__).parent]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "TQDM_DISABLE": "1", **(env_extra or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
