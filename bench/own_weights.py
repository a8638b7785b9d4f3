"""The first optimizer step of a freshly loaded model, with its weights left in transformers' file
mapping (copy-on-write) against copied first into memory of their own (models.own_trainable_weights,
what train_stage does).

    .venv/bin/python bench/own_weights.py --repeats 5

Each measurement is a fresh process (load the embedded model, give every weight a gradient, build fused
AdamW, time [the copy +] the first step and a second one), the two ways alternating. Medians.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/own_weights.json")
    ap.add_argument("--child", choices=["mapped", "owned"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child == "owned")))
        return
    runs: dict[str, list[dict]] = {"mapped": [], "owned": []}
    for r in range(a.repeats):
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(mode, runs[mode][-1], flush=True)
    from postlab.run import cpu_name

    med = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in runs.items()}
    Path(a.out).write_text(json.dumps({"machine": cpu_name(), "repeats": a.repeats, "runs": runs, "median": med},
                                      indent=2))
    print(f"first step, weights in the file mapping: {med['mapped']['copy_and_first_step_s']:.2f} s "
          f"({med['mapped']['page_faults']:.0f} page faults); copied first: {med['owned']['copy_s']:.2f} s + step = "
          f"{med['owned']['copy_and_first_step_s']:.2f} s ({med['owned']['page_faults']:.0f}); second step "
          f"{med['mapped']['second_step_s']:.2f} / {med['owned']['second_step_s']:.2f} s")


if __name__ == "__main__":
    main()
