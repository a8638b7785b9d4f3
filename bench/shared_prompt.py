"""A DPO stage with each prompt shared by its answers (one row: prompt, chosen, rejected) against the
same stage with a row per answer: time (reference pass included), peak RSS and mean loss, each run in
a fresh process, the two layouts interleaved per repeat.

    .venv/bin/python bench/shared_prompt.py --precision bf16
    .venv/bin/python bench/shared_prompt.py --cases sonnets --n 24 --batch 8

postlab chooses the layout per batch by cost (data.score_batch); this forces one or the other through
the same training code. Writes bench/results/shared_prompt.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path

CASES = {"paraphrase": (64, 16), "sonnets": (24, 8)}  # task -> default pairs, batch


def worker(task: str, n: int, batch: int, precision: str, data: str, share: bool) -> dict:
    import postlab.data
    import postlab.logprobs
    import postlab.train
    from common import case_data, peak_rss_mb, postlab_stage
    from postlab.models import load_lm

    forced = partial(postlab.data.score_batch, share_prompt=share)
    postlab.train.score_batch = postlab.logprobs.score_batch = forced  # the training steps and the reference pass
    lm = load_lm("smollm2-135m", precision=precision)
    out = postlab_stage(lm, "dpo", case_data(task, "dpo", n, data), batch, 5e-6, append_eos=True)
    return {**out, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="paraphrase,sonnets")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/shared_prompt.json")
    ap.add_argument("--worker", choices=["shared", "separate"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.cases, a.n, a.batch, a.precision, a.data, a.worker == "shared")))
        return
    from postlab.run import cpu_name
    from workers import run_worker

    results = {}
    for task in a.cases.split(","):
        n, b = a.n or CASES[task][0], a.batch or CASES[task][1]
        runs = {"shared": [], "separate": []}
        for r in range(a.repeats):
            for layout in runs:
                args = ["--worker", layout, "--cases", task, "--n", str(n), "--batch", str(b),
                        "--precision", a.precision, "--data", a.data]
                runs[layout].append(run_worker(__file__, args, f"{layout} {task}"))
                m = runs[layout][-1]
                print(f"{task} repeat {r}: {layout:8s} {m['seconds']:6.1f}s (reference {m['reference_s']:.1f}s) "
                      f"peak RSS {m['peak_rss_mb']:.0f} MB, mean loss {statistics.mean(m['losses']):.4f}", flush=True)
        row = {"n": n, "batch": b, "runs": runs}
        for layout, rs in runs.items():
            row[layout] = {"median_s": statistics.median(x["seconds"] for x in rs),
                           "median_reference_s": statistics.median(x["reference_s"] for x in rs),
                           "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
                           "mean_loss": statistics.median(statistics.mean(x["losses"]) for x in rs)}
        row["speedup"] = row["separate"]["median_s"] / row["shared"]["median_s"]
        results[task] = row
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "precision": a.precision, "repeats": a.repeats,
            "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{'case':12s} {'separate s':>10s} {'shared s':>9s} {'speedup':>8s} {'RSS sep/shared':>16s} {'loss sep/shared':>16s}")
    for task, row in results.items():
        s, h = row["separate"], row["shared"]
        print(f"{task:12s} {s['median_s']:10.1f} {h['median_s']:9.1f} {row['speedup']:7.2f}x "
              f"{s['peak_rss_mb']:7.0f}/{h['peak_rss_mb']:.0f} MB {s['mean_loss']:8.4f}/{h['mean_loss']:.4f}")
    print(f"(medians of {a.repeats}; written to {a.out})")


if __name__ == "__main__":
    main()
