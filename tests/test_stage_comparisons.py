"""A study's `compare_stages` (its arms compared at the end of a named stage too, each stage a Holm
family of its own) and the ref_* metrics of `against_reference` tested example by example: the report
on a fabricated study directory with known per-example values, and `study plan` listing the same
comparisons (torch-free)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from postlab.metrics import AGAINST_REFERENCE, AGAINST_REFERENCE_SPECS, MetricSpec, write_per_example

N, SEEDS = 60, (0, 1, 2)
EVAL_SPECS = {"accuracy": MetricSpec("ratio"), "dev_loss": MetricSpec("ratio", higher_is_better=False)}


def _eval_records(rng, p_correct: float, loss: float) -> list[dict]:
    correct = (rng.random(N) < p_correct).astype(float)
    nll = loss + rng.normal(0, 0.3, N)
    return [{"id": f"q{i}", "score": c, "stats": {"accuracy": [c, 1.0], "dev_loss": [x, 1.0]}}
            for i, (c, x) in enumerate(zip(correct, nll))]


def _reference_records(rng, kl_per_token: float) -> list[dict]:
    """Per pair: [KL summed over 1-6 chosen-answer contexts, contexts], margin, whether ranked right."""
    contexts = rng.integers(1, 7, N).astype(float)
    kl = contexts * (kl_per_token + rng.normal(0, 0.01, N))
    margin = rng.normal(0.1, 0.2, N)
    return [{"id": f"q{i}", "score": m, "stats": {"ref_reward_accuracy": [float(m > 0), 1.0], "ref_reward_margin": [m, 1.0],
                                                   "ref_kl": [k, c]}}
            for i, (k, c, m) in enumerate(zip(kl, contexts, margin))]


def _value(records: list[dict], metric: str, spec: MetricSpec) -> float:
    return float(spec.value(np.sum([r["stats"][metric] for r in records], 0)))


@pytest.fixture
def staged_study(tmp_path):
    """param fft / lora-r8: SFT then DPO (the DPO stage read against its reference), 3 seeds; fft is far
    better after SFT and after DPO stays further from its reference (higher KL); param `dpo-only` runs
    have no sft stage. Returns (study dir, {(param, seed, stage): per-example records})."""
    rng = np.random.default_rng(7)
    root = tmp_path / "study"
    root.mkdir()
    (root / "study.yaml").write_text("name: staged\nmetrics: [accuracy, dev_loss, ref_kl]\ncompare_stages: [sft]\n")
    written = {}
    for param in ("fft", "lora-r8", "dpo-only"):
        for seed in SEEDS:
            d = root / "runs" / f"param={param},seed={seed}"
            stages = ["dpo"] if param == "dpo-only" else ["sft", "dpo"]
            result_stages = []
            for i, stage in enumerate(stages):
                good = param == "fft" and stage == "sft"
                recs = _eval_records(rng, 0.9 if good else 0.6, 1.0 if good else 1.2)
                write_per_example(d / f"{i}-{stage}" / "eval", recs, EVAL_SPECS)
                metrics = {m: _value(recs, m, s) for m, s in EVAL_SPECS.items()}
                written[(param, seed, stage)] = recs
                if stage == "dpo":
                    ref = _reference_records(rng, 0.08 if param == "fft" else 0.05)
                    write_per_example(d / f"{i}-{stage}" / AGAINST_REFERENCE, ref, AGAINST_REFERENCE_SPECS)
                    metrics |= {m: _value(ref, m, s) for m, s in AGAINST_REFERENCE_SPECS.items()} | {"ref_pairs": N}
                    written[(param, seed, "against-reference")] = ref
                result_stages.append({"name": stage, "wall_s": 5.0, "metrics": metrics})
            (d / "metrics.jsonl").write_text(json.dumps({"stage": stages[-1], "split": "train", "step": 5, "loss": 0.5}) + "\n")
            (d / "result.json").write_text(json.dumps({
                "run_id": d.name, "task": "paraphrase", "axes": {"param": param, "seed": seed},
                "metrics": result_stages[-1]["metrics"], "stages": result_stages, "wall_s": 11.0, "device": "cpu"}))
    return root, written


def _expected(written, stage: str, metric: str, spec: MetricSpec) -> float:
    """mean over seeds of the corpus difference fft − lora-r8: the report's estimate."""
    return float(np.mean([_value(written[("fft", s, stage)], metric, spec) - _value(written[("lora-r8", s, stage)], metric, spec)
                          for s in SEEDS]))


def test_report_compares_a_named_stage_in_a_holm_family_of_its_own(staged_study):
    from postlab.report import write_report
    from postlab.report.paired import CROSSED
    from postlab.report.stats import holm

    root, written = staged_study
    text = write_report(root).read_text()
    final = pd.read_csv(root / "report" / "comparisons.csv")
    staged = pd.read_csv(root / "report" / "stage_comparisons.csv")
    # the stage's table: its own evaluation (eval/ of 0-sft), only the runs with an sft stage, no ref_kl there
    assert set(staged["stage"]) == {"sft"} and set(zip(staged["a"], staged["b"])) == {("fft", "lora-r8")}
    assert sorted(staged["metric"]) == ["accuracy", "dev_loss"] and (staged["test"] == CROSSED).all()
    for m, spec in EVAL_SPECS.items():
        row = staged[staged["metric"] == m].iloc[0]
        assert row["mean_diff"] == pytest.approx(_expected(written, "sft", m, spec)) and row["n_examples"] == N
    assert staged.set_index("metric").loc["accuracy", "p_holm"] < 0.05
    # Holm families: the stage's rows among themselves, the final rows among themselves
    assert list(staged["p_holm"]) == pytest.approx(list(holm(staged["p_value"])))
    assert list(final["p_holm"]) == pytest.approx(list(holm(final["p_value"])))
    # the final comparisons test ref_kl example by example, from against-reference/ (its own pairs)
    kl = final[(final["metric"] == "ref_kl") & (final["a"] == "fft") & (final["b"] == "lora-r8")].iloc[0]
    assert kl["test"] == CROSSED and kl["n_examples"] == N and kl["mean_diff"] > 0
    assert kl["mean_diff"] == pytest.approx(_expected(written, "against-reference", "ref_kl", AGAINST_REFERENCE_SPECS["ref_kl"]))
    fin = final[(final["metric"] == "accuracy") & (final["a"] == "fft") & (final["b"] == "lora-r8")].iloc[0]
    assert fin["mean_diff"] == pytest.approx(_expected(written, "dpo", "accuracy", EVAL_SPECS["accuracy"]))
    assert "## Comparisons at the end of a stage" in text and "### At the end of stage sft" in text
    assert "a family of their own" in text.split("## Comparisons at the end of a stage")[1]
    finding = text.split("## Finding")[1].split("\n## ")[0]
    assert "At the end of stage sft, on paraphrase, fft beats lora-r8: higher accuracy by" in finding
    assert "On paraphrase, fft falls behind lora-r8: higher ref_kl by" in finding  # lower KL counts as better


def test_comparing_the_stage_that_ends_every_run_repeats_the_final_comparisons(staged_study):
    """At the end of dpo, every run's last stage, the stage table is the final one: same tests on the
    same per-example files (against-reference/ included), the same Holm family."""
    from postlab.report.comparisons import paired_comparisons
    from postlab.report.results import load_runs
    from postlab.report.stages import stage_comparisons

    root, _ = staged_study
    df = load_runs(root)
    df.attrs["compare_metrics"] = ["accuracy", "dev_loss", "ref_kl"]
    final = paired_comparisons(df, study_dir=root)
    staged = stage_comparisons(df, root, ["dpo"])
    assert set(staged["stage"]) == {"dpo"} and len(staged) == len(final) == 9
    cols = ["a", "b", "metric", "n_examples", "mean_diff", "p_value", "p_holm", "test"]
    pd.testing.assert_frame_equal(staged[cols].reset_index(drop=True), final[cols].reset_index(drop=True))


def test_a_study_without_compare_stages_writes_no_stage_table(staged_study):
    from postlab.report import write_report

    root, _ = staged_study
    (root / "study.yaml").write_text("name: staged\nmetrics: [accuracy]\n")
    text = write_report(root).read_text()
    assert "end of a stage" not in text and not (root / "report" / "stage_comparisons.csv").exists()
    assert set(pd.read_csv(root / "report" / "comparisons.csv")["metric"]) == {"accuracy"}


def _study_file(tmp_path, tiny_llama, **extra) -> Path:
    from helpers import write_pairs

    data = write_pairs(tmp_path / "pairs.tsv", 40)
    sft = {"name": "sft", "objective": {"name": "nll"}}
    dpo = {"name": "dpo", "objective": {"name": "dpo"}, "against_reference": True, "against_reference_examples": 10}
    tree = {"name": "staged", "metrics": ["accuracy", "ref_kl"], "compare_stages": ["sft"],
            "base": {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"},
                     "task": {"name": "paraphrase", "train": str(data), "dev": str(data), "dev_limit": 40},
                     "stages": [sft, dpo]},
            "axes": {"sft_lr": {"high": {"by_stage": {"sft": {"optim": {"lr": 1e-3}}}},
                                "low": {"by_stage": {"sft": {"optim": {"lr": 1e-4}}}}},
                     "seed": [0, 1, 2]}}
    tree.update(extra)
    path = tmp_path / "staged.yaml"
    path.write_text(json.dumps(tree))
    return path


def test_plan_lists_the_stage_comparisons_the_report_makes(tmp_path, tiny_llama):
    from postlab.report.power import planned_comparisons
    from postlab.study import load_study, plan

    study = load_study(_study_file(tmp_path, tiny_llama))
    got = [(c.stage, c.metric, c.examples, c.seeds) for c in planned_comparisons(study, plan(study))]
    # final: accuracy on the 40 dev examples, ref_kl on the 10 pairs read; at the end of sft: accuracy only
    assert got == [(None, "accuracy", 40, 3), (None, "ref_kl", 10, 3), ("sft", "accuracy", 40, 3)]
    study = load_study(_study_file(tmp_path, tiny_llama, compare_stages=None, metrics=["ref_kl", "accuracy"]))
    assert [(c.stage, c.metric) for c in planned_comparisons(study, plan(study))] == [(None, "ref_kl"), (None, "accuracy")]


def test_compare_stages_naming_a_stage_no_run_has_is_refused(tmp_path, tiny_llama):
    from postlab.errors import ConfigError
    from postlab.study import load_study, plan

    with pytest.raises(ConfigError, match=r"compare_stages: no run has a stage named 'sfft' \(stages: sft, dpo\)"):
        plan(load_study(_study_file(tmp_path, tiny_llama, compare_stages=["sfft"])))
    with pytest.raises(ConfigError, match="compare_stages"):
        load_study(_study_file(tmp_path, tiny_llama, compare_stages=[]))


def test_study_plan_shows_the_stage_comparisons_without_importing_torch(tmp_path, tiny_llama):
    code = ("import sys\nfrom postlab.cli import main\n"
            f"main(['study', 'plan', {str(_study_file(tmp_path, tiny_llama))!r}, '--output-dir', {str(tmp_path / 'out')!r}])\n"
            "print('IMPORTED', 'torch' in sys.modules)")
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's postlab, from any directory
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": src})
    out = p.stdout
    assert out.strip().splitlines()[-1] == "IMPORTED False", p.stderr[-2000:]
    lines = [x.strip() for x in out.splitlines() if x.strip().startswith("sft_lr: high vs low")]
    assert len(lines) == 3
    assert [("(end of stage sft)" in x, "3 x 10" in x) for x in lines] == [(False, False), (False, True), (True, False)]
    assert "ref_kl" in lines[1] and "?" in lines[1].split("3 x 10")[1]  # no stated default: measured, or unknown
