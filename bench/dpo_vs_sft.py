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
from pathlib import Path

import torch

from common import case_data, postlab_stage
from postlab.models import load_lm


def one_stage(model: str, objective: str, pairs: int, batch: int, data: str) -> float:
    """Seconds for a whole stage: tokenizing excluded, the reference pass (DPO) included."""
    raw = case_data("paraphrase", "sft" if objective == "nll" else "dpo", pairs, data)
    return postlab_stage(load_lm(model), objective, raw, batch, 1e-5, append_eos=False)["seconds"]


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
