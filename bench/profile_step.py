"""Where the time of a postlab training step goes, by operator class (torch.profiler), and how fast
the matrix multiplications run compared with this machine's measured matmul peak.

    .venv/bin/python bench/profile_step.py                          # SFT, paraphrase, batch 16
    .venv/bin/python bench/profile_step.py --kind dpo --task sonnets --batch 8
    .venv/bin/python bench/profile_step.py --precision bf16          # bf16 autocast, against the bf16 peak
    python bench/profile_step.py --device cuda --precision bf16 --out bench/results/profile_sft_cuda.json
                                # on a GPU: also its kernel time per step (how busy the GPU is) and launches

Profiles `--steps` training steps after one warm-up step, through the same `train_stage` a run uses.
Writes bench/results/profile_<kind>_<task>[_bf16].json (and a Chrome trace with --trace).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import case_data, postlab_stage
from mfu import matmul_peak
from postlab.models import load_lm
from postlab.run import cpu_name

CLASSES = [  # (class, regex over aten op names), first match wins
    ("matmul", r"^aten::(mm|addmm|bmm|matmul|linear|baddbmm)$"),
    ("attention", r"scaled_dot_product|flash|_efficient_attention"),
    ("softmax/log-softmax/logsumexp", r"softmax|logsumexp"),
    ("optimizer (AdamW)", r"_fused_adam|adam|_foreach"),
    ("embedding/index/gather", r"embedding|index|gather|scatter|take"),
    ("copies/layout", r"copy_|contiguous|clone|cat|to$|_to_copy|transpose|view|reshape|permute|expand|slice|select"),
    ("elementwise/norm/activation", r"mul|add|sub|div|silu|sigmoid|pow|rsqrt|mean|neg|exp|sum|norm|where|fill|zero|cos|sin"),
]


GEMM_KERNELS = r"gemm|cutlass|xmma|nvjet|matmul"  # cuBLAS/cuBLASLt kernel names (nvjet: Hopper's)


def matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of one call of a matmul op from its input shapes (record_shapes). Counted here rather than
    by the profiler's with_flops, which slowed the profiled stage by half and its elementwise ops
    several-fold (aten::mul 1.2 -> 9.4 s in an fp32 SFT stage on an AVX2 CPU), skewing the breakdown."""
    if name in ("aten::addmm", "aten::baddbmm"):
        shapes = shapes[1:]  # the added input comes first
    if name in ("aten::mm", "aten::addmm") and len(shapes) >= 2 and len(shapes[0]) == 2:
        (m, k), n = shapes[0], shapes[1][-1]
        return 2.0 * m * k * n
    if name in ("aten::bmm", "aten::baddbmm") and len(shapes) >= 2 and len(shapes[0]) == 3:
        (b, m, k), n = shapes[0], shapes[1][-1]
        return 2.0 * b * m * k * n
    return 0.0  # matmul/linear decompose into mm/bmm, which are counted


def classify(name: str) -> str:
    for cls, pat in CLASSES:
        if re.search(pat, name):
            return cls
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="sft", choices=["sft", "dpo"])
    ap.add_argument("--task", default="paraphrase", choices=["paraphrase", "sonnets"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="default bench/results/profile_<kind>_<task>[_bf16].json")
    a = ap.parse_args()

    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    gpu = a.device == "cuda"
    peak_n = 8192 if gpu else 1024 if a.precision == "bf16" else 2048
    peak = matmul_peak(dtype, n=peak_n, device=a.device)
    lm = load_lm("smollm2-135m", device=a.device, precision=a.precision)
    raw = case_data(a.task, a.kind, a.batch * (a.steps + 1), a.data)
    objective = "nll" if a.kind == "sft" else "dpo"
    # Warm-up step outside the profile (allocator, first-call costs), then the profiled steps.
    postlab_stage(load_lm("smollm2-135m", device=a.device, precision=a.precision), objective, raw[:a.batch], a.batch,
                  1e-5, append_eos=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        out = postlab_stage(lm, objective, raw, a.batch, 1e-5, append_eos=True)
    # the peak again after the stage, the higher one kept: a VM's speed drifts within minutes
    peak = max(peak, matmul_peak(dtype, n=peak_n, device=a.device))
    events = prof.key_averages()
    by_class: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("aten::"):
            by_class[classify(e.key)] += e.self_cpu_time_total / 1e6
    flops = sum(e.count * matmul_flops(e.key, e.input_shapes) for e in prof.key_averages(group_by_input_shape=True))
    total = out["seconds"]
    ops = sum(by_class.values())
    rows = sorted(by_class.items(), key=lambda kv: -kv[1])
    result = {"machine": cpu_name(), "kind": a.kind, "task": a.task, "precision": a.precision, "batch": a.batch, "steps": out["steps"], "wall_s": total,
              "aten_self_s": ops, "by_class_s": dict(rows), "matmul_flops": flops,
              "matmul_flops_per_s": flops / max(by_class["matmul"], 1e-9), "peak_flops_per_s": peak,
              "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                          for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]]}
    if gpu:  # on a GPU the aten ops' times are the host's launch work; the GPU's is its kernels' time
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        gemm = sum(e.self_device_time_total for e in kernels if re.search(GEMM_KERNELS, e.key, re.I)) / 1e6
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        result.update(gpu=torch.cuda.get_device_name(), gpu_kernel_s=busy, gpu_busy_fraction=busy / total,
                      gpu_gemm_s=gemm, matmul_flops_per_s=flops / max(gemm, 1e-9),
                      kernel_launches_per_step=launches / out["steps"],
                      top_kernels=[{"kernel": e.key[:120], "s": e.self_device_time_total / 1e6, "calls": e.count}
                                   for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]])
    suffix = "_bf16" if a.precision == "bf16" else ""
    path = Path(a.out or f"bench/results/profile_{a.kind}_{a.task}{suffix}.json")
    path.write_text(json.dumps(result, indent=2))
    if a.trace:
        prof.export_chrome_trace(str(path.with_suffix(".trace.json")))
    print(f"{a.kind} on {a.task}, batch {a.batch}, {out['steps']} steps (+ reference pass for dpo): {total:.1f} s wall, "
          f"{ops:.1f} s in aten ops (self time)")
    for cls, s in rows:
        print(f"  {cls:32s} {s:7.2f} s  {100 * s / ops:5.1f}%")
    if gpu:
        print(f"GPU kernels {busy:.2f} s of {total:.2f} s wall ({100 * busy / total:.0f}% busy, the rest waits on the "
              f"host); {launches / out['steps']:.0f} kernel launches per step; (above: the host's time per op)")
    print(f"matmuls: {flops / 1e9:.0f} GFLOP at {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s = "
          f"{100 * result['matmul_flops_per_s'] / peak:.0f}% of the measured {a.precision} peak ({peak / 1e9:.1f} GFLOP/s)")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
