"""Is LoRA faster than full fine-tuning here, and what decides it? Times an SFT stage on the same
paraphrase pairs with FFT, LoRA r=8 with dropout 0.05 and LoRA r=8 without dropout, interleaved per
repeat, and prints medians (with peak resident memory from a fresh process per measurement).

    .venv/bin/python bench/lora_speed.py --n 96 --repeats 3 --precision fp32 --out bench/results/lora_speed_fp32.json

`--task sonnets --batch 8 --max-completion-tokens 64` times the sonnet stage of studies/sft-dpo-cpu.yaml.

LoRA skips the weight gradients of the frozen matrices (a backward of ~2N instead of ~4N FLOPs per
token), so its step can approach 4/6 of a full fine-tuning step; dropout on the LoRA input adds a
copy and a mask of every adapted layer's input, kept for the backward pass.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "fft": {"method": "fft"},
    "lora-dropout0.05": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
    "lora-dropout0": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
}


def worker(variant: str, n: int, batch: int, data: str, precision: str, task: str, max_completion: int | None) -> dict:
    from common import case_data, peak_rss_mb, postlab_stage
    from postlab.models import load_lm

    lm = load_lm("smollm2-135m", "cpu", precision)
    out = postlab_stage(lm, "nll", case_data(task, "sft", n, data), batch, 1e-4, append_eos=task == "sonnets",
                        parameterization=VARIANTS[variant], max_completion_tokens=max_completion)
    return {"seconds": out["seconds"], "steps": out["steps"], "peak_rss_mb": peak_rss_mb(), "precision": lm.precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--task", default="paraphrase", choices=["paraphrase", "sonnets"])
    ap.add_argument("--max-completion-tokens", type=int, default=None)
    ap.add_argument("--out", default="bench/results/lora_speed.json")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.batch, a.data, a.precision, a.task, a.max_completion_tokens)))
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TQDM_DISABLE": "1"}
    runs = {v: [] for v in VARIANTS}
    for r in range(a.repeats):
        for v in VARIANTS:
            p = subprocess.run([sys.executable, __file__, "--worker", v, "--n", str(a.n), "--batch", str(a.batch),
                                "--data", a.data, "--precision", a.precision, "--task", a.task]
                               + (["--max-completion-tokens", str(a.max_completion_tokens)]
                                  if a.max_completion_tokens else []), capture_output=True, text=True, env=env)
            if p.returncode:
                raise SystemExit(p.stderr[-3000:])
            runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"repeat {r}: {v:18s} {runs[v][-1]['seconds']:.1f}s", flush=True)
    fft = statistics.median(x["seconds"] for x in runs["fft"])
    table = {v: {"median_s": statistics.median(x["seconds"] for x in rs),
                 "step_s": statistics.median(x["seconds"] / x["steps"] for x in rs),
                 "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs)} for v, rs in runs.items()}
    for v in table:
        table[v]["time_vs_fft"] = table[v]["median_s"] / fft
    from postlab.run import cpu_name

    meta = {"machine": platform.processor() or platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "n": a.n, "batch": a.batch, "repeats": a.repeats, "task": a.task,
            "precision": runs["fft"][0]["precision"], "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": table, "runs": runs}, indent=2))
    print(f"\n{'variant':18s} {'stage s':>8s} {'s/step':>7s} {'vs FFT':>7s} {'peak RSS':>9s}")
    for v, t in table.items():
        print(f"{v:18s} {t['median_s']:8.1f} {t['step_s']:7.2f} {t['time_vs_fft']:6.2f}x {t['peak_rss_mb']:8.0f}M")


if __name__ == "__main__":
    main()
