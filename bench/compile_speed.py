"""Does `torch.compile` pay on this machine? An SFT stage (paraphrase, batch 16) eager vs with the
decoder's forward compiled (inductor, dynamic shapes), compile time measured separately.

    .venv/bin/python bench/compile_speed.py --n 64 --repeats 3
    .venv/bin/python bench/compile_speed.py --n 64 --repeats 3 --precision bf16 --out bench/results/compile_speed_bf16_avx512bf16.json

Each measurement runs in a fresh process. Steady-state seconds per step exclude the first step of the
compiled run (where compilation happens); its extra time is reported as compile time.
The compiled body is what `model.compile: inductor` runs (postlab.decoder.compiled_body).
Writes bench/results/compile_speed.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(mode: str, n: int, batch: int, data: str, precision: str) -> dict:
    import contextlib

    from common import case_data
    from postlab.config import StageConfig
    from postlab.data import tokenize
    from postlab.decoder import compiled_body
    from postlab.models import load_lm
    from postlab.objectives import get_objective
    from postlab.train import make_optimizer

    lm = load_lm("smollm2-135m", precision=precision)
    context = compiled_body(lm.model, "inductor") if mode == "compiled" else contextlib.nullcontext()
    items, _ = tokenize(case_data("paraphrase", "sft", n, data), lm.tokenizer, lm.max_length, append_eos=True)
    cfg = StageConfig(optim={"lr": 2e-5, "batch_size": batch})
    opt, _ = make_optimizer(lm.model, cfg, n // batch)
    spec = get_objective("nll")
    times = []
    with context:
        _steps(lm, items, batch, spec, opt, times)
    return {"mode": mode, "step_s": times}


def _steps(lm, items, batch, spec, opt, times) -> None:
    from postlab.data import score_batch
    from postlab.logprobs import score
    from postlab.objectives import TokenLogps

    n = len(items)
    for s in range(0, n, batch):
        t = time.perf_counter()
        b = score_batch(items[s:s + batch], lm.tokenizer.pad_token_id)
        logps, mask = score(lm, b)
        loss, _ = spec.fn(TokenLogps(logps, mask), spec.args())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default="bench/results/compile_speed.json")
    ap.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.batch, a.data, a.precision)))
        return
    runs = {"eager": [], "compiled": []}
    for r in range(a.repeats):
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--n", str(a.n), "--batch", str(a.batch),
                                  "--data", a.data, "--precision", a.precision], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(res["step_s"])
            print(f"repeat {r} {mode:8s} steps: {', '.join(f'{t:.1f}' for t in res['step_s'])} s", flush=True)
    steady = {m: statistics.median(statistics.median(s[1:]) for s in rs) for m, rs in runs.items()}
    compile_s = statistics.median(c[0] - statistics.median(c[1:]) for c in runs["compiled"]) - \
        statistics.median(e[0] - statistics.median(e[1:]) for e in runs["eager"])
    result = {"n": a.n, "batch": a.batch, "repeats": a.repeats, "precision": a.precision, "runs": runs, "steady_step_s": steady,
              "compiled_over_eager": steady["compiled"] / steady["eager"], "compile_s": compile_s,
              "command": " ".join(["python"] + sys.argv)}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"steady step: eager {steady['eager']:.2f} s, compiled {steady['compiled']:.2f} s "
          f"({result['compiled_over_eager']:.2f}x the time); compile time ~{compile_s:.0f} s")


if __name__ == "__main__":
    main()
