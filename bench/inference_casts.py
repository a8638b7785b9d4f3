"""What one autocast region per pass (`LM.inference`) saves against one per forward: a reference pass
(log-probs of 64 paraphrase pairs, batch 16, as a DPO stage's) and a generation (16 prompts, 32 new
tokens, greedy), with the weights trainable (full fine-tuning), frozen (a teacher), and as a LoRA r=8
model on all linear layers (frozen base, trainable adapters: a LoRA stage's evaluation).

    .venv/bin/python bench/inference_casts.py --repeats 5

Autocast casts each fp32 weight to bf16 where a forward uses it, and reuses the cast within its region
only for leaves that require grad: with a region per forward (postlab before; this benchmark's
baseline), every batch of a pass casts every weight again, and every generated token every frozen one. One process, the embedded model in bf16 autocast; the two ways alternate
within each repeat; medians. Writes bench/results/inference_casts.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from common import case_data
from postlab.config import GenerationConfig, StageConfig
from postlab.data import tokenize
from postlab.generate import generate
from postlab.logprobs import token_logps
from postlab.models import LM, load_lm
from postlab.parameterizations import prepare
from postlab.run import cpu_name

ONE_PER_PASS = LM.inference
LORA = {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05}}  # configs/sonnets-sft-lora.yaml's
# The regions as they were: score_all's batches each entered their own autocast; generate() wrapped its
# model.generate call in one (which reuses the casts of weights that require grad across tokens).
PER_FORWARD = {"reference pass": lambda self: contextlib.nullcontext(), "generation": lambda self: self.autocast()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/inference_casts.json")
    a = ap.parse_args()

    lm = load_lm("smollm2-135m", precision="bf16")
    items, _ = tokenize(case_data("paraphrase", "dpo", 64, a.data), lm.tokenizer, lm.max_length, append_eos=True)
    prompts = [p.prompt for p in case_data("paraphrase", "dpo", 16, a.data)]
    gen = GenerationConfig(max_new_tokens=32, batch_size=16, greedy=True)
    jobs = {"reference pass": lambda: token_logps(lm, items, 16),
            "generation": lambda: generate(lm, prompts, gen, desc=None)}

    full = lm.model
    lora = prepare(copy.deepcopy(full), StageConfig(parameterization=LORA).parameterization)[0]
    weights = {"trainable": (full, True), "frozen": (full, False), "lora r=8": (lora, None)}
    times: dict = {}
    outputs: dict = {}
    try:
        for rep in range(a.repeats + 1):  # the first round warms memory and is not kept
            for w, (model, trainable) in weights.items():
                lm.model = model
                if trainable is not None:
                    model.requires_grad_(trainable)
                for job, fn in jobs.items():
                    for way, region in (("per forward", PER_FORWARD[job]), ("per pass", ONE_PER_PASS)):
                        LM.inference = region
                        t = time.perf_counter()
                        out = fn()
                        if rep:
                            times.setdefault(job, {}).setdefault(w, {}).setdefault(way, []).append(time.perf_counter() - t)
                        outputs.setdefault((job, w == "lora r=8"), []).append(out)
    finally:
        LM.inference = ONE_PER_PASS
    same = {f"{job}{' (lora)' if is_lora else ''}": all(_equal(o, outs[0]) for o in outs)
            for (job, is_lora), outs in outputs.items()}

    results = {job: {w: {way: {"seconds": s, "median_s": statistics.median(s)} for way, s in ways.items()}
                     for w, ways in by_w.items()} for job, by_w in times.items()}
    for job, by_w in results.items():
        for w, ways in by_w.items():
            ways["per_pass_speedup"] = ways["per forward"]["median_s"] / ways["per pass"]["median_s"]
            print(f"{job:15s} {w:10s} per forward {ways['per forward']['median_s']:6.2f} s  per pass "
                  f"{ways['per pass']['median_s']:6.2f} s  {ways['per_pass_speedup']:.2f}x")
    print("outputs identical across ways and weights:", same)
    meta = {"machine": cpu_name(), "cpus": torch.get_num_threads(), "torch": torch.__version__, "precision": "bf16",
            "repeats": a.repeats, "outputs_identical": same,
            "command": f"python bench/inference_casts.py --repeats {a.repeats} --out {a.out}"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("written to", a.out)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


if __name__ == "__main__":
    main()
