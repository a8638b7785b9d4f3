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

def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "0-sft" / "checkpoint" / "trainable.safetensors"))

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
