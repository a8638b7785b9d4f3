"""postlab against an earlier postlab: the same vs_trl case trained by this tree and by a past commit,
interleaved per repeat, each run in a fresh interpreter. Answers "is it slower than it was?".

    .venv/bin/python bench/vs_commit.py --commit 03d7b2b --cases sft-paraphrase,dpo-paraphrase --n 64
    .venv/bin/python bench/vs_commit.py --commit 03d7b2b --isa avx2     # as on an AVX2-only CPU
    .venv/bin/python bench/vs_commit.py --commit 03d7b2b --now b1d5295  # two commits (default: this tree)

The past commit is checked out into a temporary git worktree and its own bench/vs_trl.py postlab
worker runs with its own src/ first on the path (the installed packages are this tree's). Both times
include the end-of-stage checkpoint each version writes. Writes bench/results/vs_commit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vs_trl import CASES
from workers import limit_isa, run_worker

ROOT = Path(__file__).resolve().parent.parent


def run_tree(tree: Path, case: str, n: int, batch: int, precision: str, data: str) -> dict:
    """One postlab run of `case` by the code in `tree` (its bench/vs_trl.py worker, its src/)."""
    args = ["--worker", "postlab", "--cases", case, "--n", str(n), "--batch", str(batch), "--precision", precision,
            "--data", data]
    return run_worker(tree / "bench" / "vs_trl.py", args, f"{tree} {case}", path=[tree / "src", tree / "bench"], cwd=tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commit", required=True, help="the past commit to compare with (any git revision)")
    ap.add_argument("--now", help="a commit to compare it with instead of this working tree")
    ap.add_argument("--cases", default="sft-paraphrase,dpo-paraphrase")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--isa", choices=["avx2"], help="run both as on an AVX2-only CPU (see workers.ISA_LIMITS)")
    ap.add_argument("--out", default="bench/results/vs_commit.json")
    a = ap.parse_args()
    from postlab.run import cpu_name

    isa_env = limit_isa(a.isa)
    data = str(Path(a.data).resolve())
    def rev(r: str) -> str:
        return subprocess.run(["git", "rev-parse", r], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()

    sha = rev(a.commit)
    head = rev(a.now) if a.now else rev("HEAD") + (" + uncommitted changes" if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "bench"], capture_output=True, text=True,
        cwd=ROOT).stdout.strip() else "")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        past, now = Path(d) / "past", (Path(d) / "now" if a.now else ROOT)
        trees = [(past, sha)] + ([(now, rev(a.now))] if a.now else [])
        for tree, commit in trees:
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=ROOT, check=True)
        try:
            for case in a.cases.split(","):
                b = a.batch or CASES[case][3]
                runs = {"past": [], "now": []}
                for r in range(a.repeats):
                    for who, tree in (("past", past), ("now", now)):
                        runs[who].append(run_tree(tree, case, a.n, b, a.precision, data))
                        print(f"{case} repeat {r}: {who:5s} {runs[who][-1]['seconds']:7.1f}s", flush=True)
                med = {who: statistics.median(x["seconds"] for x in rs) for who, rs in runs.items()}
                results[case] = {"n": a.n, "batch": b, "runs": runs, "median_s": med,
                                 "speedup_now_over_past": med["past"] / med["now"],
                                 "paired_speedup_median": statistics.median(p["seconds"] / q["seconds"]
                                                                            for p, q in zip(runs["past"], runs["now"]))}
        finally:
            for tree, _ in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "precision": a.precision, "repeats": a.repeats,
            "past": sha, "now": head, "isa_limits": isa_env, "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{'case':16s} {'past s':>8s} {'now s':>8s} {'now/past speed':>15s}")
    for case, row in results.items():
        print(f"{case:16s} {row['median_s']['past']:8.1f} {row['median_s']['now']:8.1f} {row['speedup_now_over_past']:14.2f}x")
    print(f"(medians of {a.repeats}; past {sha[:9]}, now {head}; written to {a.out})")


if __name__ == "__main__":
    main()
