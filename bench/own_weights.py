"""The first optimizer step of a freshly loaded model, with its weights left in transformers' file
mapping (copy-on-write) against copied first into memory of their own (models.own_trainable_weights,
what train_stage does).

    .venv/bin/python bench/own_weights.py --repeats 5 --stage-repeats 3 --precision bf16

Each measurement is a fresh process, the two ways alternating; medians. The first step: load the
embedded model, give every weight a gradient, build fused AdamW, time [the copy +] the first step and a
second one. The stage: a 64-example paraphrase SFT or DPO stage at batch 16 (as vs_trl.py's postlab
worker), with the copy train_stage makes or with it switched off.
Writes bench/results/own_weights.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(own: bool) -> dict:
    import torch

    from postlab.models import load_lm, own_trainable_weights

    lm = load_lm("smollm2-135m", precision="fp32")
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    copied = own_trainable_weights(lm.model) if own else 0
    t_copy = time.perf_counter() - t
    opt.step()
    first = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    t = time.perf_counter()
    opt.step()
    return {"copy_s": t_copy, "copy_and_first_step_s": first, "second_step_s": time.perf_counter() - t,
            "page_faults": faults, "weights_copied": copied}


def stage(own: bool, kind: str, precision: str, data: str) -> dict:
    import postlab.train
    from common import case_data, postlab_stage
    from postlab.models import load_lm

    if not own:
        postlab.train.own_trainable_weights = lambda model: 0
    lm = load_lm("smollm2-135m", precision=precision)
    out = postlab_stage(lm, "nll" if kind == "sft" else "dpo", case_data("paraphrase", kind, 64, data), 16, 1e-5,
                        append_eos=True)
    return {"stage_s": out["seconds"], "reference_s": out["reference_s"],
            "first_step_s": out["train_records"][0]["step_s"],
            "later_steps_s": [r["step_s"] for r in out["train_records"][1:]]}


def child(args: list[str]) -> dict:
    return json.loads(subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stage-repeats", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/own_weights.json")
    ap.add_argument("--child", choices=["mapped", "owned"], help=argparse.SUPPRESS)
    ap.add_argument("--stage", choices=["sft", "dpo"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(stage(a.child == "owned", a.stage, a.precision, a.data) if a.stage else measure(a.child == "owned")))
        return
    runs: dict[str, list[dict]] = {"mapped": [], "owned": []}
    for r in range(a.repeats):
        for mode in runs:
            runs[mode].append(child(["--child", mode]))
            print(mode, runs[mode][-1], flush=True)
    stages: dict[str, dict[str, list[dict]]] = {k: {"mapped": [], "owned": []} for k in ("sft", "dpo")}
    for kind, modes in stages.items():
        for r in range(a.stage_repeats):
            for mode in modes:
                modes[mode].append(child(["--child", mode, "--stage", kind, "--precision", a.precision,
                                          "--data", a.data]))
                print(kind, mode, {k: v for k, v in modes[mode][-1].items() if k != "later_steps_s"}, flush=True)
    from postlab.run import cpu_name

    med = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in runs.items()}
    stage_med = {kind: {m: {k: statistics.median(x[k] for x in rs) for k in ("stage_s", "reference_s", "first_step_s")}
                        for m, rs in modes.items()} for kind, modes in stages.items()}
    Path(a.out).write_text(json.dumps({"machine": cpu_name(), "precision": a.precision, "repeats": a.repeats,
                                       "stage_repeats": a.stage_repeats, "runs": runs, "median": med,
                                       "stages": stages, "stage_median": stage_med}, indent=2))
    print(f"first step, weights in the file mapping: {med['mapped']['copy_and_first_step_s']:.2f} s "
          f"({med['mapped']['page_faults']:.0f} page faults); copied first: {med['owned']['copy_s']:.2f} s + step = "
          f"{med['owned']['copy_and_first_step_s']:.2f} s ({med['owned']['page_faults']:.0f}); second step "
          f"{med['mapped']['second_step_s']:.2f} / {med['owned']['second_step_s']:.2f} s")
    for kind, m in stage_med.items():
        print(f"{kind} stage (64 examples, {a.precision}): {m['mapped']['stage_s']:.2f} s -> {m['owned']['stage_s']:.2f} s "
              f"({m['mapped']['stage_s'] / m['owned']['stage_s']:.2f}x); its first step {m['mapped']['first_step_s']:.2f} "
              f"-> {m['owned']['first_step_s']:.2f} s")


if __name__ == "__main__":
    main()
