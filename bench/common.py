"""Shared pieces of the benchmarks: the data of each case and one postlab stage, timed.

Every benchmark trains through the same functions a run uses (`tokenize`, `cached_token_logps`,
`train_stage`), so what is timed is the product, not a copy of it.
"""
from __future__ import annotations

import json
import random
import resource
import tempfile
import time
from pathlib import Path

from postlab.config import StageConfig
from postlab.data import Example, Pair, tokenize
from postlab.logprobs import cached_token_logps
from postlab.objectives import get_objective
from postlab.parameterizations import prepare
from postlab.runlog import MetricsLog
from postlab.stage import StageInputs, StagePlan
from postlab.train import train_stage


def case_data(task: str, kind: str, n: int, data: str) -> list[Example] | list[Pair]:
    """`n` training examples (kind "sft") or pairs (kind "dpo") of `task`. Sonnet pairs take the true
    continuation as chosen and another sonnet's continuation as rejected: multi-token answers of
    different lengths, without the cost of sampling (which is not what these benchmarks measure)."""
    from postlab.config import TaskConfig
    from postlab.tasks import get_task

    if task == "paraphrase":
        t = get_task(TaskConfig(name="paraphrase", train=f"{data}/quora/quora-train.tsv", train_limit=n))
        return t.train_examples() if kind == "sft" else t.preference_pairs("train")
    t = get_task(TaskConfig(name="sonnets", train=f"{data}/sonnets/sonnets.txt"))
    ex = t.train_examples()
    ex = (ex * (n // len(ex) + 1))[:n]
    if kind == "sft":
        return ex
    shift = random.Random(0).sample(range(len(ex)), len(ex))
    return [Pair(e.prompt, e.completion, ex[j if j != i else (i + 1) % len(ex)].completion, e.id)
            for i, (e, j) in enumerate(zip(ex, shift))]


def postlab_stage(lm, objective: str, raw, batch: int, lr: float, append_eos: bool, beta: float = 0.1,
                  group_by_length: bool = True, parameterization: dict | None = None, optim: dict | None = None,
                  max_completion_tokens: int | None = None) -> dict:
    """Tokenize, compute reference log-probs when the objective needs them (as a run does, in batches
    of the stage's eval_batch_size; fresh cache: always computed), and train one epoch. Returns seconds, tokens, the per-step losses and train records."""
    spec = get_objective(objective)
    obj = {"name": objective, "beta": beta} if spec.kind == "preference" else {"name": objective}
    cfg = StageConfig(name=objective, task={"name": "file"}, objective=obj, optim={"lr": lr, "batch_size": batch, **(optim or {})},
                      eval_at_start=False, log_every=1, group_by_length=group_by_length,
                      parameterization=parameterization or {"method": "fft"})
    lm.model, _ = prepare(lm.model, cfg.parameterization)
    with tempfile.TemporaryDirectory() as d:
        items, _ = tokenize(raw, lm.tokenizer, lm.max_length, append_eos=append_eos,
                            max_completion_tokens=max_completion_tokens)
        t0 = time.perf_counter()
        ref = cached_token_logps(lm, items, "reference", cfg.eval_batch_size, Path(d)) if spec.needs_reference else None
        t_ref = time.perf_counter() - t0
        out = train_stage(lm, StagePlan(cfg, items, Path(d), 0, StageInputs(reference=ref)),
                          MetricsLog(Path(d) / "m.jsonl"), lambda step, final: {})
        seconds = time.perf_counter() - t0
        train = [r for r in map(json.loads, (Path(d) / "m.jsonl").read_text().splitlines())
                 if r.get("split") == "train" and "loss" in r]
    data_tokens = sum(len(it.prompt) + sum(len(c) for c in it.completions) for it in items)
    return {"seconds": seconds, "reference_s": t_ref, "tokens": data_tokens, "losses": [r["loss"] for r in train],
            "train_records": train,
            "examples": len(items), "steps": out["steps"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
