"""Helpers shared by the test modules (no test module imports another): small data files, run and
study configs for the tiny models, and readers of what a run wrote. Fixtures live in conftest.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

# Fields of metrics.jsonl, done.json and result.json that measure time or memory, not results
VOLATILE = {"tokens_per_s", "step_s", "eval_s", "wall_s", "train_s", "prepare_s", "peak_mem_mb", "time", "reused_from"}

def write_pairs(path: Path, n: int = 24) -> Path:
    lines = ["id\tsentence1\tsentence2\tis_duplicate"]
    for i in range(n):  # the label is learnable from the subject word
        label = int(i % 3 == 0)
        subject = "cooking" if label else "physics"
        lines.append(f"p{i}\tHow do I learn {subject} {i}?\tWhat is the best way to learn {subject} {i % 5}?\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(model: Path, out: Path, data: Path, precision: str = "fp32", **stage) -> dict:
    base = {"name": "sft", "task": {"name": "paraphrase", "train": str(data), "dev": str(data), "dev_limit": 8},
            "optim": {"lr": 1e-3, "batch_size": 4}, "epochs": 2, "log_every": 1}
    for k, v in stage.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    # Tests of training train: no stage copied from another run (tests/test_reuse.py turns it on).
    return {"model": {"name": str(model), "device": "cpu", "precision": precision}, "output_dir": str(out), "seed": 0,
            "stages": [base], "reuse_stages": False}

def split_step_plan(lm, tmp_path: Path, objective: str):
    """A stage plan of 4 optimizer steps on 32 paraphrase pairs, each step 2 micro-batches of 4 run as
    2 forwards of 2 rows, logged once at the end (a DPO stage with its reference pass done)."""
    from postlab.config import StageConfig, TaskConfig
    from postlab.data import tokenize
    from postlab.logprobs import cached_token_logps
    from postlab.stage import StageInputs, StagePlan
    from postlab.tasks import get_task

    task = get_task(TaskConfig(name="paraphrase", train=str(write_pairs(tmp_path / "p.tsv", 32))))
    raw = task.preference_pairs() if objective == "dpo" else task.train_examples()
    items, _ = tokenize(raw, lm.tokenizer, 128, append_eos=False)
    cfg = StageConfig(objective={"name": objective}, optim={"lr": 1e-3, "batch_size": 4, "grad_accum": 2,
                      "forward_rows": 2}, epochs=1, eval_at_start=False, log_every=1000)
    needs = cfg.objective.spec.needs_reference
    reference = cached_token_logps(lm, items, "reference", 8, tmp_path / "ref") if needs else None
    return StagePlan(cfg, items, tmp_path / "stage", 0, StageInputs(reference=reference))


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stage_plan(lm, stage: dict, out: Path, seed: int = 0):
    """The StagePlan a run would train `stage` (a stage config tree) with from `lm`: its items as the stage
    builds them and the cached inputs its objective needs (the reference pass of `lm`, in this test's cache)."""
    from postlab.config import ModelConfig, StageConfig
    from postlab.stage import StagePlan, stage_inputs, stage_items

    cfg = StageConfig(**stage)
    _, items = stage_items(lm, cfg)
    inputs = stage_inputs(lm, ModelConfig(device="cpu", precision="fp32"), cfg, items)
    return StagePlan(cfg, items, out / cfg.name, seed, inputs)


def nudge(model, seed: int = 1, scale: float = 0.05) -> None:
    """Move every weight by a seeded random amount, the same for any copy of the same model: a policy that
    has left its reference (the stage's cached one), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def killed_at_optimizer_step(cfg, n: int) -> None:
    """Run `cfg` until its n-th optimizer step raises KeyboardInterrupt (a kill between checkpoints)."""
    import pytest

    import postlab.train as train_mod
    from postlab.run import run

    real_step, calls = train_mod.torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    train_mod.torch.optim.AdamW.step = dying_step
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    finally:
        train_mod.torch.optim.AdamW.step = real_step


def final_weights(out: Path, stage: str = "0-sft") -> dict[str, torch.Tensor]:
    """A finished stage's trained weights: its model/ (a full model or an adapter) when it wrote one
    (then its checkpoint is gone), else its checkpoint's trainable weights."""
    model = out / stage / "model"
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (model / name).is_file():
            return load_file(str(model / name))
    return load_file(str(out / stage / "checkpoint" / "trainable.safetensors"))

def outcome(run_dir: Path) -> dict:
    """Final weights (hashes of every model file) and metrics, without wall-clock fields."""
    weights = {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(run_dir.rglob("*.safetensors")) if "checkpoint" not in p.parts or "model" in p.parts}
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records.append({k: v for k, v in r.items() if k not in VOLATILE})
    result = json.loads((run_dir / "result.json").read_text())
    stages = [{k: v for k, v in s.items() if k not in VOLATILE} for s in result["stages"]]
    return {"weights": weights, "records": records, "stages": stages}

def tiny_study(tmp_path: Path, model: Path, regimes=("sft", "dpo"), seeds=(0, 1), epochs: int = 1) -> Path:
    data = str(write_pairs(tmp_path / "pairs.tsv", n=16))
    all_regimes = {"sft": {"stages": [{"name": "sft", "objective": {"name": "nll"}}]},
                   "dpo": {"stages": [{"name": "dpo", "objective": {"name": "dpo", "beta": 0.1}}]}}
    tree = {
        "name": "tiny",
        "base": {"model": {"name": str(model), "device": "cpu", "precision": "fp32"},
                 "task": {"name": "paraphrase", "train": data, "dev": data, "dev_limit": 8},
                 "optim": {"lr": 1.0e-3, "batch_size": 4}, "epochs": epochs, "eval_at_start": False,
                 "log_every": 1},
        "axes": {"regime": {k: all_regimes[k] for k in regimes}, "seed": list(seeds)},
    }
    return write_study(tmp_path / "tiny.yaml", tree)


def write_study(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path
