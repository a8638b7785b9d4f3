"""Gradient clipping on the CPU: PyTorch's clip_grad_norm_ against postlab's (distributed.clip_grad_norm,
the norm taken over each gradient's rows), on the embedded model's gradients: time and accuracy.

    .venv/bin/python bench/clip_norm.py --repeats 15 --out bench/results/clip_norm.json

The gradients are seeded normal noise of the size of every trainable weight of the embedded model
(fp32, as postlab trains). Each repeat restores them and times one clip of each way, in alternation
(medians). Accuracy: each way's norm against the norm summed in float64.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from postlab.distributed import clip_grad_norm
from postlab.run import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--out", default="bench/results/clip_norm.json")
    a = ap.parse_args()
    from postlab.models import load_lm

    params = [p for p in load_lm("smollm2-135m", device="cpu", precision="fp32").model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    exact = torch.sqrt(sum((n.double() ** 2).sum() for n in noise)).item()
    ways = {"torch": lambda: torch.nn.utils.clip_grad_norm_(params, a.max_norm),
            "postlab": lambda: clip_grad_norm(params, a.max_norm)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    norms: dict[str, float] = {}
    for i in range(a.repeats + 1):  # the first round warms up
        for name, clip in ways.items():
            for p, n in zip(params, noise):
                p.grad = n.clone()
            t = time.perf_counter()
            norms[name] = clip().item()
            if i:
                times[name].append(time.perf_counter() - t)
    result = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "weights": sum(p.numel() for p in params), "norm_float64": exact,
              **{name: {"median_s": round(statistics.median(times[name]), 5), "norm": norms[name],
                        "relative_error": (norms[name] - exact) / exact} for name in ways},
              "speedup": round(statistics.median(times["torch"]) / statistics.median(times["postlab"]), 3),
              "command": "python bench/clip_norm.py" + "".join(
                  f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v != ap.get_default(k))}
    for name in ways:
        print(f"{name:8s} {result[name]['median_s'] * 1e3:7.1f} ms  norm {norms[name]:.7f} "
              f"(relative error {result[name]['relative_error']:+.1e})")
    print(f"postlab's clip {result['speedup']:.2f}x torch's ({torch.get_num_threads()} threads)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
