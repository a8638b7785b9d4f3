"""Cloze classification from any labelled file (tasks/cloze.py): reading, options, pairs, evaluation,
paraphrase as its special case, and use from a study file (tiny Llama, fp32, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from postlab.config import TaskConfig, parse_run_config
from postlab.errors import ConfigError, DataError
from postlab.metrics import read_per_example
from postlab.models import load_lm
from postlab.tasks import get_task

SENTIMENT = {"template": "Review: {sentence}\nSentiment:", "labels": {0: " negative", 1: " positive"}}


def write_sst(path: Path, n: int = 12) -> Path:
    rows = [{"sentence": f"{'a great' if i % 2 else 'an awful'} film, number {i}", "label": i % 2, "idx": i}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_intents(path: Path) -> Path:
    rows = ["text,intent"] + [f"{w} please {i},{intent}" for i, (w, intent) in
                              enumerate([("play music", "music"), ("book a table", "food"), ("set an alarm", "alarm")] * 3)]
    path.write_text("\n".join(rows) + "\n")
    return path


def cloze(train: Path, dev: Path | None = None, **options) -> TaskConfig:
    return TaskConfig(name="cloze", train=str(train), dev=str(dev or train), cloze={**SENTIMENT, **options})


def test_reads_labels_of_any_type_into_prompts_answers_and_pairs(tmp_path):
    task = get_task(cloze(write_sst(tmp_path / "sst.jsonl")))
    ex = task.train_examples()
    assert ex[1].prompt == "Review: a great film, number 1\nSentiment:" and ex[1].completion == " positive"
    assert ex[0].completion == " negative" and len(ex) == 12
    pairs = task.preference_pairs()
    assert (pairs[1].chosen, pairs[1].rejected) == (" positive", " negative") and len(pairs) == 12

    intents = get_task(TaskConfig(name="cloze", train=str(write_intents(tmp_path / "intents.csv")),
                                  cloze={"template": "Request: {text}\nIntent:", "label_column": "intent",
                                         "labels": {"music": " music", "food": " food", "alarm": " alarm"}}))
    assert intents.train_examples()[1].completion == " food"
    pairs = intents.preference_pairs()
    assert len(pairs) == 18 and {p.rejected for p in pairs[:2]} == {" food", " alarm"}  # one pair per wrong label


def test_option_and_data_errors_name_what_to_fix(tmp_path):
    data = write_sst(tmp_path / "sst.jsonl")
    with pytest.raises(DataError, match="label '1' is not one of the task's labels \\['0', '2'\\]"):
        get_task(cloze(data, labels={0: " no", 2: " yes"})).train_examples()
    with pytest.raises(DataError, match="missing column\\(s\\) \\['review'\\]"):
        get_task(cloze(data, template="{review}:")).train_examples()

    def refused(task: dict, match: str):
        with pytest.raises(ConfigError, match=match):
            parse_run_config({"stages": [{"task": task}]})

    refused({"name": "cloze", "train": str(data), "cloze": {"labels": {0: "a", 1: "b"}}}, "cloze.template: Field required")
    refused({"name": "cloze", "cloze": {**SENTIMENT, "template": "no fields"}}, "needs \\{column\\} fields")
    refused({"name": "cloze", "cloze": {**SENTIMENT, "labels": {0: " x", 1: " x"}}}, "share an answer")
    refused({"name": "cloze", "cloze": {**SENTIMENT, "colour": "red"}}, "cloze.colour: Extra inputs")
    refused({"name": "cloze", "clozed": SENTIMENT}, "unknown key 'clozed'")
    refused({"name": "paraphrase", "cloze": SENTIMENT}, "unknown key 'cloze'")
    with pytest.raises(ConfigError, match="task.train: the cloze task needs a train file"):
        get_task(TaskConfig(name="cloze", cloze=SENTIMENT)).train_examples()


def test_evaluate_writes_metrics_per_example_stats_and_predictions(tiny_llama, tmp_path):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    intents = write_intents(tmp_path / "intents.csv")
    task = get_task(TaskConfig(name="cloze", train=str(intents), dev=str(intents),
                               cloze={"template": "Request: {text}\nIntent:", "label_column": "intent",
                                      "labels": {"music": " music", "food": " food", "alarm": " alarm"}}))
    m = task.evaluate(lm, tmp_path / "eval", batch_size=4)
    assert m["n"] == 9 and (m["accuracy"] * 9).is_integer() and m["majority_accuracy"] == pytest.approx(1 / 3)
    per = read_per_example(tmp_path / "eval")
    assert per.value("accuracy") == pytest.approx(m["accuracy"]) and per.value("macro_f1") == pytest.approx(m["macro_f1"])
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 9 and {p["label"] for p in preds} == {"music", "food", "alarm"}


def test_paraphrase_is_a_cloze_task_with_its_own_format(tiny_llama, tmp_path):
    """The same pairs read as paraphrase and as cloze (same template and answers) give the same
    predictions: paraphrase shares cloze's classification code."""
    from helpers import write_pairs
    from postlab.tasks.paraphrase import LABELS, TEMPLATE

    tsv = write_pairs(tmp_path / "pairs.tsv", n=12)
    jsonl = tmp_path / "pairs.jsonl"
    lines = tsv.read_text().splitlines()[1:]
    jsonl.write_text("".join(json.dumps({"id": r[0], "q1": r[1], "q2": r[2], "label": int(r[3])}) + "\n"
                             for r in (x.split("\t") for x in lines)))
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    para = get_task(TaskConfig(name="paraphrase", dev=str(tsv))).evaluate(lm, tmp_path / "p")
    as_cloze = get_task(TaskConfig(name="cloze", train=str(jsonl), dev=str(jsonl),
                                   cloze={"template": TEMPLATE,
                                          "labels": {0: LABELS[0], 1: LABELS[1]}})).evaluate(lm, tmp_path / "c")
    for k in ("accuracy", "macro_f1", "majority_accuracy", "n"):
        assert para[k] == as_cloze[k], k
    p = [json.loads(x)["pred"] for x in (tmp_path / "p" / "paraphrase_predictions.jsonl").read_text().splitlines()]
    c = [int(json.loads(x)["pred"]) for x in (tmp_path / "c" / "predictions.jsonl").read_text().splitlines()]
    assert p == c


def test_a_study_file_trains_cloze_with_lora_and_dora(tiny_llama, tmp_path, monkeypatch):
    from postlab.report import load_runs
    from postlab.study import load_study, plan, run_study

    data = write_sst(tmp_path / "sst.jsonl", n=16)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "cloze-adapters",
        "base": {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"},
                 "task": {"name": "cloze", "train": str(data), "dev": str(data), "dev_limit": 8,
                          "cloze": {"template": SENTIMENT["template"], "labels": {"0": " negative", "1": " positive"}}},
                 "optim": {"lr": 1.0e-3, "batch_size": 4}, "eval_at_start": False,
                 "stages": [{"name": "sft", "objective": {"name": "nll"}}, {"name": "dpo", "objective": {"name": "dpo"}}]},
        "axes": {"param": {"lora": {"parameterization": {"method": "lora", "lora": {"r": 2}}},
                           "dora": {"parameterization": {"method": "dora", "dora": {"r": 2}}}}}}))
    s = load_study(study)
    assert sorted(r.config.stages[0].parameterization.method for r in plan(s)) == ["dora", "lora"]
    outcome = run_study(s, tmp_path / "out", progress=False)
    assert not outcome.failed and len(outcome.ran) == 2
    df = load_runs(tmp_path / "out")
    assert set(df["task"]) == {"cloze"} and ((df["accuracy"] * 8).round(9) % 1 == 0).all()  # k of 8 dev examples
    text = outcome.report.read_text()
    assert "### task = cloze" in text and "accuracy" in text.split("## Paired comparisons")[1]
