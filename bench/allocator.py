"""Whole postlab stages with malloc keeping freed memory (postlab.allocator, the default on CPU)
against glibc's default (POSTLAB_KEEP_FREED_MEMORY=0).

    .venv/bin/python bench/allocator.py --repeats 5 --precision bf16

A 64-example paraphrase SFT or DPO stage at batch 16, as vs_trl.py's postlab worker runs it; each
measurement a fresh process, the two settings alternating; medians. Reports the stage's seconds (for
DPO with its reference pass), the reference pass alone, the steps after the first (from their train
records), the process's page faults and system CPU time, and peak RSS.
Writes bench/results/allocator.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

SETTINGS = {"keep": {}, "glibc default": {"POSTLAB_KEEP_FREED_MEMORY": "0"}}


def stage(kind: str, precision: str, data: str) -> dict:
    from common import case_data, peak_rss_mb, postlab_stage
    from postlab.allocator import keep_freed_memory
    from postlab.models import load_lm

    lm = load_lm("smollm2-135m", precision=precision)
    out = postlab_stage(lm, "nll" if kind == "sft" else "dpo", case_data("paraphrase", kind, 64, data), 16, 1e-5,
                        append_eos=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"stage_s": out["seconds"], "reference_s": out["reference_s"],
            "later_steps_s": sum(r["step_s"] for r in out["train_records"][1:]),
            "page_faults": usage.ru_minflt, "system_cpu_s": usage.ru_stime, "peak_rss_mb": peak_rss_mb(),
            "keeps_freed_memory": keep_freed_memory()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="sft,dpo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/allocator.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(stage(a.worker, a.precision, a.data)))
        return

    import torch

    from postlab.run import cpu_name
    from workers import run_worker

    results = {}
    for kind in a.kinds.split(","):
        runs = {s: [] for s in SETTINGS}
        for r in range(a.repeats):
            for name, env in SETTINGS.items():
                m = run_worker(__file__, ["--worker", kind, "--precision", a.precision, "--data", a.data],
                               f"{kind} {name}", env_extra=env)
                assert m["keeps_freed_memory"] == (name == "keep"), m
                runs[name].append(m)
                print(f"{kind} repeat {r} {name:13s}: stage {m['stage_s']:5.2f} s, later steps {m['later_steps_s']:5.2f} s,"
                      f" {m['page_faults']} page faults, {m['system_cpu_s']:.1f} s system, {m['peak_rss_mb']:.0f} MB",
                      flush=True)
        med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0] if k != "keeps_freed_memory"}
               for name, rs in runs.items()}
        speedup = med["glibc default"]["stage_s"] / med["keep"]["stage_s"]
        wins = sum(d["stage_s"] > k["stage_s"] for d, k in zip(runs["glibc default"], runs["keep"]))
        results[kind] = {"runs": runs, "medians": med, "stage_speedup": speedup, "faster_pairs": wins}
        print(f"{kind}: stage {med['glibc default']['stage_s']:.2f} -> {med['keep']['stage_s']:.2f} s ({speedup:.2f}x, "
              f"faster in {wins} of {a.repeats} pairs); later steps {med['glibc default']['later_steps_s']:.2f} -> "
              f"{med['keep']['later_steps_s']:.2f} s; page faults {med['glibc default']['page_faults']:.0f} -> "
              f"{med['keep']['page_faults']:.0f}; peak RSS {med['glibc default']['peak_rss_mb']:.0f} -> "
              f"{med['keep']['peak_rss_mb']:.0f} MB", flush=True)
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "precision": a.precision, "repeats": a.repeats,
            "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
