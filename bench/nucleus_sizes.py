"""How many tokens a top-p nucleus holds when sampling sonnets with the embedded model: what decides
where `generate.SampleNucleus` looks for it (its top 256, then 2,048 tokens, then the whole row).

    .venv/bin/python bench/nucleus_sizes.py --batch 48 --max-new-tokens 100 --out bench/results/nucleus_sizes.json

Samples `--batch` sonnet continuations (the 12 held-out prompts first, then training ones; T=1,
top-p 0.9, seed 0) through postlab's `generate` and records, at every step and row, the size of the
nucleus from a whole-row sort of the same scores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import postlab.generate as gen
    from postlab.models import load_lm
    from postlab.run import cpu_name
    from postlab.tasks import get_task
    from postlab.tasks.base import GenerationConfig, TaskConfig

    lm = load_lm("smollm2-135m", precision=a.precision)
    task = get_task(TaskConfig(name="sonnets", train=f"{a.data}/sonnets/sonnets.txt"))
    prompts = [e.prompt for e in task.dev_examples() + task.train_examples()][:a.batch]
    sizes: list[int] = []
    draw = gen.SampleNucleus.__call__

    def recording(self, input_ids, scores):
        probs = scores.float().log_softmax(-1).sort(dim=-1, descending=True).values.exp()
        sizes.extend(((probs.cumsum(-1) - probs) < self.top_p).sum(-1).tolist())
        return draw(self, input_ids, scores)

    gen.SampleNucleus.__call__ = recording
    try:
        gen.generate(lm, prompts, GenerationConfig(top_p=a.top_p, max_new_tokens=a.max_new_tokens, batch_size=a.batch),
                     desc=None)
    finally:
        gen.SampleNucleus.__call__ = draw
    s = torch.tensor(sizes, dtype=torch.float)
    result = {
        "meta": {"machine": cpu_name(), "precision": a.precision, "prompts": len(prompts),
                 "max_new_tokens": a.max_new_tokens, "top_p": a.top_p, "command": "python " + " ".join(sys.argv)},
        "rows": len(sizes),
        "quantiles": {str(q): float(s.quantile(q)) for q in (0.5, 0.75, 0.9, 0.95, 0.99)},
        "max": int(s.max()),
        "share_larger_than": {str(k): round(float((s > k).float().mean()), 4) for k in (64, 256, 1024, 2048, 4096)},
    }
    print(json.dumps(result, indent=1))
    if a.out:
        from postlab.checkpoint import atomic_write_json

        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
