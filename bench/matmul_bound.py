"""The most MFU a training step of the embedded model could reach here: its matmuls alone, at their
own shapes, against the matmul peak, and the optimizer's fixed cost per step.

    .venv/bin/python bench/matmul_bound.py                      # bf16, 848 tokens a step (16 rows of 53)
    .venv/bin/python bench/matmul_bound.py --tokens 848,3392 --precision bf16

For each token count T: every linear layer of the decoder (from the model's config) as three matmuls
-- the forward [T, in] x [in, out], the input gradient and the weight gradient -- timed back to back
in `--precision` for all layers (the median of `--repeats`), against the peak of a 2048^3 matmul in
the same run. Attention's products, the LM head and everything that is not a matmul are left out,
so the figure is an upper bound on a step's MFU at that T. Also times what every step pays whatever
T is: gradient clipping and fused AdamW over the model's trainable fp32 weights. Prints one line per
T and writes bench/results/matmul_bound.json.

`--per-shape` also times each distinct product at each T in the layout autograd runs it in
(forward x @ W.t(), input gradient g @ W, weight gradient g.t() @ x, W stored [out, in]) on one
thread and on all of them: which products use the cores (on a 2-core AMX CPU, oneDNN runs some
shapes on one core) and how long the step's matmuls would take if each used every thread fully.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from postlab.distributed import clip_grad_norm
from postlab.run import cpu_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear of the decoder (the LM head excluded)."""
    head = model.get_output_embeddings()
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_shape(tokens: int, shapes: list[tuple[int, int]], dtype, repeats: int) -> list[dict]:
    """Each distinct product of a step with `tokens` tokens, as autograd runs it, on one thread and on
    all: seconds per step (times the layers that share it), TFLOP/s and the speed-up from the threads.
    One row per shape is an alternative the step does not run (`alternative`: the weight gradient with
    g.t() copied to a contiguous tensor first, the copy timed with it)."""
    out = []
    for (n_in, n_out), layers in sorted(Counter(shapes).items()):
        x, w, g = (torch.randn(tokens, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype),
                   torch.randn(tokens, n_out, dtype=dtype))
        products = (("forward x @ W.t()", lambda: torch.mm(x, w.t())), ("input grad g @ W", lambda: torch.mm(g, w)),
                    ("weight grad g.t() @ x", lambda: torch.mm(g.t(), x)),
                    ("weight grad, g.t() copied", lambda: torch.mm(g.t().contiguous(), x)))
        for name, fn in products:
            flops = 2 * tokens * n_in * n_out
            s_all = median_s(lambda: [fn() for _ in range(10)], repeats) / 10
            with threads(1):
                s_one = median_s(lambda: [fn() for _ in range(10)], repeats) / 10
            out.append({"in": n_in, "out": n_out, "layers": layers, "product": name, "alternative": "copied" in name,
                        "step_s": round(layers * s_all, 5), "tflops": round(flops / s_all / 1e12, 3),
                        "tflops_one_thread": round(flops / s_one / 1e12, 3), "speedup": round(s_one / s_all, 2),
                        "step_s_if_perfectly_parallel": round(layers * s_one / torch.get_num_threads(), 5)})
            print(f"  {tokens} tokens, {n_in}->{n_out} x{layers} {name:26s} {flops / s_all / 1e12:5.2f} TFLOP/s, "
                  f"one thread {flops / s_one / 1e12:5.2f}: x{s_one / s_all:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="848,3392", help="tokens per step, comma-separated")
    ap.add_argument("--precision", default="bf16", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--per-shape", action="store_true", help="also each product on one thread and on all")
    ap.add_argument("--out", default="bench/results/matmul_bound.json")
    a = ap.parse_args()
    from postlab.models import load_lm

    dtype = DTYPES[a.precision]
    lm = load_lm("smollm2-135m", device="cpu", precision="fp32")
    shapes = linear_shapes(lm.model)
    x, y = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)

    def peak_flops() -> float:  # ~0.5 s of products: a shorter median read the peak low on a VM
        return 2 * 2048 ** 3 / median_s(lambda: torch.mm(x, y), 60)

    peak_before = peak_flops()
    with threads(1):
        peak_one_thread = peak_flops()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def optimizer_step():
        clip_grad_norm(params, 1.0)
        opt.step()

    optimizer_s = median_s(optimizer_step, a.repeats)
    rows = []
    for tokens in map(int, a.tokens.split(",")):
        mats = []
        for n_in, n_out in shapes:  # forward, input gradient, weight gradient
            for m, k, n in ((tokens, n_in, n_out), (tokens, n_out, n_in), (n_out, tokens, n_in)):
                mats.append((torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)))
        flops = sum(2 * p.shape[0] * p.shape[1] * q.shape[1] for p, q in mats)

        def matmuls():
            for p, q in mats:
                torch.mm(p, q)

        s = median_s(matmuls, a.repeats)
        row = {"tokens": tokens, "matmul_s": round(s, 4), "matmul_flops_per_s": flops / s,
               "flops": flops}
        if a.per_shape:
            row["per_shape"] = per_shape(tokens, shapes, dtype, a.repeats)
            run = [r for r in row["per_shape"] if not r["alternative"]]
            row["autograd_layout_matmul_s"] = round(sum(r["step_s"] for r in run), 4)
            row["if_perfectly_parallel_s"] = round(sum(r["step_s_if_perfectly_parallel"] for r in run), 4)
            row["one_thread_s"] = round(row["if_perfectly_parallel_s"] * torch.get_num_threads(), 4)
            print(f"  {tokens} tokens in autograd's layouts: {row['autograd_layout_matmul_s']:.3f} s on "
                  f"{torch.get_num_threads()} threads, {row['one_thread_s']:.3f} s on one; "
                  f"{row['if_perfectly_parallel_s']:.3f} s if each product used every thread fully", flush=True)
        rows.append(row)
    peak = max(peak_before, peak_flops())  # before and after the products, the higher
    for row in rows:
        flops, s = row.pop("flops"), row["matmul_s"]
        row["matmul_share_of_peak"] = round(flops / s / peak, 3)
        row["mfu_bound_with_optimizer"] = round(flops / (s + optimizer_s) / peak, 3)
        print(f"{row['tokens']} tokens: decoder matmuls {s:.3f} s at {flops / s / 1e12:.2f} TFLOP/s = "
              f"{row['matmul_share_of_peak']:.0%} of the {peak / 1e12:.2f} TFLOP/s peak; with clipping + "
              f"AdamW ({optimizer_s:.3f} s) at most {row['mfu_bound_with_optimizer']:.0%}", flush=True)
    result = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "precision": a.precision, "peak_flops_per_s": peak,
              "peak_one_thread_flops_per_s": peak_one_thread, "optimizer_s": round(optimizer_s, 4),
              "linear_layers": len(shapes), "rows": rows,
              "command": "python bench/matmul_bound.py" + "".join(
                  f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                  for k, v in vars(a).items() if v != ap.get_default(k))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
