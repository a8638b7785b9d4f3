"""`make demo`: the main job on the embedded model and the shared data, sized for a CPU.

SFT (full fine-tuning) on a slice of the Quora paraphrase pairs, measured on dev before and after,
then a short summary. The study issue turns this into a quick study."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import parse_run_config
from .errors import DataError
from .run import run

log = logging.getLogger("postlab")


def demo_config(data: str, output_dir: str) -> dict:
    quora = Path(data) / "quora"
    return {
        "model": {"name": "smollm2-135m"},
        "output_dir": output_dir,
        "seed": 0,
        "stages": [{
            "name": "sft",
            "task": {"name": "paraphrase", "train": str(quora / "quora-train.tsv"), "dev": str(quora / "quora-dev.tsv"),
                     "train_limit": 800, "dev_limit": 200},
            "objective": {"name": "nll"},
            "parameterization": {"method": "fft"},
            "optim": {"lr": 5e-5, "batch_size": 16, "warmup_ratio": 0.05},
            "epochs": 1,
            "eval_batch_size": 32,
            "save_model": False,
        }],
    }


def demo(data: str, output_dir: str) -> int:
    if not (Path(data) / "quora" / "quora-train.tsv").is_file():
        raise DataError(f"{data}: the shared data (quora/quora-train.tsv) is not there; pass --data DIR")
    cfg = parse_run_config(demo_config(data, output_dir), source="demo")
    log.info("demo: SFT (FFT) of the embedded SmolLM2-135M on 800 Quora pairs, dev on 200; outputs in %s", output_dir)
    result = run(cfg, resume=True)
    stage = result["stages"][0]
    first = _first_dev(Path(output_dir) / "metrics.jsonl")
    m = stage["metrics"]
    print("\n=== postlab demo ===")
    print(f"model      smollm2-135m (embedded), full fine-tuning, {stage['examples']} training pairs, 1 epoch")
    print(f"device     {stage['device']}, {stage['wall_s']:.0f}s training, {stage['tokens']:,} tokens, "
          f"peak memory {stage['peak_mem_mb']:.0f} MB")
    print(f"dev (n={int(m['n'])})   accuracy {first['accuracy']:.3f} -> {m['accuracy']:.3f}, "
          f"macro-F1 {first['macro_f1']:.3f} -> {m['macro_f1']:.3f} "
          f"(majority class: accuracy {m['majority_accuracy']:.3f})")
    print(f"outputs    {output_dir}/ (config.yaml, metrics.jsonl, result.json)")
    return 0


def _first_dev(path: Path) -> dict:
    import json

    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "dev":
            return rec
    return {}
