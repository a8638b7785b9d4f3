"""Sampling speed: postlab's `generate` against transformers' own sampling on the same model, prompts
and machine, for a full model and for a LoRA adapter (trained-like: B != 0).

    .venv/bin/python bench/generation.py --repeats 3 --precision bf16 --out bench/results/generation_bf16_amx.json

Cases, interleaved per repeat (so drift hits all alike), each decoding `--max-new-tokens` tokens for
`--batch` sonnet prompts in one call (the 12 held-out ones first, then training ones: 12 is an
evaluation's batch, 48 the default of preference-pair sampling), temperature 1 and top-p 0.9:
  transformers-fft   model.generate(do_sample=True, top_p=0.9): what a transformers user runs
  postlab-fft        postlab.generate.generate (nucleus found among the top 256, 2048, see SampleNucleus)
  peft-lora          the PEFT model's generate(do_sample=True, top_p=0.9), adapter unmerged
  postlab-lora       postlab.generate.generate on the same PEFT model (decodes a merged copy)
All run inside `lm.inference()` (one autocast region), so weight casts are not what differs.
Each repeat's ratio (baseline seconds / postlab seconds) is a paired observation: reported as their
geometric mean with a 95% interval (bench/paired_ratio.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from postlab.config import StageConfig
    from postlab.generate import generate
    from postlab.models import load_lm
    from postlab.parameterizations import prepare
    from postlab.run import cpu_name
    from postlab.tasks import get_task
    from postlab.tasks.base import GenerationConfig, TaskConfig

    torch.set_num_threads(torch.get_num_threads())
    task = get_task(TaskConfig(name="sonnets", train=f"{a.data}/sonnets/sonnets.txt"))
    prompts = [e.prompt for e in task.dev_examples() + task.train_examples()][:a.batch]  # held-out ones first
    cfg = GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=a.max_new_tokens, seed=0, batch_size=a.batch)
    fft = load_lm("smollm2-135m", precision=a.precision)
    lora_model, _ = prepare(load_lm("smollm2-135m", precision=a.precision).model, StageConfig(
        name="s", task={"name": "sonnets"}, objective={"name": "nll"},
        parameterization={"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}).parameterization)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # a trained adapter's B is not zero: merging then changes the weights
    lora = replace(fft, model=lora_model)

    def transformers_sampling(lm):
        tok = lm.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(0)
        with lm.inference():
            ids = lm.model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=True, temperature=1.0,
                                    top_p=0.9, top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        tok.padding_side = "right"
        return int((ids[:, enc.input_ids.shape[1]:] != tok.pad_token_id).sum())

    def postlab_sampling(lm):
        out = generate(lm, prompts, cfg, desc=None)
        return sum(len(lm.tokenizer(o, add_special_tokens=False).input_ids) for o in out)

    cases = {"transformers-fft": (transformers_sampling, fft), "postlab-fft": (postlab_sampling, fft),
             "peft-lora": (transformers_sampling, lora), "postlab-lora": (postlab_sampling, lora)}
    seconds: dict[str, list[float]] = {c: [] for c in cases}
    tokens: dict[str, list[int]] = {c: [] for c in cases}
    postlab_sampling(fft)  # warm-up: first-call allocations and lazy imports
    for r in range(a.repeats):
        for name, (fn, lm) in cases.items():
            t = time.perf_counter()
            tokens[name].append(fn(lm))
            seconds[name].append(time.perf_counter() - t)
            print(f"repeat {r}: {name:17s} {seconds[name][-1]:6.2f} s  {tokens[name][-1]} tokens", file=sys.stderr)
    med = {c: statistics.median(s) for c, s in seconds.items()}
    from paired_ratio import ratio_ci

    ratio = {arm: ratio_ci([b / p for b, p in zip(seconds[base], seconds[ours])])
             for arm, base, ours in (("fft", "transformers-fft", "postlab-fft"), ("lora", "peft-lora", "postlab-lora"))}
    result = {
        "meta": {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "precision": a.precision, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
                 "repeats": a.repeats, "command": "python " + " ".join(sys.argv)},
        "seconds": seconds, "tokens": tokens, "median_s": med,
        "ms_per_decoding_step": {c: round(1000 * m / a.max_new_tokens, 1) for c, m in med.items()},
        "speedup_vs_baseline": ratio,  # geometric mean of the paired ratios, 95% CI
    }
    print(json.dumps({k: result[k] for k in ("median_s", "ms_per_decoding_step", "speedup_vs_baseline")}, indent=1))
    if a.out:
        from postlab.checkpoint import atomic_write_json

        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
