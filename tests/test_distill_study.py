"""What studies/distill.yaml needs beyond the objectives: stages that train on a teacher's records
while the task evaluates (task.train_records), the student's log-likelihood of teacher responses
(task.score_records -> <name>_logp), per-example task scores (per_example.jsonl) and the report's
win rate against another row (win_rate_vs), and teacher responses to dev prompts (--split dev)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import sacrebleu

from helpers import write_pairs
from postlab.cli import main
from postlab.config import GenerationConfig, TaskConfig, parse_run_config
from postlab.errors import ConfigError
from postlab.logprobs import completion_nll
from postlab.models import load_lm
from postlab.report import load_runs, win_rate, write_report
from postlab.run import run
from postlab.study import load_study
from postlab.tasks import get_task
from postlab.tasks.files import FileTask
from postlab.tasks.sonnets import continuation_text, parse_sonnets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_scores(path: Path) -> dict[str, float]:
    return {r["id"]: r["score"] for r in map(json.loads, path.read_text().splitlines())}


def test_stages_train_on_records_and_score_teacher_responses(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv", n=24)
    responses = write_jsonl(tmp_path / "dsft.jsonl", [{"prompt": f"Q{i}: same question? Answer:", "completion": " yes"}
                                                      for i in range(5)])
    pairs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Q{i}: same?", "chosen": " yes", "rejected": " no"}
                                                   for i in range(3)])
    held_out = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "Are these the same? Answer:", "completion": " no"},
                                                    {"prompt": "Same question? Answer:", "completion": " yes"}])
    task = {"name": "paraphrase", "train": str(data), "dev": str(data), "dev_limit": 6,
            "score_records": {"teacher": str(held_out)}}
    tree = {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"}, "output_dir": str(tmp_path / "run"), "reuse_stages": False,
            "stages": [{"name": "dsft", "task": {**task, "train_records": str(responses)},
                        "optim": {"lr": 1e-3, "batch_size": 2}},
                       {"name": "ddpo", "task": {**task, "train_records": str(pairs)},
                        "objective": {"name": "ddpo", "beta": 0.1}, "optim": {"lr": 1e-3, "batch_size": 2}}]}
    result = run(parse_run_config(tree))
    dsft, ddpo = result["stages"]
    assert dsft["examples"] == 5 and ddpo["examples"] == 3  # the records, not the task's 24 pairs
    # the task still evaluates (accuracy on its dev pairs), plus the teacher responses' log-likelihood
    assert {"accuracy", "macro_f1", "teacher_logp"} <= set(ddpo["metrics"])
    lm = load_lm(str(tmp_path / "run" / "1-ddpo" / "model"), device="cpu", precision="fp32")
    examples = FileTask(TaskConfig(name="file", train=str(held_out))).train_examples()
    nll, tokens = completion_nll(lm, examples, 2, append_eos=False)  # paraphrase answers have no EOS
    assert tokens == 2 and ddpo["metrics"]["teacher_logp"] == pytest.approx(-nll / tokens, rel=1e-5)
    # per-example task scores: 1 when the dev pair is answered correctly
    preds = [json.loads(l) for l in (tmp_path / "run" / "1-ddpo" / "eval" / "paraphrase_predictions.jsonl")
             .read_text().splitlines()]
    scores = read_scores(tmp_path / "run" / "1-ddpo" / "eval" / "per_example.jsonl")
    assert scores == {str(p["id"]): float(p["label"] == p["pred"]) for p in preds}
    assert sum(scores.values()) / len(scores) == pytest.approx(ddpo["metrics"]["accuracy"])

    # Changed held-out responses are scored again (the cached evaluation is keyed by their content).
    write_jsonl(held_out, [{"prompt": "Are these the same? Answer:", "completion": " maybe not"}])
    again = {**tree, "output_dir": str(tmp_path / "again"),
             "model": {"name": str(tmp_path / "run" / "1-ddpo" / "model"), "device": "cpu", "precision": "fp32"},
             "stages": [{"name": "eval", "task": task, "max_steps": 0}]}
    m = run(parse_run_config(again))["metrics"]
    nll2, tokens2 = completion_nll(lm, FileTask(TaskConfig(name="file", train=str(held_out))).train_examples(), 2,
                                   append_eos=False)
    assert tokens2 == 2 and m["teacher_logp"] == pytest.approx(-nll2 / tokens2, rel=1e-5)
    assert m["teacher_logp"] != pytest.approx(ddpo["metrics"]["teacher_logp"])


def test_sonnet_scores_are_the_chrf_of_each_continuation(tiny_llama, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("POSTLAB_DATA", str(data_dir))
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    task = get_task(TaskConfig(name="sonnets", dev_limit=3, generation=GenerationConfig(max_new_tokens=12, seed=1)))
    task.evaluate(lm, tmp_path, batch_size=3)
    scores = read_scores(tmp_path / "per_example.jsonl")
    generated = dict(parse_sonnets(tmp_path / "generated_sonnets.txt", min_lines=3))
    truth = dict(task.held_out())
    assert list(scores) == [str(n) for n in truth]
    for n, lines in truth.items():
        mine = "\n".join(generated[n][3:])
        assert scores[str(n)] == pytest.approx(sacrebleu.sentence_chrf(mine, [continuation_text(lines)]).score)


def test_win_rate_counts_ties_half():
    assert win_rate({"a": 2.0, "b": 1.0, "c": 1.0, "d": 0.0}, {"a": 1.0, "b": 1.0, "c": 3.0, "d": 0.5}) == 0.375
    assert win_rate({"a": 1.0, "x": 1.0}, {"a": 0.0, "y": 5.0}) == 1.0  # only shared examples count
    assert math.isnan(win_rate({"a": 1.0}, {"b": 1.0}))


def _study_run(root: Path, method: str, seed: int, scores: list[float]) -> None:
    rid = f"task=sonnets,method={method},seed={seed}"
    d = root / "runs" / rid
    (d / "0-dsft" / "eval").mkdir(parents=True)
    (d / "1-kd" / "eval").mkdir(parents=True)
    axes = {"task": "sonnets", "method": method, "seed": seed}
    metrics = {"chrf": sum(scores) / len(scores)}
    write_jsonl(d / "0-dsft" / "eval" / "per_example.jsonl", [{"id": str(i), "score": 0.0} for i in range(4)])
    write_jsonl(d / "1-kd" / "eval" / "per_example.jsonl",  # the last stage's evaluation counts
                [{"id": str(i), "score": s} for i, s in enumerate(scores)])
    (d / "result.json").write_text(json.dumps({"run_id": rid, "axes": axes, "metrics": metrics, "wall_s": 1.0,
                                               "stages": [{"name": "kd", "metrics": metrics}]}))


def test_report_adds_win_rate_against_the_named_row(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    (root / "study.yaml").write_text("name: d\nwin_rate_vs: {method: teacher}\n")
    for seed, shift in ((0, 0.0), (1, 1.0), (2, 0.5)):
        _study_run(root, "teacher", seed, [1.0 + shift, 2.0, 3.0, 4.0])
        _study_run(root, "student", seed, [2.0 + shift, 2.0, 1.0, 0.0])  # win, tie, loss, loss
        _study_run(root, "kd", seed, [9.0, 9.0, 9.0, 3.0 + seed])  # wins 3, then loss / tie / win
    report = write_report(root)
    rows = {(r["method"], r["seed"]): r["win_rate_vs_teacher"]
            for _, r in pd.read_csv(root / "report" / "runs.csv").iterrows()}
    assert rows[("student", 0)] == 0.375 and rows[("teacher", 1)] == 0.5
    assert [rows[("kd", s)] for s in (0, 1, 2)] == [0.75, 0.875, 1.0]
    text = report.read_text()
    assert "win_rate_vs_teacher" in text
    # it is a primary metric: compared between methods, paired by seed
    assert "| kd | student | sonnets | – | win_rate_vs_teacher | 3 seeds | 0.5 |" in text
    assert "win_rate_vs_teacher (every task)" in text
    assert "win_rate_vs_teacher" not in load_runs(root).columns  # added by the report, from the files


def test_study_checks_win_rate_vs(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: {}\naxes:\n  method: {a: {}, b: {}}\nwin_rate_vs: {method: c}\n")
    with pytest.raises(ConfigError, match="win_rate_vs: axis 'method' has no variant 'c'"):
        load_study(path)
    path.write_text("base: {}\naxes:\n  method: {a: {}, b: {}}\nwin_rate_vs: {method: a}\n")
    assert load_study(path)


def test_distill_sample_dev_prompts(tiny_llama, data_dir, monkeypatch, tmp_path, own_cache):
    monkeypatch.setenv("POSTLAB_DATA", str(data_dir))
    out = tmp_path / "dev"
    assert main(["distill", "sample", "--teacher", str(tiny_llama), "--student", str(tiny_llama), "--task", "sonnets",
                 "--split", "dev", "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--precision", "fp32"]) == 0
    rows = [json.loads(l) for l in (out / "dsft.jsonl").read_text().splitlines()]
    dev = get_task(TaskConfig(name="sonnets", dev_limit=2)).dev_examples()
    assert [r["prompt"] for r in rows] == [e.prompt for e in dev]
    assert not (out / "pairs.jsonl").read_text()  # the same model on both sides: every pair is dropped
