"""Work done once: evaluations of the same weights, base-model caches shared by FFT and LoRA, and
completed stages shared between runs with the same start (SFT-only and SFT->DPO)."""
from __future__ import annotations

import json

import torch

from helpers import final_weights, run_config, write_pairs
from postlab.cache import weights_hash
from postlab.config import ParameterizationConfig, parse_run_config
from postlab.models import load_lm
from postlab.parameterizations import prepare
from postlab.run import run
from postlab.tasks.paraphrase import Paraphrase


def test_fresh_lora_hashes_like_its_base_and_trained_lora_does_not(tiny_llama):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    base = weights_hash(lm.model)
    peft, _ = prepare(lm.model, ParameterizationConfig(method="lora", lora={"r": 4}))
    assert weights_hash(peft) == base
    with torch.no_grad():
        next(p for n, p in peft.named_parameters() if "lora_B" in n).add_(0.01)
    assert weights_hash(peft) != base


def count_evaluations(monkeypatch) -> list[int]:
    calls = []
    real = Paraphrase.evaluate

    def counted(self, lm, out_dir=None, batch_size=16):
        calls.append(1)
        return real(self, lm, out_dir, batch_size)

    monkeypatch.setattr(Paraphrase, "evaluate", counted)
    return calls


def reusing(tree: dict) -> dict:
    tree["reuse_stages"] = True
    return tree


def sft_then_dpo(tree: dict) -> dict:
    tree["reuse_stages"] = True
    tree["stages"].append({**tree["stages"][0], "name": "dpo", "objective": {"name": "dpo", "beta": 0.1}})
    return tree


def dev_records(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "dev"]


def test_a_stage_start_reuses_the_previous_stage_end_evaluation(tiny_llama, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    calls = count_evaluations(monkeypatch)
    run(parse_run_config(sft_then_dpo(run_config(tiny_llama, tmp_path / "run", data, epochs=1))))
    # sft: start + end; dpo: start (= sft's end, reused) + end
    assert len(calls) == 3
    recs = dev_records(tmp_path / "run")
    assert len(recs) == 4
    sft_end, dpo_start = recs[1], recs[2]
    assert (sft_end["stage"], dpo_start["stage"], dpo_start["step"]) == ("sft", "dpo", 0)
    assert sft_end["accuracy"] == dpo_start["accuracy"] and sft_end["macro_f1"] == dpo_start["macro_f1"]


def test_fft_and_lora_runs_share_the_base_model_evaluation(tiny_llama, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    calls = count_evaluations(monkeypatch)
    run(parse_run_config(run_config(tiny_llama, tmp_path / "fft", data, epochs=1)))
    assert len(calls) == 2
    run(parse_run_config(run_config(tiny_llama, tmp_path / "lora", data, epochs=1,
                                    parameterization={"method": "lora", "lora": {"r": 4}})))
    assert len(calls) == 3  # only the LoRA run's final evaluation is new
    assert dev_records(tmp_path / "fft")[0]["accuracy"] == dev_records(tmp_path / "lora")[0]["accuracy"]


def test_sft_to_dpo_reuses_the_sft_stage_of_an_sft_only_run(tiny_llama, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    calls = count_evaluations(monkeypatch)
    run(parse_run_config(reusing(run_config(tiny_llama, tmp_path / "sft", data, epochs=1))))
    staged = sft_then_dpo(run_config(tiny_llama, tmp_path / "staged", data, epochs=1))
    result = run(parse_run_config(staged))
    # The DPO stage starts from the SFT model reloaded from disk (with its tokenizer saved in a new
    # folder): its starting evaluation is still the SFT run's final one. Only the DPO end is new.
    assert len(calls) == 3
    done = json.loads((tmp_path / "staged" / "0-sft" / "done.json").read_text())
    assert done["reused_from"] == str((tmp_path / "sft" / "0-sft").resolve())
    assert [s["name"] for s in result["stages"]] == ["sft", "dpo"]
    assert not (tmp_path / "staged" / "0-sft" / "checkpoint").exists()
    sft_train = [r for r in map(json.loads, (tmp_path / "staged" / "metrics.jsonl").read_text().splitlines())
                 if r["stage"] == "sft" and r["split"] == "train"]
    assert sft_train, "the reused stage's training records are part of the run's metrics"

    # The same run with reuse off trains its SFT stage, to the same weights (deterministic on CPU),
    # and its DPO stage ends where the run that reused the SFT stage ended.
    fresh = sft_then_dpo(run_config(tiny_llama, tmp_path / "fresh", data, epochs=1))
    fresh["reuse_stages"] = False
    fresh_result = run(parse_run_config(fresh))
    assert "reused_from" not in json.loads((tmp_path / "fresh" / "0-sft" / "done.json").read_text())
    a, b = final_weights(tmp_path / "sft"), final_weights(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh_result["metrics"] == result["metrics"]


def test_a_changed_earlier_stage_is_not_reused(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    run(parse_run_config(reusing(run_config(tiny_llama, tmp_path / "sft", data, epochs=1))))
    other = sft_then_dpo(run_config(tiny_llama, tmp_path / "other", data, epochs=1, optim={"lr": 5e-4}))
    run(parse_run_config(other))
    assert "reused_from" not in json.loads((tmp_path / "other" / "0-sft" / "done.json").read_text())


def test_tensorboard_tracking_mirrors_the_metrics(tiny_llama, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    tree = run_config(tiny_llama, tmp_path / "run", data, epochs=1)
    tree["tracking"] = ["tensorboard"]
    run(parse_run_config(tree))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    logged = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    losses = acc.Scalars("sft/train/loss")
    assert [e.step for e in losses] == [r["step"] for r in logged]
    assert [round(e.value, 5) for e in losses] == [round(r["loss"], 5) for r in logged]
    assert "sft/dev/accuracy" in acc.Tags()["scalars"]


def test_tracking_with_a_missing_package_fails_before_training(tiny_llama, tmp_path, monkeypatch):
    import sys

    import pytest

    from postlab.errors import ConfigError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    tree = run_config(tiny_llama, tmp_path / "run", data, epochs=1)
    tree["tracking"] = ["mlflow"]
    with pytest.raises(ConfigError, match="pip install mlflow"):
        run(parse_run_config(tree))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
