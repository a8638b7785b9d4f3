"""Where a training step's CPU time goes, sampled by Linux `perf` (no profiler inside the process, so
small ops are not inflated as under torch.profiler): by library, and within libtorch by kernel class.

    .venv/bin/python bench/perf_step.py --precision bf16 --steps 12

Runs SFT steps on one 16-row paraphrase batch (the embedded model; postlab's scoring, the objective,
clipping and fused AdamW, as train_stage calls them), and samples all threads of the process with
`perf record` over `--steps` steps after 3 warm-up steps. oneDNN's matmul kernels (bf16 on AMX or
AVX-512) are generated at run time and show as "[JIT]"; libgomp is OpenMP's threads waiting at
barriers while work is serial. Needs `perf` (linux-perf) and permission to attach to a process.
Writes bench/results/perf_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

KERNELS = [  # (class, regex over libtorch_cpu symbols), first match wins
    ("fp32 matmul (MKL)", r"mkl_blas|sgemm|gemm"),
    ("AdamW", r"adam"),
    ("dtype casts (bf16<->fp32)", r"reduced_float_copy|convert"),
    ("copies", r"copy_kernel|direct_copy|copy_"),
    ("softmax/log-softmax", r"softmax|logsumexp"),
    ("reductions/norms", r"reduce|norm_kernel|sum_kernel|mean_kernel"),
    ("elementwise", r"mul_kernel|add_kernel|div_|silu|sigmoid|pow|rsqrt|neg|sub_|where|fill|exp"),
]


def steps(n: int, precision: str, data: str, ready: Path) -> float:
    import torch

    from common import case_data
    from postlab.data import length_grouped_batches, score_batch, tokenize
    from postlab.distributed import clip_grad_norm
    from postlab.forward import objective_inputs
    from postlab.logprobs import score
    from postlab.models import load_lm, own_trainable_weights
    from postlab.objectives import get_objective

    lm = load_lm("smollm2-135m", precision=precision)
    lm.model.train()
    own_trainable_weights(lm.model)
    items, _ = tokenize(case_data("paraphrase", "sft", 64, data), lm.tokenizer, lm.max_length, append_eos=True)
    idx = length_grouped_batches([it.length for it in items], 16, 0, True)[-1]
    batch = score_batch([items[i] for i in idx], lm.tokenizer.pad_token_id)
    spec = get_objective("nll")
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step():
        logps, mask = score(lm, batch)
        loss, _ = spec.fn(objective_inputs(spec, logps, mask, len(idx)), spec.args())
        loss.backward()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    ready.write_text("go")
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def classify(dso: str, sym: str) -> str:
    if dso.startswith("[JIT]"):
        return "oneDNN JIT kernels (matmul)"
    if "libgomp" in dso:
        return "OpenMP waits (libgomp)"
    if dso.startswith("[kernel"):
        return "kernel (page faults, syscalls)"
    if "libtorch_cpu" in dso:
        for cls, pat in KERNELS:
            if re.search(pat, sym):
                return "libtorch: " + cls
        return "libtorch: other"
    if "python" in dso:
        return "Python interpreter"
    return "other (" + dso + ")"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--top", type=int, default=0, help="also print the N symbols with most samples")
    ap.add_argument("--out", default="bench/results/perf_step.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps({"step_s": steps(a.steps, a.precision, a.data, Path(a.worker))}))
        return
    if not shutil.which("perf"):
        raise SystemExit("perf not found: install linux-perf (Debian: apt install linux-perf)")
    from postlab.run import cpu_name

    with tempfile.TemporaryDirectory() as d:
        ready, data_file = Path(d) / "ready", Path(d) / "perf.data"
        env_path = str(Path(__file__).parent)
        worker = subprocess.Popen([sys.executable, __file__, "--worker", str(ready), "--steps", str(a.steps),
                                   "--precision", a.precision, "--data", a.data], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": env_path, "TQDM_DISABLE": "1"})
        while not ready.exists():
            if worker.poll() is not None:
                raise SystemExit("the worker failed before its steps")
            time.sleep(0.2)
        rec = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(worker.pid), "-o", str(data_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out, _ = worker.communicate()
        rec.send_signal(2)  # SIGINT: perf writes its file and exits
        rec.wait()
        report = subprocess.run(["perf", "report", "-i", str(data_file), "--no-children", "--sort", "dso,sym",
                                 "-g", "none", "--percent-limit", "0", "--stdio"], capture_output=True, text=True)
    share, symbols = Counter(), Counter()
    for line in report.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+(?: tid \d+)?)\s+\[.\]\s+(.*)", line)
        if m:
            share[classify(m.group(2), m.group(3))] += float(m.group(1))
            symbols[(m.group(2), m.group(3).strip()[:110])] += float(m.group(1))
    step_s = json.loads(out.strip().splitlines()[-1])["step_s"]
    total = sum(share.values())
    print(f"{a.precision} SFT step, 16 rows: {step_s:.3f} s/step; CPU samples of all threads by where they fall:")
    for cls, v in share.most_common():
        print(f"  {cls:40s} {100 * v / total:5.1f}%")
    for (dso, sym), v in symbols.most_common(a.top):
        print(f"  {100 * v / total:5.1f}%  {dso[:24]:24s} {sym}")
    result = {"machine": cpu_name(), "precision": a.precision, "steps": a.steps, "step_s": step_s,
              "share_percent": {k: round(100 * v / total, 2) for k, v in share.most_common()},
              "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
