"""What the LM head's precision under bf16 autocast buys and costs: the head in fp32, autocast's plain
bf16 head (bf16 logits), and postlab's default, a bf16 matmul whose output is shifted per row by minus
the target's logit before it is rounded (`postlab.logprobs._logits`).

    .venv/bin/python bench/head_precision.py            # 96 sequences per task, 3 timing repeats

Accuracy: per-sequence log-probs of the embedded model under bf16 autocast with each head, against
the same model in fp32: the mean absolute error, and each head's excess error over the fp32 head's
(paired over sequences, mean with a 95% interval). Cost: seconds of one SFT stage with each head, in
one process after an untimed warm-up stage, the heads' order rotating each repeat, medians of
`--repeats` and, per pair of repeats, the fp32 head's time over the shifted head's (geometric mean,
95% t-interval): 16 sonnet examples at batch 8 (long completions: the head at ~80 rows per example),
64 paraphrase examples or pairs at batch 16 (two scored tokens per answer). Writes
bench/results/head_precision.json.

    .venv/bin/python bench/head_precision.py --skip-accuracy --heads "fp32 head,shifted bf16 head" \
        --cases "paraphrase SFT,paraphrase DPO" --repeats 6 --out bench/results/head_speed_paraphrase.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from scipy.stats import t

import postlab.logprobs as logprobs
from common import case_data, postlab_stage
from postlab.data import score_batch, tokenize
from postlab.models import load_lm
from postlab.run import cpu_name

SHIFTED = logprobs._logits


def fp32_head(head, h, rows, targets):
    with torch.autocast(h.device.type, enabled=False):
        return head(h.float()), 1


def bf16_head(head, h, rows, targets):  # what autocast does with a Linear: bf16 logits
    return head(h).float(), 1


HEADS = {"fp32 head": fp32_head, "bf16 head": bf16_head, "shifted bf16 head": SHIFTED}


def seq_logps(lm, items) -> torch.Tensor:
    out = []
    with lm.inference():
        for s in range(0, len(items), 16):
            lp, m = logprobs.score(lm, score_batch(items[s:s + 16], lm.tokenizer.pad_token_id))
            out.append((lp * m).sum(-1))
    return torch.cat(out).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/head_precision.json")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--cases", default="sonnets SFT,paraphrase SFT")
    a = ap.parse_args()
    lm32, lm16 = load_lm("smollm2-135m", precision="fp32"), load_lm("smollm2-135m", precision="bf16")
    out: dict = {"meta": {"machine": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "n": a.n, "repeats": a.repeats,
                          "command": "python bench/head_precision.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items())},
                 "accuracy": {}, "stage_s": {}}
    for task in () if a.skip_accuracy else ("paraphrase", "sonnets"):
        items, _ = tokenize(case_data(task, "sft", a.n, a.data), lm32.tokenizer, 2048, append_eos=True)
        logprobs._logits = SHIFTED  # fp32 model: the fp32 head either way
        exact = seq_logps(lm32, items)
        errs = {}
        for name, fn in HEADS.items():
            logprobs._logits = fn
            errs[name] = (seq_logps(lm16, items) - exact).abs()
        for name, e in errs.items():
            d = e - errs["fp32 head"]
            half = 1.96 * d.std().item() / math.sqrt(len(d))
            out["accuracy"][f"{task}, {name}"] = {
                "mean_abs_err_vs_fp32": e.mean().item(), "max_abs_err_vs_fp32": e.max().item(),
                "excess_over_fp32_head": d.mean().item(), "excess_ci95": [d.mean().item() - half, d.mean().item() + half],
                "mean_abs_logp": exact.abs().mean().item()}
            print(task, name, {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v])
                               for k, v in out["accuracy"][f"{task}, {name}"].items()}, flush=True)
    all_cases = {"sonnets SFT": (lambda: case_data("sonnets", "sft", 16, a.data), 8, "nll"),
                 "paraphrase SFT": (lambda: case_data("paraphrase", "sft", 64, a.data), 16, "nll"),
                 "paraphrase DPO": (lambda: case_data("paraphrase", "dpo", 64, a.data), 16, "dpo")}
    cases = {c: (all_cases[c][0](), *all_cases[c][1:]) for c in a.cases.split(",")}
    names = a.heads.split(",")
    first = next(iter(cases.values()))  # warm-up: the process's first stage pays its first touch of memory
    postlab_stage(load_lm("smollm2-135m", precision="bf16"), first[2], first[0], first[1], 1e-5, append_eos=True)
    for r in range(a.repeats):
        for case, (raw, batch, objective) in cases.items():
            for name in names[r % len(names):] + names[:r % len(names)]:
                logprobs._logits = HEADS[name]
                s = postlab_stage(load_lm("smollm2-135m", precision="bf16"), objective, raw, batch, 1e-5, append_eos=True)
                out["stage_s"].setdefault(case, {}).setdefault(name, []).append(s["seconds"])
                print(f"repeat {r} {case}, {name}: {s['seconds']:.2f}s", flush=True)
    logprobs._logits = SHIFTED
    out["stage_median_s"] = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in out["stage_s"].items()}
    out["fp32_over_shifted"] = {}
    for case, d in out["stage_s"].items():
        line = f"{case}: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in d.items())
        if {"fp32 head", "shifted bf16 head"} <= d.keys() and len(d["fp32 head"]) > 1:
            logs = [math.log(x / y) for x, y in zip(d["fp32 head"], d["shifted bf16 head"])]
            mean, half = statistics.mean(logs), t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
            ratio = {"geomean": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)]}
            out["fp32_over_shifted"][case] = ratio
            line += f"; fp32 head / shifted = {ratio['geomean']:.2f}x (95% CI {ratio['ci95'][0]:.2f}-{ratio['ci95'][1]:.2f}x)"
        print(line)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
