"""What a long study needs (issue: the SFT/DPO study at CPU scale): a validation split carved from the
training data, learning curves on a dev subset, stages that keep no weights, a plan that states its
disk footprint, reports that say they are partial, and an export of results without weights.
Every run here is fp32 on the CPU with a tiny random model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import run_config, tiny_study, write_pairs, write_study
from postlab.config import TaskConfig, parse_run_config
from postlab.errors import ConfigError, DataError
from postlab.run import run
from postlab.tasks import get_task


def test_a_validation_split_is_the_last_training_examples_and_is_never_trained_on(tmp_path):
    data = write_pairs(tmp_path / "p.tsv", 20)
    task = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data), validation=5, train_limit=12))
    train = [ex.id for ex in task.train_examples()]
    dev = [ex.id for ex in task.dev_examples()]
    assert dev == [f"p{i}" for i in range(15, 20)]
    assert train == [f"p{i}" for i in range(12)]
    assert not set(train) & set(dev)
    assert [p.id for p in task.preference_pairs()] == train
    # without it the dev file is read
    plain = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(write_pairs(tmp_path / "d.tsv", 3))))
    assert len(plain.dev_examples()) == 3


def test_a_sonnets_validation_split_holds_out_the_last_sonnets(tmp_path):
    lines = ["THE SONNETS", ""]
    for n in range(1, 7):
        lines += [str(n), ""] + [f"line {k} of sonnet {n}" for k in range(1, 15)] + [""]
    path = tmp_path / "s.txt"
    path.write_text("\n".join(lines))
    task = get_task(TaskConfig(name="sonnets", train=str(path), validation=2))
    assert [ex.id for ex in task.train_examples()] == ["1", "2", "3", "4"]
    assert [ex.id for ex in task.dev_examples()] == ["5", "6"]
    assert task.dev_examples()[0].prompt.startswith("line 1 of sonnet 5")


def test_a_validation_split_that_takes_everything_or_replaced_data_is_refused(tmp_path):
    data = write_pairs(tmp_path / "p.tsv", 4)
    with pytest.raises(DataError, match="validation=4 holds out every one"):
        get_task(TaskConfig(name="paraphrase", train=str(data), validation=4)).train_examples()
    with pytest.raises(ValueError, match="train_records"):
        TaskConfig(name="paraphrase", train=str(data), validation=2, train_records=str(data))


def test_evaluation_settings_of_a_validation_split_name_the_training_file(tmp_path):
    a, b = write_pairs(tmp_path / "a.tsv", 8), write_pairs(tmp_path / "b.tsv", 9)
    plain = [TaskConfig(name="paraphrase", train=str(x), dev=str(a)).evaluation_settings() for x in (a, b)]
    assert plain[0] == plain[1]  # the training file does not change what a dev evaluation measures
    held = [TaskConfig(name="paraphrase", train=str(x), validation=2).evaluation_settings() for x in (a, b)]
    assert held[0] != held[1]  # it does when the evaluation reads it


def test_learning_curve_points_use_the_dev_subset_and_the_ends_the_whole_dev_set(tmp_path, tiny_llama):
    data = write_pairs(tmp_path / "p.tsv", 24)
    cfg = run_config(tiny_llama, tmp_path / "run", data, epochs=1, max_steps=6, eval_every_steps=2,
                     curve_examples=4, task={"dev_limit": 10})
    run(parse_run_config(cfg))
    dev = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in dev if r["split"] == "dev"]
    assert [(r["step"], r["n"]) for r in dev] == [(0, 10), (2, 4), (4, 4), (6, 10)]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["metrics"]["n"] == 10  # the stage's result is the whole dev set's


def test_a_stage_that_keeps_no_weights_leaves_none(tmp_path, tiny_llama):
    data = write_pairs(tmp_path / "p.tsv", 16)
    out = tmp_path / "run"
    run(parse_run_config(run_config(tiny_llama, out, data, epochs=1, save_model=False, keep_weights=False)))
    assert (out / "result.json").is_file()
    assert not list(out.rglob("*.safetensors"))
    assert (out / "0-sft" / "eval" / "per_example.jsonl").is_file()
    kept = tmp_path / "kept"  # the default keeps the checkpoint, the only copy of the weights
    run(parse_run_config(run_config(tiny_llama, kept, data, epochs=1, save_model=False)))
    assert list((kept / "0-sft" / "checkpoint").glob("*.safetensors"))


@pytest.mark.parametrize("stage, message", [({"save_model": True, "keep_weights": False}, "set save_model: false"),
                                            ({"save_model": False, "keep_weights": False, "two": True}, "starts from")])
def test_keep_weights_false_is_refused_where_weights_are_read(tmp_path, stage, message):
    cfg = run_config(Path("m"), tmp_path / "r", tmp_path / "p.tsv")
    two = stage.pop("two", False)
    cfg["stages"][0].update(stage)
    if two:
        cfg["stages"].append({"name": "dpo", "objective": {"name": "dpo"}})
    with pytest.raises(ConfigError, match=message):
        parse_run_config(cfg)


def test_what_a_stage_keeps_does_not_change_its_reuse_key(tmp_path):
    a = run_config(Path("m"), tmp_path / "a", tmp_path / "p.tsv", save_model=True)
    b = run_config(Path("m"), tmp_path / "b", tmp_path / "p.tsv", save_model=False, keep_weights=False)
    c = run_config(Path("m"), tmp_path / "c", tmp_path / "p.tsv", save_model=False, epochs=3)
    keys = [parse_run_config(x).stage_key(0) for x in (a, b, c)]
    assert keys[0] == keys[1] != keys[2]


def test_the_plan_states_the_disk_footprint(tmp_path, tiny_llama):
    from postlab.study import load_study, plan
    from postlab.study.footprint import model_bytes, study_footprint

    path = tiny_study(tmp_path, tiny_llama, regimes=("sft", "dpo"), seeds=(0,))
    runs = plan(load_study(path))
    size = model_bytes(str(tiny_llama))
    assert size == (tiny_llama / "model.safetensors").stat().st_size
    fp = study_footprint(runs, set())
    assert fp.parts["full models"] and len(fp.parts["full models"]) == 2  # each run saves its final model
    assert fp.peak_extra == pytest.approx(3 * size)
    tree = yaml.safe_load(path.read_text())
    tree["base"].update(save_model=False, keep_weights=False)
    fp = study_footprint(plan(load_study(write_study(tmp_path / "light.yaml", tree))), set())
    assert fp.kept == 0


def test_the_embedded_models_size_is_known_without_its_files(tmp_path, monkeypatch):
    from postlab.study.footprint import adapter_bytes, model_bytes

    monkeypatch.setenv("POSTLAB_HOME", str(tmp_path))  # nothing converted here
    assert model_bytes("smollm2-135m") == pytest.approx(538_090_408, rel=1e-3)  # its real safetensors file
    # all-linear LoRA r=8: 30 layers x 8 x (in + out) summed over q, k, v, o, gate, up, down
    assert adapter_bytes("smollm2-135m", 8, "all-linear") == 30 * 8 * 10176 * 4


def test_a_report_with_planned_runs_not_done_says_it_is_partial(tmp_path, tiny_llama):
    from postlab.report import summary_text, write_report
    from postlab.study import load_study, run_study

    study = load_study(tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0, 1)))
    out = tmp_path / "study"
    run_study(study, out, shard=(0, 2), progress=False)
    report = write_report(out)
    text = report.read_text()
    assert "**Partial report: 1 of 2 planned runs are complete**" in text
    assert "not started" in text
    assert "Partial report" in summary_text(report)
    run_study(study, out, progress=False)
    assert "Partial" not in write_report(out).read_text()


def test_export_copies_complete_runs_without_weights_and_a_copy_is_skipped_elsewhere(tmp_path, tiny_llama):
    from postlab.study import load_study, run_study
    from postlab.study.export import export_study

    study = load_study(tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0, 1)))
    out = tmp_path / "study"
    run_study(study, out, progress=False)
    assert list(out.rglob("*.safetensors"))
    dest = tmp_path / "results"
    copied, kept = export_study(out, dest)
    assert len(copied) == 2 and not kept
    assert not list(dest.rglob("*.safetensors")) and not list(dest.rglob("model"))
    assert (dest / "report" / "report.md").is_file() and (dest / "plan.json").is_file()
    assert export_study(out, dest) == ([], sorted(copied))
    # another machine continues from a copy: nothing is trained again
    elsewhere = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(dest, elsewhere)
    outcome = run_study(study, elsewhere, progress=False)
    assert outcome.ran == [] and sorted(outcome.skipped) == sorted(copied)


def test_the_report_draws_dev_curves_across_stages_on_the_subset(tmp_path, tiny_llama):
    import numpy as np

    from postlab.metrics import read_per_example
    from postlab.report import write_report
    from postlab.report.results import dev_curve
    from postlab.study import load_study, run_study

    path = tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0,))
    tree = yaml.safe_load(path.read_text())
    tree["base"].update(eval_at_start=True, max_steps=4, eval_every_steps=2, curve_examples=3,
                        task={**tree["base"]["task"], "dev_limit": 8})
    tree["axes"]["regime"]["sft"]["stages"].append({"name": "sft2", "objective": {"name": "nll"}})
    study = load_study(write_study(tmp_path / "curves.yaml", tree))
    out = tmp_path / "study"
    run_study(study, out, progress=False)
    run_dir = next((out / "runs").iterdir())
    xs, ys, bounds, subset = dev_curve(run_dir, "accuracy")
    assert xs == [0, 2, 4, 6, 8] and bounds == [4] and subset == 3
    end = read_per_example(run_dir / "1-sft2" / "eval")
    assert ys[-1] == pytest.approx(end.value("accuracy", np.arange(3)))  # the end, on the same 3 examples
    report = write_report(out)
    assert (report.parent / "dev_curves.png").is_file()


def test_saved_models_and_checkpoints_follow_the_umask(tmp_path, tiny_llama):
    import os
    import stat

    data = write_pairs(tmp_path / "p.tsv", 16)
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        cfg = run_config(tiny_llama, out, data, epochs=1)
        cfg["stages"].append({**cfg["stages"][0], "name": "more", "save_model": False})
        run(parse_run_config(cfg))
    finally:
        os.umask(old)
    checked = [out / "0-sft" / "model", *(out / "0-sft" / "model").iterdir(), out / "1-more" / "checkpoint",
               *(out / "1-more" / "checkpoint").iterdir(), out / "result.json"]
    for p in checked:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_study_report_names_the_runs_it_left_out_on_the_terminal(tmp_path, tiny_llama, capsys):
    from postlab.cli import main
    from postlab.study import load_study, run_study

    study = load_study(tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0, 1)))
    out = tmp_path / "study"
    run_study(study, out, progress=False)
    cut = sorted((out / "runs").iterdir())[1]
    (cut / "result.json").write_text((cut / "result.json").read_text()[:40])  # a result cut short
    capsys.readouterr()
    assert main(["study", "report", str(out)]) == 0
    said = capsys.readouterr().out
    assert "Partial report: 1 of 2 planned runs" in said
    assert f"{cut.name} " in said and "unreadable result.json" in said


def test_paraphrase_dev_loss_is_the_mean_nll_of_the_correct_answer(tmp_path, tiny_llama):
    import math

    from postlab.models import load_lm
    from postlab.tasks.cloze import answer_logps
    from postlab.tasks.paraphrase import LABELS, Choices

    data = write_pairs(tmp_path / "p.tsv", 10)
    task = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data)))
    lm = load_lm(str(tiny_llama), "cpu", "fp32")
    metrics = task.evaluate(lm, tmp_path / "eval", batch_size=4)
    rows = task._load("dev")
    scores = answer_logps(lm, [Choices(task.prompt(a, b), [LABELS[0], LABELS[1]], i) for i, a, b, _ in rows], 4)
    expected = sum(-s[y] for s, (*_, y) in zip(scores, rows)) / len(rows)
    assert metrics["dev_loss"] == pytest.approx(expected) and metrics["dev_loss"] > 0
    # a probability of the correct answer: each example's NLL is -log p with p <= 1
    assert all(math.exp(-(-s[y])) <= 1 for s, (*_, y) in zip(scores, rows))
    from postlab.metrics import read_per_example

    pe = read_per_example(tmp_path / "eval")
    assert pe.value("dev_loss") == pytest.approx(metrics["dev_loss"])


def test_a_stage_ending_mid_epoch_on_an_evaluation_step_evaluates_it_once(tmp_path, tiny_llama):
    data = write_pairs(tmp_path / "p.tsv", 24)  # 6 steps an epoch; the stage stops after 4
    cfg = run_config(tiny_llama, tmp_path / "run", data, epochs=1, max_steps=4, eval_every_steps=2,
                     curve_examples=4, task={"dev_limit": 10})
    run(parse_run_config(cfg))
    dev = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["n"]) for r in dev if r["split"] == "dev"] == [(0, 10), (2, 4), (4, 10)]


def test_an_expo_sweep_trains_each_stage_once_and_extrapolates_as_if_trained(tmp_path, tiny_llama):
    """Runs that differ only in expo_lambda share the stage's training: the second extrapolates the
    first's trained weights, and gets what training it again would (fp32, cpu: training is deterministic)."""
    from helpers import final_weights

    data = write_pairs(tmp_path / "p.tsv", 16)

    def expo_run(out, lam, reuse):
        cfg = run_config(tiny_llama, tmp_path / out, data, epochs=1, eval_at_start=False)
        cfg["stages"].append({**cfg["stages"][0], "name": "dpo", "objective": {"name": "dpo"}, "expo_lambda": lam})
        cfg["reuse_stages"] = reuse
        return run(parse_run_config(cfg))

    expo_run("a", 1.5, reuse=True)
    b = expo_run("b", 3.0, reuse=True)
    c = expo_run("c", 3.0, reuse=False)  # trained again
    assert b["stages"][1]["training_reused_from"].endswith("a/1-dpo") and "training_reused_from" not in c["stages"][1]
    assert b["stages"][1]["steps"] == c["stages"][1]["steps"]
    assert b["metrics"] == pytest.approx(c["metrics"])
    wb, wc = final_weights(tmp_path / "b", "1-dpo"), final_weights(tmp_path / "c", "1-dpo")
    for k in wc:
        assert torch.equal(wb[k], wc[k]), k
    trains = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "dpo" and r["split"] == "train" for r in trains)  # the training records, copied


def test_a_comparison_that_cannot_rule_out_the_named_effect_says_it_cannot_tell():
    """The plan names comparisons that cannot detect the study's `effects`; the report agrees: such a
    comparison, when it finds nothing, is not reported as 'no difference'."""
    import math

    import pandas as pd

    from postlab.report.comparisons import findings
    from postlab.report.writer import _verdict, with_effects

    row = {"axis": "param", "a": "fft", "b": "lora", "context": "", "task": "paraphrase", "metric": "accuracy",
           "n": 3, "n_examples": 2000, "mean_diff": 0.004, "p_value": 0.4, "p_holm": 0.8, "significant_holm": False,
           "equivalence_bound_holm": 0.05, "ci_low_holm": -0.03, "ci_high_holm": 0.04, "verdict": "", "higher_is_better": True}
    comp = pd.DataFrame([row, {**row, "metric": "macro_f1", "equivalence_bound_holm": 0.01}])
    comp = with_effects(comp, {"accuracy": 0.02, "macro_f1": 0.02})
    verdicts = [_verdict(r, 0.05) for _, r in comp.iterrows()]
    assert verdicts[0].startswith("cannot tell at this scale") and "0.05" in verdicts[0]
    assert verdicts[1] == "no difference larger than 0.01"
    said = findings(comp)
    assert any(s.startswith("Cannot tell on paraphrase whether fft and lora differ by the 0.02") for s in said)
    assert any(s.startswith("No difference found on paraphrase") and "macro_f1" in s for s in said)
    assert math.isnan(with_effects(comp.drop(columns="effect"), {"chrf": 1.0})["effect"].iloc[0])


def test_a_stage_measured_against_its_reference(tmp_path, tiny_llama):
    """against_reference: the DPO stage's final model read against its reference (the SFT model) on
    the dev pairs: the same figures `postlab diagnose` gives for those two checkpoints."""
    from postlab.diagnose import against_reference
    from postlab.models import load_lm

    data = write_pairs(tmp_path / "p.tsv", 16)
    cfg = run_config(tiny_llama, tmp_path / "run", data, epochs=1, eval_at_start=False)
    cfg["stages"].append({**cfg["stages"][0], "name": "dpo", "objective": {"name": "dpo", "beta": 0.2},
                          "against_reference": True})
    result = run(parse_run_config(cfg))
    got = result["metrics"]
    assert {"ref_reward_accuracy", "ref_reward_margin", "ref_kl", "accuracy"} <= set(got)
    assert got["ref_kl"] > 0 and got["ref_pairs"] == 8  # dev_limit 8: the dev pairs
    policy = load_lm(str(tmp_path / "run" / "1-dpo" / "model"), "cpu", "fp32")
    reference = load_lm(str(tmp_path / "run" / "0-sft" / "model"), "cpu", "fp32")
    pairs = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data), dev_limit=8)).preference_pairs("dev")
    assert against_reference(policy, reference, pairs, 0.2, 16, False) == pytest.approx(
        {k: v for k, v in got.items() if k.startswith("ref_")})


def test_against_reference_on_sonnets_samples_held_out_pairs_as_training_does(tmp_path, tiny_llama):
    lines = ["THE SONNETS", ""]
    for n in range(1, 9):
        lines += [str(n), ""] + [f"word {k} of verse {n} and more" for k in range(1, 15)] + [""]
    path = tmp_path / "s.txt"
    path.write_text("\n".join(lines))
    task = {"name": "sonnets", "train": str(path), "validation": 2, "max_completion_tokens": 8,
            "generation": {"max_new_tokens": 6}, "pairs": {"generation": {"max_new_tokens": 6}}}
    cfg = run_config(tiny_llama, tmp_path / "run", path, epochs=1, eval_at_start=False, task=task)
    cfg["stages"][0]["task"] = task
    cfg["stages"].append({**cfg["stages"][0], "name": "dpo", "objective": {"name": "dpo"}, "against_reference": True})
    got = run(parse_run_config(cfg))["metrics"]
    assert got["ref_pairs"] == 2 and 0.0 <= got["ref_reward_accuracy"] <= 1.0 and got["ref_kl"] >= 0
