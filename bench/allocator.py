"""Whole postlab stages with malloc keeping freed memory (postlab.allocator, the default on CPU)
against glibc's default (POSTLAB_KEEP_FREED_MEMORY=0).

    .venv/bin/python bench/allocator.py --repeats 5 --precision bf16
    .venv/bin/python bench/allocator.py --sequence 10 --precision bf16 --out bench/results/allocator_sequence.json

A 64-example paraphrase SFT or DPO stage at batch 16, as vs_trl.py's postlab worker runs it; each
measurement a fresh process, the two settings alternating; medians. Reports the stage's seconds (for
DPO with its reference pass), the reference pass alone, the steps after the first (from their train
records), the process's page faults and system CPU time, and peak RSS. With `--sequence N`, instead:
one process per setting loads the model afresh and trains N 32-example stages one after another
(SFT and DPO alternating, as a `--workers 1` study runs its runs, each followed by the
release_freed_memory that postlab.run calls), reporting resident and peak memory after each.
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


def sequence(n: int, precision: str, data: str) -> dict:
    import gc

    from common import case_data, peak_rss_mb, postlab_stage
    from postlab.allocator import release_freed_memory
    from postlab.models import load_lm

    rows = []
    for i in range(n):
        kind = ("sft", "dpo")[i % 2]
        lm = load_lm("smollm2-135m", precision=precision)
        postlab_stage(lm, "nll" if kind == "sft" else "dpo", case_data("paraphrase", kind, 32, data), 16, 1e-5,
                      append_eos=True)
        del lm
        gc.collect()
        release_freed_memory()  # as postlab.run does after each run (nothing where malloc is left alone)
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        rows.append({"stage": i + 1, "kind": kind, "rss_mb": round(rss), "peak_rss_mb": round(peak_rss_mb())})
    return {"stages": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="sft,dpo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/allocator.json")
    ap.add_argument("--sequence", type=int, help="stages one after another in one process per setting")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        out = sequence(a.sequence, a.precision, a.data) if a.sequence else stage(a.worker, a.precision, a.data)
        print(json.dumps(out))
        return

    import torch

    from postlab.run import cpu_name
    from workers import run_worker

    results = {}
    if a.sequence:
        for name, env in SETTINGS.items():
            rows = run_worker(__file__, ["--worker", "sequence", "--sequence", str(a.sequence), "--precision",
                                         a.precision, "--data", a.data], f"sequence {name}", env_extra=env)["stages"]
            results[name] = rows
            print(f"{name:13s}: resident after each stage " + ", ".join(str(r["rss_mb"]) for r in rows) +
                  f" MB; peak {rows[-1]['peak_rss_mb']} MB", flush=True)
    for kind in ([] if a.sequence else a.kinds.split(",")):
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
