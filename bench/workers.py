"""Run one measurement in a fresh interpreter (peak RSS and timings are per process) and read the
JSON line it prints last."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_worker(script: str, args: list[str], label: str) -> dict:
    cmd = [sys.executable, script, *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
