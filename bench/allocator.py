"""Whole postlab stages with malloc keeping freed memory (postlab.allocator, the default on CPU)
against glibc's default (POSTLAB_KEEP_FREED_MEMORY=0); on request also with PyTorch's
transparent-huge-page allocation of CPU tensors (THP_MEM_ALLOC_ENABLE=1, not a postlab default).

    .venv/bin/python bench/allocator.py --repeats 5 --precision bf16
    .venv/bin/python bench/allocator.py --repeats 5 --precision bf16 --settings "keep + huge pages,keep" --second-stage --out bench/results/allocator_huge_pages.json
    .venv/bin/python bench/allocator.py --sequence 10 --precision bf16 --out bench/results/allocator_sequence.json

A 64-example paraphrase SFT or DPO stage at batch 16, as vs_trl.py's postlab worker runs it; each
measurement a fresh process, the settings alternating; medians. Reports the stage's seconds (for
DPO with its reference pass), the reference pass alone, the steps after the first (from their train
records), the process's page faults and system CPU time, and peak RSS. With `--sequence N`, instead:
one process per setting loads the model afresh and trains N 32-example stages one after another
(SFT and DPO alternating, as a `--workers 1` study runs its runs, each followed by the
release_freed_memory that postlab.run calls), reporting resident and peak memory after each. With
`--second-stage`, each process also trains the same stage again (the model loaded afresh), whose
memory is then already faulted in: what a long stage's steps see.
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

SETTINGS = {"keep": {"THP_MEM_ALLOC_ENABLE": "0"}, "glibc default": {"POSTLAB_KEEP_FREED_MEMORY": "0", "THP_MEM_ALLOC_ENABLE": "0"},
            "keep + huge pages": {"THP_MEM_ALLOC_ENABLE": "1"}}


def huge_pages_mb() -> float:
    """This process's anonymous memory in transparent huge pages now (MB)."""
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stage(kind: str, precision: str, data: str, again: bool) -> dict:
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
            "keeps_freed_memory": keep_freed_memory(), "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
            "huge_pages_mb_at_end": huge_pages_mb(), **(_again(kind, precision, data) if again else {})}


def _again(kind: str, precision: str, data: str) -> dict:
    """The same stage once more in the same process (the model loaded afresh): the memory it needs is
    already faulted in, as in any stage after the first few steps."""
    from common import case_data, postlab_stage
    from postlab.models import load_lm

    lm = load_lm("smollm2-135m", precision=precision)
    out = postlab_stage(lm, "nll" if kind == "sft" else "dpo", case_data("paraphrase", kind, 64, data), 16, 1e-5,
                        append_eos=True)
    return {"second_stage_s": out["seconds"]}


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
    ap.add_argument("--second-stage", action="store_true", help="also time the stage again in the same process")
    ap.add_argument("--settings", default="keep,glibc default", help="comma-separated, of: " + ", ".join(SETTINGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        out = sequence(a.sequence, a.precision, a.data) if a.sequence else stage(a.worker, a.precision, a.data, a.second_stage)
        print(json.dumps(out))
        return

    import torch

    from postlab.run import cpu_name
    from workers import run_worker

    settings = {name: SETTINGS[name] for name in a.settings.split(",")}
    results = {}
    if a.sequence:
        for name, env in settings.items():
            rows = run_worker(__file__, ["--worker", "sequence", "--sequence", str(a.sequence), "--precision",
                                         a.precision, "--data", a.data], f"sequence {name}", env_extra=env)["stages"]
            results[name] = rows
            print(f"{name:13s}: resident after each stage " + ", ".join(str(r["rss_mb"]) for r in rows) +
                  f" MB; peak {rows[-1]['peak_rss_mb']} MB", flush=True)
    for kind in ([] if a.sequence else a.kinds.split(",")):
        runs = {s: [] for s in settings}
        for r in range(a.repeats):
            for name, env in settings.items():
                m = run_worker(__file__, ["--worker", kind, "--precision", a.precision, "--data", a.data,
                                          *(["--second-stage"] if a.second_stage else [])],
                               f"{kind} {name}", env_extra=env)
                assert m["keeps_freed_memory"] == (name != "glibc default"), m
                assert m["huge_pages"] == ("huge pages" in name), m
                runs[name].append(m)
                print(f"{kind} repeat {r} {name:13s}: stage {m['stage_s']:5.2f} s, later steps {m['later_steps_s']:5.2f} s,"
                      f" {m['page_faults']} page faults, {m['system_cpu_s']:.1f} s system, {m['peak_rss_mb']:.0f} MB"
                      f" ({m['huge_pages_mb_at_end']:.0f} MB in huge pages at the end)"
                      + (f"; the stage again: {m['second_stage_s']:.2f} s" if a.second_stage else ""), flush=True)
        med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0] if k not in ("keeps_freed_memory", "huge_pages")}
               for name, rs in runs.items()}
        results[kind] = {"runs": runs, "medians": med, "against": {}}
        names = list(settings)
        for name, base in [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]:  # each against the later ones
            speedup = med[base]["stage_s"] / med[name]["stage_s"]
            wins = sum(b["stage_s"] > k["stage_s"] for b, k in zip(runs[base], runs[name]))
            results[kind]["against"][f"{name} vs {base}"] = {"stage_speedup": speedup, "faster_pairs": wins}
            print(f"{kind}, {name} vs {base}: stage {med[base]['stage_s']:.2f} -> {med[name]['stage_s']:.2f} s "
                  f"({speedup:.2f}x, faster in {wins} of {a.repeats} pairs); later steps {med[base]['later_steps_s']:.2f} -> "
                  f"{med[name]['later_steps_s']:.2f} s; page faults {med[base]['page_faults']:.0f} -> "
                  f"{med[name]['page_faults']:.0f}; peak RSS {med[base]['peak_rss_mb']:.0f} -> "
                  f"{med[name]['peak_rss_mb']:.0f} MB"
                  + (f"; the stage again {med[base]['second_stage_s']:.2f} -> {med[name]['second_stage_s']:.2f} s"
                     if a.second_stage else ""), flush=True)
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "precision": a.precision, "repeats": a.repeats,
            "command": " ".join(["python"] + sys.argv), "settings": settings}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
