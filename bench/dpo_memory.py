"""Peak resident memory of a DPO stage over an SFT stage on the same data (same model, batch, steps).

Each stage runs in a fresh interpreter (peak RSS is per process): tokenize, reference pass (DPO),
train one epoch. Cases: `sonnets` (multi-token answers: chosen and rejected need rows of their
own) and `paraphrase` (one-token answers, EOS off as the task trains: both answers share one row).
`--forward-rows` sets optim.forward_rows for the DPO stage (default: batch_size, postlab's default).
Prints the median peak RSS per stage and the ratio; writes bench/results/dpo_memory.json.

    .venv/bin/python bench/dpo_memory.py --cases sonnets,paraphrase --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

BATCH = {"sonnets": 8, "paraphrase": 16}


def worker(case: str, objective: str, n: int, forward_rows: int | None, data: str) -> dict:
    from common import case_data, peak_rss_mb, postlab_stage
    from postlab.models import load_lm

    raw = case_data(case, "sft" if objective == "nll" else "dpo", n, data)
    extra = {"forward_rows": forward_rows} if forward_rows else {}
    out = postlab_stage(load_lm("smollm2-135m", precision="fp32"), objective, raw, BATCH[case], 1e-5,
                        append_eos=case != "paraphrase", optim=extra)
    return {"peak_rss_mb": peak_rss_mb(), "steps": out["steps"], "seconds": out["seconds"]}


def measure(case: str, objective: str, n: int, forward_rows: int | None, data: str) -> dict:
    from workers import run_worker

    args = ["--worker", case, objective, "--n", str(n), "--data", data]
    return run_worker(__file__, args + (["--forward-rows", str(forward_rows)] if forward_rows else []),
                      f"{case} {objective}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="sonnets,paraphrase")
    ap.add_argument("--n", type=int, default=32, help="examples (pairs) per stage")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--forward-rows", type=int, help="optim.forward_rows of the DPO stage")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo_memory.json"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.n, a.forward_rows, a.data)))
        return
    results = {}
    for case in a.cases.split(","):
        runs = {obj: [measure(case, obj, a.n, a.forward_rows if obj == "dpo" else None, a.data)
                      for _ in range(a.repeats)] for obj in ("nll", "dpo")}
        med = {obj: statistics.median(r["peak_rss_mb"] for r in rs) for obj, rs in runs.items()}
        results[case] = {"batch": BATCH[case], "runs": runs, "median_peak_rss_mb": med,
                         "dpo_over_sft": med["dpo"] / med["nll"]}
        print(f"{case}: batch {BATCH[case]}, peak RSS SFT {med['nll']:.0f} MB, DPO {med['dpo']:.0f} MB, "
              f"DPO/SFT {med['dpo'] / med['nll']:.2f}x (median of {a.repeats})")
    meta = {"command": "python " + " ".join(sys.argv), "machine": platform.machine(), "cpus": os.cpu_count(),
            "n": a.n, "repeats": a.repeats, "forward_rows": a.forward_rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
