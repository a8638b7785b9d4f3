"""Cloze classification from any labelled file: a template turns a record's text columns into a
prompt, and the answer is the label's word (SST-2 sentiment, a user's intent data, ...).

    task:
      name: cloze
      train: data/sst2-train.jsonl          # JSONL/JSON/CSV/TSV/Parquet, or a hub id (owner/name[:subset][@split])
      dev: data/sst2-dev.jsonl
      cloze:
        template: "Review: {sentence}\\nSentiment:"   # {column} fields name the text columns
        label_column: label                          # its values may be numbers, booleans or text
        labels: {0: " negative", 1: " positive"}     # label value -> answer (class order = this order)

Training: SFT on the label's answer after the prompt; preference stages get one pair per wrong label
(chosen = the right answer, rejected = a wrong one), which parallels the supervised objective.
Prediction: the answer with the highest log-likelihood (summed over its tokens; with one-token answers
this compares their logits). Metrics: accuracy, macro-F1 over the classes, and the same for always
answering the majority class of the dev set. Paraphrase detection (tasks/paraphrase.py) is this task
with a fixed template, its own file format and " yes"/" no", and shares the code below.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import Choices, Example, Pair, tokenize
from ..errors import ConfigError, DataError
from ..lazy import lazy
from ..metrics import MetricSpec, class_stats
from .base import Task, register_task
from .files import read_records

if TYPE_CHECKING:
    from ..models import LM

logprobs = lazy("postlab.logprobs")


class ClozeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str = Field(min_length=1)
    label_column: str = "label"
    labels: dict[str, str] = Field(min_length=2)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_keys_as_text(cls, v):
        if isinstance(v, dict):  # YAML gives 0/1 or true/false keys; files are read as text
            return {(str(k).lower() if isinstance(k, bool) else str(k)): w for k, w in v.items()}
        return v

    @field_validator("labels")
    @classmethod
    def _answers(cls, v: dict[str, str]) -> dict[str, str]:
        if any(not w.strip() for w in v.values()):
            raise ValueError("every label needs a non-empty answer")
        if len(set(v.values())) != len(v):
            raise ValueError(f"two labels share an answer: {v}")
        return v

    @field_validator("template")
    @classmethod
    def _fields(cls, v: str) -> str:
        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if not fields or any(not f.isidentifier() for f in fields):
            raise ValueError(f"the template needs {{column}} fields naming the text columns, got {v!r}")
        return v

    @property
    def text_columns(self) -> list[str]:
        return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.template) if f))


def answer_logps(lm: LM, prompts: list[Choices], batch_size: int, desc: str | None = None) -> list[list[float]]:
    """For each prompt, the log-probability of each of its answers (the sum over the answer's tokens).
    Prompts too long for the model lose their start."""
    items, _ = tokenize(prompts, lm.tokenizer, lm.max_length, "truncate", append_eos=False, source="dev")
    out: list[list[float]] = [[] for _ in items]
    with lm.inference():
        for idx, logps, mask in logprobs.score_all(lm, items, batch_size, desc=desc):
            B, K = len(idx), len(prompts[idx[0]].answers)
            totals = (logps * mask).sum(-1).view(K, B).T.tolist()  # completion-major: row k*B + b
            for j, i in enumerate(idx):
                out[i] = totals[j]
    return out


def most_likely(scores: list[list[float]]) -> list[int]:
    """The index of each example's most likely answer (ties go to the first)."""
    return [max(range(len(s)), key=lambda k: (s[k], -k)) for s in scores]


def classify(lm: LM, prompts: list[Choices], batch_size: int, desc: str | None = None) -> list[int]:
    """For each prompt, the index of its most likely answer (ties go to the first)."""
    return most_likely(answer_logps(lm, prompts, batch_size, desc))


def classification_metrics(gold: list[int], pred: list[int], n_classes: int = 2) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes (a class never predicted nor present scores 0)."""
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for c in range(n_classes):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / n_classes}


def classification_report(ids: list[str], gold: list[int], scores: list[list[float]], n_classes: int
                          ) -> tuple[dict, list[dict]]:
    """(metrics with the majority-class baseline, per-example records with their statistics), from
    each example's answer log-probabilities: the prediction is the most likely answer (ties: the
    first), and `dev_loss` the mean NLL of the correct answer."""
    pred = most_likely(scores)
    majority = max(range(n_classes), key=lambda c: (sum(g == c for g in gold), -c))
    nll = [-s[y] for s, y in zip(scores, gold)]
    metrics = {**classification_metrics(gold, pred, n_classes),
               **{f"majority_{k}": v for k, v in classification_metrics(gold, [majority] * len(gold), n_classes).items()},
               "dev_loss": sum(nll) / len(nll), "n": float(len(gold))}
    records = [{"id": i, "score": float(y == p), "stats": {"accuracy": [float(y == p), 1.0],
                                                            "macro_f1": class_stats(y, p, n_classes),
                                                            "dev_loss": [loss, 1.0]}}
               for i, y, p, loss in zip(ids, gold, pred, nll)]
    return metrics, records


@register_task
class Cloze(Task):
    name = "cloze"
    Options = ClozeOptions
    append_eos = False  # the answer is the label's words, nothing after them
    primary_metrics = ("accuracy", "macro_f1")
    metric_specs = {"accuracy": MetricSpec("ratio", planning=(4e-4, 0.25, 0.25)),
                    "macro_f1": MetricSpec("macro_f1", planning=(1e-3, 0.5, 0.5)),
                    "dev_loss": MetricSpec("ratio", higher_is_better=False, planning=(4e-4, 0.1, 0.1))}

    def _rows(self, split: str) -> list[tuple[str, str, int]]:
        """(id, prompt, class index) of the split's records."""
        opts: ClozeOptions = self.options
        read = self.source_split(split)
        source = getattr(self.cfg, read)
        if source is None:
            raise ConfigError(f"task.{read}: the cloze task needs a {read} file (JSONL/JSON/CSV/TSV/Parquet) or hub id")
        columns = tuple(opts.text_columns) + (opts.label_column,)
        _, recs = read_records(source, [columns], read, scalar_columns=[opts.label_column])
        classes = list(opts.labels)
        rows = []
        for r in recs:
            value = r[opts.label_column]
            if value not in opts.labels:
                raise DataError(f"{source}: record {r['id']}: label {value!r} is not one of the task's labels "
                                f"{classes} (task.cloze.labels)")
            rows.append((r["id"], opts.template.format(**{c: r[c].strip() for c in opts.text_columns}),
                         classes.index(value)))
        return self.split_rows(rows, split, source)

    def _answer(self, k: int) -> str:
        return list(self.options.labels.values())[k]

    def train_examples(self) -> list[Example]:
        return [Example(p, self._answer(y), i) for i, p, y in self._rows("train")]

    def dev_examples(self) -> list[Example]:
        return [Example(p, self._answer(y), i) for i, p, y in self._rows("dev")]

    def preference_pairs(self, split: str = "train") -> list[Pair]:
        K = len(self.options.labels)
        return [Pair(p, self._answer(y), self._answer(k), i if K == 2 else f"{i}:{k}")
                for i, p, y in self._rows(split) for k in range(K) if k != y]

    def evaluate(self, lm: LM, out_dir: Path | None = None, batch_size: int = 16) -> dict[str, float]:
        rows = self._rows("dev")
        answers = list(self.options.labels.values())
        scores = answer_logps(lm, [Choices(p, answers, i) for i, p, _ in rows], batch_size, desc="eval cloze")
        gold = [y for *_, y in rows]
        metrics, records = classification_report([i for i, *_ in rows], gold, scores, len(answers))
        pred = most_likely(scores)
        self.write_per_example(out_dir, records)
        if out_dir is not None:
            with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"id": i, "label": list(self.options.labels)[y], "pred": list(self.options.labels)[p]}) + "\n"
                             for (i, *_), y, p in zip(rows, gold, pred))
        return metrics
