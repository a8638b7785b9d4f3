"""Where the time of a postlab training step goes, by operator class (torch.profiler), and how fast
the matrix multiplications run compared with this machine's measured matmul peak.

    .venv/bin/python bench/profile_step.py                          # SFT, paraphrase, batch 16
    .venv/bin/python bench/profile_step.py --kind dpo --task sonnets --batch 8
    .venv/bin/python bench/profile_step.py --precision bf16          # bf16 autocast, against the bf16 peak
    python bench/profile_step.py --device cuda --precision bf16 --out bench/results/profile_sft_cuda.json
                                # on a GPU: also its kernel time per step (how busy the GPU is) and launches

    .venv/bin/python bench/profile_step.py --precision bf16 --emulate-bf16-matmuls
                                # on a CPU without native bf16: the work around a bf16 step's matmuls

Trains one stage through the same `train_stage` a run uses and profiles its last `--steps` steps,
after `--skip` steps (the first creates the optimizer state and faults in the process's memory;
steady state is what a long stage sees). Records the page faults and system CPU time of the
profiled steps next to those of the unprofiled steps before them: the profiler must not change
what it measures. Writes bench/results/profile_<kind>_<task>[_bf16].json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils._python_dispatch import TorchDispatchMode

import postlab.train as train_mod
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


class EmulatedBf16Matmuls(TorchDispatchMode):
    """bf16 matmuls computed in fp32 and rounded back to bf16: on a CPU without native bf16 (where they
    are ~100x slower than fp32) a bf16 step then runs in reasonable time with every other op as it is,
    so the breakdown shows the work around the matmuls. Their own time means nothing here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            return func(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **kwargs).bfloat16()
        return func(*args, **kwargs)


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}
EMULATED_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


class StepProfile:
    """Per-op totals over the profiled steps. Each step is its own profiler cycle, read and dropped
    when it ends: one profile holding every step's events grew the heap between the step's large
    tensors, so that malloc could no longer reuse their memory and faulted it in afresh each step
    (~83,000 page faults and ~1.3 s system time per step, the [vocab, d] gradient's ops 50x slower;
    2-core AVX2 EPYC, fp32)."""

    def __init__(self, emulated: bool, gpu: bool):
        self.emulated, self.gpu = emulated, gpu
        self.by_op: dict[str, list] = defaultdict(lambda: [0.0, 0])  # aten op -> [self seconds, calls]
        self.flops = 0.0
        self.kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])  # GPU kernel -> [seconds, calls]
        self.launches, self.cycles, self.read_s = 0, 0, 0.0

    def read(self, prof) -> None:
        t = time.perf_counter()
        self.cycles += 1
        for e in prof.events():
            if self.gpu and e.device_type.name == "CUDA":
                self.kernels[e.name][0] += e.self_device_time_total / 1e6
                self.kernels[e.name][1] += 1
            if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"):
                self.launches += 1
            if not e.name.startswith("aten::") or (self.emulated and self._emulation_detail(e)):
                continue
            self.by_op[e.name][0] += e.self_cpu_time_total / 1e6
            self.by_op[e.name][1] += 1
            self.flops += matmul_flops(e.name, e.input_shapes)
        self.read_s += time.perf_counter() - t

    @staticmethod
    def _emulation_detail(e) -> bool:
        """The outer record of an op the dispatch mode passed on (its self time is the mode's Python; the
        op's own record is inside the mode's), or an op inside an emulated matmul (its fp32 casts and
        product). The profiler records the mode as a PythonDispatchMode event between the two."""
        if any(c.name == "PythonDispatchMode" for c in e.cpu_children):
            return True
        p = e.cpu_parent
        while p is not None:
            if p.name == "PythonDispatchMode" and p.cpu_parent is not None and p.cpu_parent.name in EMULATED_OPS:
                return True
            p = p.cpu_parent
        return False


def profiled_stage(lm, objective: str, raw, batch: int, skip: int, steps: int, gpu: bool, emulated: bool):
    """Train one stage of skip + steps steps; profile the last `steps`, one cycle each. Returns the
    stage's output, the StepProfile, and the profiled steps' wall seconds, page faults and system CPU
    seconds next to those of the unprofiled steps after the first (from step 2 to `skip`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    result = StepProfile(emulated, gpu)
    warnings.filterwarnings("ignore", message=".*(won't be using warmup|clears events at the end of each cycle)")
    prof = profile(activities=activities, record_shapes=True, on_trace_ready=result.read,
                   schedule=schedule(wait=0, warmup=0, active=1, repeat=steps))
    marks: list[tuple[float, int, float]] = []  # after each optimizer step: (time, minor faults, system CPU s)
    step_fn = train_mod._optimizer_step

    def counted_step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        if gpu:
            torch.cuda.synchronize()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # the time spent reading earlier cycles is taken out of the marks
        marks.append((time.perf_counter() - result.read_s, usage.ru_minflt, usage.ru_stime))
        if len(marks) == skip:
            prof.start()
        elif len(marks) > skip:
            prof.step()  # this step's cycle ends and is read
        return out

    train_mod._optimizer_step = counted_step
    try:
        with EmulatedBf16Matmuls() if emulated else contextlib.nullcontext():
            out = postlab_stage(lm, objective, raw, batch, 1e-5, append_eos=True)
    finally:
        train_mod._optimizer_step = step_fn
        if len(marks) >= skip:
            prof.stop()
    if len(marks) != skip + steps:
        raise SystemExit(f"the stage took {len(marks)} steps, not {skip + steps}")

    def window(a: int, b: int) -> dict:  # steps a+1..b (1-based marks)
        (t0, f0, s0), (t1, f1, s1), n = marks[a - 1], marks[b - 1], b - a
        return {"steps": n, "step_s": (t1 - t0) / n, "page_faults_per_step": (f1 - f0) / n,
                "system_cpu_s_per_step": (s1 - s0) / n}

    return out, result, {"unprofiled": window(1, skip) if skip > 1 else None, "profiled": window(skip, skip + steps)}


def repeated(repeats: int, path: Path) -> None:
    """Run this script `repeats` times, each a fresh process; keep the run whose profiled steps took
    the median time, with every run's step time, shares and faults beside it."""
    argv = [x for i, x in enumerate(sys.argv[1:]) if x != "--repeats" and sys.argv[i] != "--repeats"]
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            out = Path(d) / f"{i}.json"
            subprocess.run([sys.executable, __file__, *argv, "--repeats", "1", "--out", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
    runs.sort(key=lambda r: r["windows"]["profiled"]["step_s"])
    kept = runs[len(runs) // 2]
    kept["runs"] = [{"step_s": r["windows"]["profiled"]["step_s"],
                     "page_faults_per_step": r["windows"]["profiled"]["page_faults_per_step"],
                     "aten_self_s_per_step": r["aten_self_s_per_step"],
                     **({"matmul_of_peak": round(r["matmul_flops_per_s"] / r["peak_flops_per_s"], 3)}
                        if "peak_flops_per_s" in r else {}),
                     "share": {c: round(s / r["aten_self_s_per_step"], 4) for c, s in r["by_class_s_per_step"].items()}}
                    for r in runs]
    kept["command"] = "python bench/profile_step.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(kept, indent=2))
    for r in kept["runs"]:
        print(f"  {r['step_s']:.2f} s/step, {r['page_faults_per_step']:.0f} faults/step, shares {r['share']}")
    print(f"median run written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="sft", choices=["sft", "dpo"])
    ap.add_argument("--task", default="paraphrase", choices=["paraphrase", "sonnets"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="steps profiled")
    ap.add_argument("--skip", type=int, default=3, help="steps before them, not profiled (at least 1)")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--emulate-bf16-matmuls", action="store_true",
                    help="compute bf16 matmuls in fp32 (CPUs without native bf16); matmul time then means nothing")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes; the run with the median step time is kept")
    ap.add_argument("--out", default=None, help="default bench/results/profile_<kind>_<task>[_bf16].json")
    a = ap.parse_args()
    suffix = "_bf16" if a.precision == "bf16" else ""
    path = Path(a.out or f"bench/results/profile_{a.kind}_{a.task}{suffix}.json")
    if a.repeats > 1:
        return repeated(a.repeats, path)
    if a.skip < 1:
        ap.error("--skip must be at least 1")
    emulated = a.emulate_bf16_matmuls
    if emulated and (a.precision != "bf16" or a.device != "cpu"):
        ap.error("--emulate-bf16-matmuls goes with --precision bf16 on the CPU")

    dtype = torch.bfloat16 if a.precision == "bf16" and not emulated else torch.float32
    gpu = a.device == "cuda"
    peak_n = 8192 if gpu else 1024 if dtype == torch.bfloat16 else 2048
    peak = matmul_peak(dtype, n=peak_n, device=a.device)
    lm = load_lm("smollm2-135m", device=a.device, precision=a.precision)
    raw = case_data(a.task, a.kind, a.batch * (a.skip + a.steps), a.data)
    objective = "nll" if a.kind == "sft" else "dpo"
    out, prof, windows = profiled_stage(lm, objective, raw, a.batch, a.skip, a.steps, gpu, emulated)
    # the peak again after the stage, the higher one kept: a VM's speed drifts within minutes
    peak = max(peak, matmul_peak(dtype, n=peak_n, device=a.device))
    by_class: dict[str, float] = defaultdict(float)
    for op, (s, _) in prof.by_op.items():
        by_class[classify(op)] += s / a.steps
    if emulated:
        by_class.pop("matmul", None)
    ops = sum(by_class.values())
    rows = sorted(by_class.items(), key=lambda kv: -kv[1])
    matmul_s = by_class.get("matmul", 0.0) * a.steps
    result = {"machine": cpu_name(), "kind": a.kind, "task": a.task, "precision": a.precision,
              "emulated_bf16_matmuls": emulated, "batch": a.batch, "skip": a.skip, "steps": a.steps,
              "windows": windows, "aten_self_s_per_step": ops, "by_class_s_per_step": dict(rows),
              "top_ops": [{"op": op, "self_s_per_step": s / a.steps, "calls_per_step": n / a.steps}
                          for op, (s, n) in sorted(prof.by_op.items(), key=lambda kv: -kv[1][0])[:20]]}
    if not emulated:
        result.update(matmul_flops_per_step=prof.flops / a.steps, matmul_flops_per_s=prof.flops / max(matmul_s, 1e-9),
                      peak_flops_per_s=peak)
    if gpu:  # on a GPU the aten ops' times are the host's launch work; the GPU's is its kernels' time
        busy = sum(s for s, _ in prof.kernels.values())
        gemm = sum(s for k, (s, _) in prof.kernels.items() if re.search(GEMM_KERNELS, k, re.I))
        wall = windows["profiled"]["step_s"] * a.steps
        result.update(gpu=torch.cuda.get_device_name(), gpu_kernel_s_per_step=busy / a.steps,
                      gpu_busy_fraction=busy / wall, gpu_gemm_s_per_step=gemm / a.steps,
                      matmul_flops_per_s=prof.flops / max(gemm, 1e-9), kernel_launches_per_step=prof.launches / a.steps,
                      top_kernels=[{"kernel": k[:120], "s_per_step": s / a.steps, "calls_per_step": n / a.steps}
                                   for k, (s, n) in sorted(prof.kernels.items(), key=lambda kv: -kv[1][0])[:15]])
    path.write_text(json.dumps(result, indent=2))
    p, u = windows["profiled"], windows["unprofiled"]
    print(f"{a.kind} on {a.task}, {a.precision}{' (matmuls emulated in fp32)' if emulated else ''}, batch {a.batch}: "
          f"steps {a.skip + 1}-{a.skip + a.steps} profiled, {p['step_s']:.2f} s/step, {p['page_faults_per_step']:.0f} page "
          f"faults/step, {p['system_cpu_s_per_step']:.2f} s system CPU/step" +
          (f" (unprofiled steps 2-{a.skip}: {u['step_s']:.2f} s/step, {u['page_faults_per_step']:.0f} faults/step)" if u else ""))
    print(f"aten self time per step: {ops:.2f} s")
    for cls, s in rows:
        print(f"  {cls:32s} {s:7.3f} s  {100 * s / ops:5.1f}%")
    if gpu:
        print(f"GPU kernels {busy / a.steps:.3f} s/step ({100 * result['gpu_busy_fraction']:.0f}% busy, the rest waits on "
              f"the host); {prof.launches / a.steps:.0f} kernel launches per step; (above: the host's time per op)")
    if not emulated:
        print(f"matmuls: {prof.flops / a.steps / 1e9:.0f} GFLOP/step at {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"{100 * result['matmul_flops_per_s'] / peak:.0f}% of the measured {a.precision} peak ({peak / 1e9:.1f} GFLOP/s)")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
