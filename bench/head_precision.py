"""What running the LM head in fp32 (postlab's default under bf16 autocast) buys and costs.

    .venv/bin/python bench/head_precision.py            # 16 items per task, 3 timing repeats

Accuracy: per-sequence log-probs of the embedded model under bf16 autocast, head in bf16 (autocast's
choice) vs in fp32, against the same model in fp32: the mean and max absolute error, and how much the
log-probs move when the same items are scored in batches of 4 instead of 16 (what separates a policy
forward from its cached reference pass at the first DPO step). Cost: seconds of one SFT stage (8
sonnet examples, batch 8: long completions, the head at ~100 rows per example) with each head, median
of `--repeats`. Writes bench/results/head_precision.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import postlab.logprobs as logprobs
from common import case_data, postlab_stage
from postlab.data import score_batch, tokenize
from postlab.models import load_lm
from postlab.run import cpu_name

FP32_HEAD = logprobs._logits


def bf16_head(head, h):  # what autocast does with a Linear: bf16 logits
    return head(h).float()


def seq_logps(lm, items) -> torch.Tensor:
    sb = score_batch(items, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        lp, m = logprobs.score(lm, sb)
    return (lp * m).sum(-1).view(len(items[0].completions), -1).t()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data")
    a = ap.parse_args()
    lm32, lm16 = load_lm("smollm2-135m", precision="fp32"), load_lm("smollm2-135m", precision="bf16")
    out: dict = {"meta": {"machine": cpu_name(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "n": a.n}, "accuracy": {}, "sft_stage_s": {}}
    for task in ("paraphrase", "sonnets"):
        items, _ = tokenize(case_data(task, "dpo", a.n, a.data), lm32.tokenizer, 2048, append_eos=True)
        exact = seq_logps(lm32, items)
        for name, fn in (("bf16 head", bf16_head), ("fp32 head", FP32_HEAD)):
            logprobs._logits = fn
            whole = seq_logps(lm16, items)
            quarters = torch.cat([seq_logps(lm16, items[i:i + 4]) for i in range(0, len(items), 4)])
            err, moved = (whole - exact).abs(), (whole - quarters).abs()
            out["accuracy"][f"{task}, {name}"] = {
                "mean_abs_err_vs_fp32": err.mean().item(), "max_abs_err_vs_fp32": err.max().item(),
                "mean_abs_batch16_vs_4": moved.mean().item(), "max_abs_batch16_vs_4": moved.max().item(),
                "mean_abs_logp": exact.abs().mean().item()}
            print(task, name, {k: round(v, 4) for k, v in out["accuracy"][f"{task}, {name}"].items()}, flush=True)
    raw = case_data("sonnets", "sft", 8, a.data)
    for r in range(a.repeats):
        for name, fn in (("bf16 head", bf16_head), ("fp32 head", FP32_HEAD)):
            logprobs._logits = fn
            s = postlab_stage(load_lm("smollm2-135m", precision="bf16"), "nll", raw, 8, 1e-5, append_eos=True)
            out["sft_stage_s"].setdefault(name, []).append(s["seconds"])
            print(f"repeat {r} {name}: {s['seconds']:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in out["sft_stage_s"].items()}
    out["sft_stage_median_s"] = med
    out["fp32_head_time_ratio"] = med["fp32 head"] / med["bf16 head"]
    print(f"sonnets SFT stage, bf16: fp32 head / bf16 head time = {out['fp32_head_time_ratio']:.3f} "
          f"(median of {a.repeats})")
    Path("bench/results/head_precision.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
