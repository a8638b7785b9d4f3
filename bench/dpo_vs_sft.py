"""Wall time of a DPO stage vs an SFT stage on the same paraphrase pairs (same model, batch, steps).

The DPO time includes computing the reference log-probs (cache disabled by a fresh cache dir per
repeat), so it is the full cost of the stage. Prints medians over repeats and writes
bench/results/dpo_vs_sft.json.

    .venv/bin/python bench/dpo_vs_sft.py --pairs 128 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from postlab.cache import cached_token_logps
from postlab.config import StageConfig
from postlab.data import tokenize
from postlab.models import load_lm
from postlab.objectives import get_objective
from postlab.tasks import get_task
from postlab.train import MetricsLog, train_stage


def one_stage(model: str, objective: str, pairs: int, batch: int, data: str) -> float:
    lm = load_lm(model)
    cfg = StageConfig(name=objective, task={"name": "paraphrase", "train": f"{data}/quora/quora-train.tsv",
                                            "train_limit": pairs},
                      objective={"name": objective}, optim={"lr": 1e-5, "batch_size": batch}, eval_at_start=False)
    task, spec = get_task(cfg.task), get_objective(objective)
    raw = task.preference_pairs("train") if spec.kind == "preference" else task.train_examples()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        items, _ = tokenize(raw, lm.tokenizer, lm.max_length, append_eos=False)
        ref = cached_token_logps(lm, items, "reference", 32, Path(d)) if spec.needs_reference else None
        train_stage(lm, cfg, spec, spec.args(), items, Path(d), 0, MetricsLog(Path(d) / "m.jsonl"), lambda: {}, ref)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default="../shared/data")
    a = p.parse_args()
    times = {"nll": [], "dpo": []}
    for r in range(a.repeats):  # interleaved, so drift in machine load hits both alike
        for obj in times:
            times[obj].append(one_stage(a.model, obj, a.pairs, a.batch, a.data))
            print(f"repeat {r}: {obj} {times[obj][-1]:.1f}s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Repeat r ran SFT then DPO back to back: their ratio cancels slow drifts in machine load.
    paired = statistics.median(d / s for s, d in zip(times["nll"], times["dpo"]))
    out = {"paired_ratio_median": paired, "model": a.model, "pairs": a.pairs, "batch": a.batch, "repeats": a.repeats, "seconds": times,
           "median_s": med, "dpo_over_sft": med["dpo"] / med["nll"], "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/dpo_vs_sft.json").write_text(json.dumps(out, indent=2))
    print(f"\nSFT stage {med['nll']:.1f}s, DPO stage (incl. reference pass) {med['dpo']:.1f}s: "
          f"DPO/SFT = {out['dpo_over_sft']:.2f} (medians of {a.repeats}); median of per-repeat ratios "
          f"{paired:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
