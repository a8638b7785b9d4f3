"""A fixed tiny run's results, recorded before the building-block redesign (issue 16) and compared
after every step of it: SFT -> DPO, full fine-tuning and LoRA, on a paraphrase file, fp32 on CPU.

What is compared: every logged training loss and gradient norm, the dev metrics after each stage and
a per-tensor summary of the final weights (sum and sum of squares), to a relative 1e-4: float
round-off differs between CPUs (AVX2 vs AVX-512 kernels), a change of behaviour does not hide in it.
Regenerate `tests/golden/tiny_runs.json` only for an intended change of results:
`POSTLAB_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from postlab.config import parse_run_config
from postlab.run import run

GOLDEN = Path(__file__).parent / "golden" / "tiny_runs.json"


def write_pairs(path: Path, n: int = 16) -> Path:
    lines = ["id\tsentence1\tsentence2\tis_duplicate"]
    for i in range(n):
        label = int(i % 3 == 0)
        subject = "cooking" if label else "physics"
        lines.append(f"g{i}\tHow do I learn {subject} {i}?\tWhat is the best way to learn {subject} {i % 5}?\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_run(model: Path, out: Path, data: Path, method: str) -> dict:
    stage = {"name": "sft", "task": {"name": "paraphrase", "train": str(data), "dev": str(data), "dev_limit": 8},
             "objective": {"name": "nll"}, "parameterization": {"method": method, "lora": {"r": 4, "dropout": 0.0}},
             "optim": {"lr": 1e-3, "batch_size": 4}, "epochs": 1, "log_every": 1}
    # save_model: false keeps the checkpoint's trainable weights (the golden file's names)
    dpo = {**stage, "name": "dpo", "objective": {"name": "dpo", "beta": 0.1}, "optim": {"lr": 5e-4, "batch_size": 4},
           "save_model": False}
    cfg = {"model": {"name": str(model), "device": "cpu", "precision": "fp32"}, "output_dir": str(out), "seed": 3,
           "reuse_stages": False, "stages": [stage, dpo]}
    result = run(parse_run_config(cfg))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [[r["stage"], r["step"], r["loss"], r["grad_norm"]] for r in records if r["split"] == "train" and "loss" in r]
    dev = [[r["stage"], r["step"], r["accuracy"], r["macro_f1"]] for r in records if r["split"] == "dev"]
    weights = load_file(str(out / "1-dpo" / "checkpoint" / "trainable.safetensors"))
    summary = {k: [float(t.double().sum()), float((t.double() ** 2).sum())] for k, t in sorted(weights.items())}
    return {"train": train, "dev": dev, "metrics": result["metrics"], "weights": summary}


def close(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{path}: keys differ"
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_a_fixed_tiny_run_gives_the_recorded_results(tiny_llama, tmp_path, method):
    got = tiny_run(tiny_llama, tmp_path / "run", write_pairs(tmp_path / "pairs.tsv"), method)
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("POSTLAB_WRITE_GOLDEN"):
        recorded[method] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    assert method in recorded, f"no recorded results for {method}: see this module's docstring"
    # A metric added since the recording (paraphrase's dev_loss) is new, not a change: the recorded ones must hold.
    assert set(recorded[method]["metrics"]) <= set(got["metrics"]), "a recorded metric is gone"
    got["metrics"] = {k: got["metrics"][k] for k in recorded[method]["metrics"]}
    close(got, recorded[method], method)
