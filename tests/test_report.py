"""write_report on a synthetic study: 2 tasks x 2 regimes x 2 params x 3 seeds, one incomplete run.

param (fft vs lora-r8) has a big, consistent effect; regime (sft vs sft->dpo) is pure noise.
"""

import json

import pandas as pd
import pytest

from postlab.report import find_incomplete, load_runs, paired_comparisons, write_report

TASKS = {"paraphrase": {"accuracy": 0.80, "macro_f1": 0.78}, "sonnets": {"chrf": 30.0}}
REGIMES = ["sft", "sft->dpo"]
PARAMS = ["fft", "lora-r8"]
SEEDS = [0, 1, 2]
SEED_EFFECT = [0.0, 0.02, -0.01]          # shared by all groups: what pairing removes
DPO_NOISE = [0.01, -0.012, 0.003]          # regime "effect": mean ~0, sign flips
FFT_GAIN, FFT_JITTER = 0.08, [0.001, -0.002, 0.0005]


def _value(base, metric, regime, param, seed):
    scale = 50.0 if metric == "chrf" else 1.0  # chrF lives on a 0-100 scale
    v = base + scale * SEED_EFFECT[seed]
    if regime == "sft->dpo":
        v += scale * DPO_NOISE[seed]
    if param == "fft":
        v += scale * (FFT_GAIN + FFT_JITTER[seed])
    return round(v, 6)


def _write_run(root, run_id, axes, metrics, stages, speed=1.0):
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("axes:\n" + "".join(f"  {k}: {json.dumps(v)}\n"
                                                       for k, v in axes.items()))
    lines = []
    for st in stages:
        for step in range(10, 60, 10):
            lines.append({"stage": st, "split": "train", "step": step, "epoch": step / 40,
                          "loss": (2.0 if st == "sft" else 0.7) / (1 + speed * step / 20),
                          "lr": 1e-5, "tokens_per_s": 900.0})
        lines.append({"stage": st, "split": "dev", "step": 50, "epoch": 1.25, **metrics})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    (root / "study.yaml").write_text("name: synthetic\n")
    for task, bases in TASKS.items():
        for regime in REGIMES:
            for param in PARAMS:
                for seed in SEEDS:
                    axes = {"task": task, "regime": regime, "param": param, "seed": seed}
                    metrics = {m: _value(b, m, regime, param, seed) for m, b in bases.items()}
                    metrics["perplexity"] = 40.0 + seed
                    stages = regime.split("->")
                    run_id = f"{task}-{regime.replace('->', '-')}-{param}-s{seed}"
                    speed = (1.5 if param == "fft" else 1.0) + 0.1 * seed
                    d = _write_run(root, run_id, axes, metrics, stages, speed)
                    result = {
                        "run_id": run_id, "axes": axes, "metrics": metrics,
                        "stages": [{"name": s, "objective": "nll" if s == "sft" else "dpo",
                                    "wall_s": 10.0 + seed if s == "sft" else 6.0,
                                    "tokens": 1000, "peak_mem_mb": 900.0, "device": "cpu",
                                    "metrics": metrics} for s in stages],
                        "wall_s": 12.0 + seed + 6.0 * (len(stages) - 1), "device": "cpu",
                        "versions": {"python": "3.12.3", "torch": "2.13.0"}}
                    (d / "result.json").write_text(json.dumps(result))
    _write_run(root, "paraphrase-dpo-fft-s0", {"task": "paraphrase", "regime": "dpo",
                                               "param": "fft", "seed": 0}, {}, ["dpo"])
    return root


def test_load_runs(study):
    df = load_runs(study)
    assert len(df) == 24
    assert df.attrs["axes"] == ["task", "regime", "param", "seed"]
    assert {"accuracy", "macro_f1", "chrf", "perplexity"} <= set(df.attrs["metrics"])
    assert {"wall_s", "device", "stage.sft.wall_s", "stage.dpo.wall_s", "version.torch"} <= set(
        df.columns)
    assert df["chrf"].isna().sum() == 12 and df["accuracy"].isna().sum() == 12
    assert [r["run_id"] for r in df.attrs["incomplete"]] == ["paraphrase-dpo-fft-s0"]
    inc = find_incomplete(study)[0]
    assert inc["axes"]["regime"] == "dpo" and "step 50" in inc["last_log"]


def test_paired_comparisons_verdicts(study):
    comp = paired_comparisons(load_runs(study))
    assert set(comp["axis"]) == {"regime", "param"}  # never across tasks or seeds
    param = comp[comp["axis"] == "param"]
    regime = comp[comp["axis"] == "regime"]
    # 2 tasks x 2 regimes x primary metrics (accuracy, macro_f1 | chrf) = 6 rows each
    assert len(param) == 6 and len(regime) == 6
    assert set(param["metric"]) == {"accuracy", "macro_f1", "chrf"}  # perplexity not primary
    assert param["significant"].all() and (param["mean_diff"] > 0).all()
    assert param["verdict"].str.startswith("fft > lora-r8 (p").all()
    assert not regime["significant"].any()
    # not significant: the verdict states the largest difference the data rule out (equivalence bound)
    assert regime["verdict"].str.startswith("no difference larger than ").all()
    assert (regime["equivalence_bound"] > regime["mean_diff"].abs()).all()
    assert (comp["test"] == "paired t-test over seeds (no per-example data)").all()
    assert (comp["n"] == 3).all()


def test_write_report(study):
    report = write_report(study)
    out = study / "report"
    assert report == out / "report.md"
    text = report.read_text()

    # main table: one row per regime x param in each task section, 3 seeds each
    for task in TASKS:
        assert f"### task = {task}" in text
    for regime in REGIMES:
        for param in PARAMS:
            assert text.count(f"| {regime} | {param} | 3 |") == 2
    # sft/fft/paraphrase accuracy: 0.88 + [0.001, 0.018, -0.0095] -> mean 0.8832, CI by hand
    assert "| sft | fft | 3 | 0.8832 ± 0.01388 | [0.8487, 0.9176] | – |" in text  # (no zero-shot eval logged)
    assert "accuracy 95% CI" in text and "chrf 95% CI" in text

    assert "**fft > lora-r8**" in text
    assert text.index("## Finding") < text.index("## Results")
    assert "- On paraphrase (sft), fft beats lora-r8: higher accuracy by 0.0798 (fft − lora-r8 = +0.0798" in text
    regime_section = text.split("### regime")[1].split("###")[0]
    assert regime_section.count("no difference larger than") == 6
    assert "fft > lora-r8" not in regime_section

    # plots exist, are PNGs and are linked relatively
    for name in ["primary_metrics.png", "learning_curves.png", "wall_clock.png",
                 "paired_comparisons.png"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in text

    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 24
    assert set(runs["run_id"]) == {p.name for p in (study / "runs").iterdir()} - {
        "paraphrase-dpo-fft-s0"}
    assert sorted(runs.groupby(["task", "regime", "param"]).size().unique()) == [3]

    assert "## Incomplete runs" in text
    assert "paraphrase-dpo-fft-s0" in text.split("## Incomplete runs")[1]
    assert "## Versions and devices" in text and "2.13.0 (24)" in text and "cpu (24)" in text
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_write_report_custom_out_dir_and_empty_study(tmp_path, study):
    out = tmp_path / "elsewhere"
    assert write_report(study, out_dir=out) == out / "report.md"
    assert (out / "runs.csv").is_file()

    empty = tmp_path / "empty"
    (empty / "runs" / "r1").mkdir(parents=True)
    text = write_report(empty).read_text()
    assert "No completed runs" in text and "r1" in text


def test_single_seed_is_not_testable(tmp_path):
    root = tmp_path / "one"
    for param, acc in [("fft", 0.9), ("lora-r8", 0.8)]:
        d = root / "runs" / param
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({
            "run_id": param, "axes": {"task": "paraphrase", "param": param, "seed": 0},
            "metrics": {"accuracy": acc}, "stages": [], "wall_s": 1.0, "device": "cpu"}))
    text = write_report(root).read_text()
    assert "not testable: 1 seed" in text
    assert "| fft | 1 | 0.9 ± – | – | – |" in text


def test_no_task_axis_numeric_axis_and_broken_files(tmp_path):
    """lr has 3 values (3 pairwise comparisons), there is no task axis, no stages, a torn
    metrics.jsonl line and a corrupt result.json (listed as incomplete, not a crash)."""
    root = tmp_path / "lr"
    for lr, shift in [(1e-5, 0.0), (2e-5, 0.05), (5e-5, 0.1)]:
        for seed in SEEDS:
            d = root / "runs" / f"lr{lr}-s{seed}"
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text(
                json.dumps({"stage": "sft", "split": "train", "step": 1, "loss": 1.0}) + "\n"
                + json.dumps({"stage": "sft", "split": "train", "step": 2, "loss": 0.5 + shift})
                + "\n{\"stage\": \"sft\", \"spl")
            (d / "result.json").write_text(json.dumps({
                "axes": {"lr": lr, "seed": seed},
                "metrics": {"accuracy": 0.7 + shift + SEED_EFFECT[seed], "name": "x"},
                "wall_s": 3.0}))
    bad = root / "runs" / "broken"
    bad.mkdir()
    (bad / "result.json").write_text("{not json")

    df = load_runs(root)
    assert len(df) == 9 and df.attrs["metrics"] == ["accuracy"]  # non-numeric metric dropped
    comp = paired_comparisons(df)
    assert len(comp) == 3 and set(comp["axis"]) == {"lr"}
    text = write_report(root).read_text()
    assert "| lr=1e-05 |" not in text and "| 1e-05 | 3 |" in text
    assert "unreadable result.json" in text
    for name in ["primary_metrics.png", "learning_curves.png", "wall_clock.png"]:
        assert (root / "report" / name).read_bytes()[:4] == b"\x89PNG"


def _per_example_study(root, effect: float = 0.2, n: int = 150, seeds=(0, 1, 2), rng_seed: int = 0):
    """fft vs lora-r8 on paraphrase with per-example records (task recorded by the runs, no task axis):
    fft gets each example right with probability 0.75 + effect/2, lora with 0.75 - effect/2, the
    zero-shot model with 0.55; examples differ in difficulty."""
    import numpy as np

    from postlab.metrics import MetricSpec, write_per_example

    rng = np.random.default_rng(rng_seed)
    difficulty = rng.normal(0, 1.0, n)
    spec = {"accuracy": MetricSpec("ratio")}

    def records(p):
        correct = (rng.random(n) < 1 / (1 + np.exp(-(np.log(p / (1 - p)) + difficulty)))).astype(int)
        return [{"id": f"q{i}", "score": float(c), "stats": {"accuracy": [float(c), 1.0]}} for i, c in enumerate(correct)], correct.mean()

    zero_recs, zero_acc = records(0.55)
    root.mkdir(parents=True)
    (root / "study.yaml").write_text("name: per-example\nmetrics: [accuracy]\n")
    for param, p in (("fft", 0.75 + effect / 2), ("lora-r8", 0.75 - effect / 2)):
        for seed in seeds:
            d = root / "runs" / f"param={param},seed={seed}"
            recs, acc = records(p)
            write_per_example(d / "0-sft" / "eval", recs, spec)
            write_per_example(d / "0-sft" / "eval-start", zero_recs, spec)
            metrics = {"accuracy": float(acc), "majority_accuracy": 0.6}
            (d / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "split": "dev", "step": 0, "accuracy": float(zero_acc)}) + "\n"
                                             + json.dumps({"stage": "sft", "split": "train", "step": 5, "loss": 0.5}) + "\n")
            (d / "result.json").write_text(json.dumps({
                "run_id": d.name, "task": "paraphrase", "axes": {"param": param, "seed": seed}, "metrics": metrics,
                "stages": [{"name": "sft", "wall_s": 5.0, "metrics": metrics}], "wall_s": 6.0, "device": "cpu",
                "precision": "fp32"}))
    return root


def test_report_compares_arms_example_by_example_and_against_zero_shot(tmp_path):
    root = _per_example_study(tmp_path / "s")
    text = write_report(root).read_text()
    comp = pd.read_csv(root / "report" / "comparisons.csv")
    assert len(comp) == 1 and comp["test"].iloc[0] == "seed x example (crossed random effects)"
    assert comp["n"].iloc[0] == 3 and comp["n_examples"].iloc[0] == 150
    assert comp["mean_diff"].iloc[0] > 0 and comp["p_holm"].iloc[0] < 0.05
    finding = text.split("## Finding")[1].split("##")[0]
    assert "On paraphrase, fft beats lora-r8: higher accuracy by" in finding and "3 seeds × 150 dev examples" in finding
    # the task came from result.json: the main table has the paraphrase section, zero-shot and majority
    assert "### task = paraphrase" in text and "accuracy zero-shot" in text
    assert "Always answering the majority class: accuracy 0.6." in text
    base = pd.read_csv(root / "report" / "baselines.csv")
    assert set(base["group"]) == {"fft", "lora-r8"} and (base["mean_diff"] > 0).all() and (base["p_holm"] < 0.05).all()
    assert "## Against the zero-shot model" in text
    for name in ("primary_metrics.png", "paired_comparisons.png"):
        assert (root / "report" / name).read_bytes()[:4] == b"\x89PNG"


def test_report_bounds_a_difference_it_does_not_find(tmp_path):
    root = _per_example_study(tmp_path / "s", effect=0.0, rng_seed=3)
    text = write_report(root).read_text()
    comp = pd.read_csv(root / "report" / "comparisons.csv")
    assert comp["p_holm"].iloc[0] >= 0.05
    bound = comp["equivalence_bound"].iloc[0]
    assert abs(comp["mean_diff"].iloc[0]) < bound < 0.5
    assert f"no difference larger than {bound:.3g}" in text
    assert f"the data rule out differences larger than {bound:.3g}" in text.split("## Finding")[1]


def test_plan_prints_the_detectable_effect_from_a_previous_study_or_the_task_default(tmp_path, tiny_llama, capsys):
    from postlab.cli import main

    previous = _per_example_study(tmp_path / "previous")
    data = tmp_path / "pairs.tsv"
    data.write_text("id\tsentence1\tsentence2\tis_duplicate\n" + "".join(f"p{i}\tWhat is {i}?\tWhat is {i}?\t{i % 2}\n"
                                                                         for i in range(50)))
    study = tmp_path / "plan.yaml"
    study.write_text(json.dumps({
        "name": "plan", "metrics": ["accuracy"],
        "base": {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"},
                 "task": {"name": "paraphrase", "train": str(data), "dev": str(data), "dev_limit": 40}},
        "axes": {"param": {"fft": {"parameterization": {"method": "fft"}},
                           "lora-r8": {"parameterization": {"method": "lora"}}}, "seed": [0, 1, 2]}}))
    assert main(["study", "plan", str(study), "--output-dir", str(tmp_path / "out"), "--variance-from", str(previous)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("param: fft vs lora-r8"))
    assert "paraphrase" in line and "accuracy" in line and "3 x 40" in line and f"measured in {previous}" in line
    measured = float(line.split("3 x 40")[1].split()[0])
    assert 0 < measured < 1
    assert main(["study", "plan", str(study), "--output-dir", str(tmp_path / "out")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("param: fft vs lora-r8"))
    assert "task default (conservative)" in line
    assert float(line.split("3 x 40")[1].split()[0]) > measured  # the stated default is the cautious one
