"""Paraphrase detection on Quora question pairs, cloze style: the answer is one token, " yes" or " no".

Prediction compares the two label tokens' logits at the answer position (one row of logits).
Reads our TSV (id, sentence1, sentence2, is_duplicate) or the hub's GLUE qqp columns
(question1, question2, label), from a local file or a hub dataset id.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import Choices, Example, Pair
from ..errors import DataError
from ..hub import is_hub_id
from ..metrics import MetricSpec
from .base import Task, data_dir, read_text, register_task, require_file
from .cloze import answer_logps, classification_metrics, classification_report, classify, most_likely  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..models import LM

TEMPLATE = 'Question 1: "{q1}"\nQuestion 2: "{q2}"\nDo these two questions ask the same thing? Answer:'
LABELS = {1: " yes", 0: " no"}
COLUMN_SETS = [("sentence1", "sentence2", "is_duplicate"), ("question1", "question2", "label")]


def read_pairs(path: Path) -> list[tuple[str, str, str, int]]:
    """(id, question 1, question 2, label) from a Quora TSV, with errors naming the line."""
    lines = read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty file; expected a header line id<TAB>sentence1<TAB>sentence2<TAB>is_duplicate")
    delim = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else "\t")
    rows = list(csv.reader(lines, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL))
    header = [h.strip() for h in rows[0]]
    cols = next((c for c in COLUMN_SETS if all(k in header for k in c)), None)
    if cols is None:
        raise DataError(f"{path}: line 1: header {header} lacks the columns {list(COLUMN_SETS[0])} "
                        f"(or GLUE's {list(COLUMN_SETS[1])}); is the file tab-separated?")
    i1, i2, il = (header.index(c) for c in cols)
    iid = header.index("id") if "id" in header else None
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {n}: {len(row)} fields, expected {len(header)} like the header")
        label = row[il].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}: line {n}: {cols[2]} must be 0 or 1, got {label!r}")
        out.append((row[iid] if iid is not None else str(n), row[i1], row[i2], int(label)))
    if not out:
        raise DataError(f"{path}: no data rows after the header")
    return out


def read_hub(name: str, split: str) -> list[tuple[str, str, str, int]]:
    """GLUE qqp from the hub (e.g. `glue/qqp` or `nyu-mll/glue:qqp`); needs network access."""
    from datasets import load_dataset

    repo, _, subset = name.partition(":")
    if repo == "glue/qqp":
        repo, subset = "nyu-mll/glue", "qqp"
    try:
        ds = load_dataset(repo, subset or None, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise DataError(f"{name}: cannot load from the hub ({str(e).splitlines()[0]}); pass a local TSV path") from None
    return [(str(r.get("idx", i)), r["question1"], r["question2"], int(r["label"])) for i, r in enumerate(ds)]


@register_task
class Paraphrase(Task):
    name = "paraphrase"
    append_eos = False  # the answer is exactly one token
    primary_metrics = ("accuracy", "macro_f1")
    # Planning defaults (seed, example, residual variance of a difference between two arms): a 0/1
    # difference has variance at most 0.5 when the arms are independent coin flips, the worst case;
    # seed-to-seed SD 0.02 (2 accuracy points). Macro-F1's pseudo-values spread about twice as wide.
    metric_specs = {"accuracy": MetricSpec("ratio", planning=(4e-4, 0.25, 0.25)),
                    "macro_f1": MetricSpec("macro_f1", planning=(1e-3, 0.5, 0.5)),
                    "predicted_yes_rate": MetricSpec("ratio"),
                    # mean NLL of the correct answer token: where SFT objectives differ by design
                    "dev_loss": MetricSpec("ratio", higher_is_better=False, planning=(4e-4, 0.1, 0.1))}

    def _load(self, split: str) -> list[tuple[str, str, str, int]]:
        read = self.source_split(split)
        default = data_dir() / "quora" / f"quora-{read}.tsv"
        src = getattr(self.cfg, read) or str(default)
        if is_hub_id(src):
            rows = read_hub(src, "train" if read == "train" else "validation")
        else:
            rows = read_pairs(require_file(src, f"paraphrase {read} file"))
        return self.split_rows(rows, split, src)

    @staticmethod
    def prompt(q1: str, q2: str) -> str:
        return TEMPLATE.format(q1=q1.strip(), q2=q2.strip())

    def train_examples(self) -> list[Example]:
        return [Example(self.prompt(a, b), LABELS[y], i) for i, a, b, y in self._load("train")]

    def dev_examples(self) -> list[Example]:
        return [Example(self.prompt(a, b), LABELS[y], i) for i, a, b, y in self._load("dev")]

    def preference_pairs(self, split: str = "train") -> list[Pair]:
        """Chosen = the correct label token, rejected = the other: parallels the supervised objective."""
        return [Pair(self.prompt(a, b), LABELS[y], LABELS[1 - y], i) for i, a, b, y in self._load(split)]

    def evaluate(self, lm: LM, out_dir: Path | None = None, batch_size: int = 16) -> dict[str, float]:
        rows = self._load("dev")
        # A cloze classification over the two label words (tasks/cloze.py), class index = the label.
        scores = answer_logps(lm, [Choices(self.prompt(a, b), [LABELS[0], LABELS[1]], i) for i, a, b, _ in rows],
                              batch_size, desc="eval paraphrase")
        gold = [y for *_, y in rows]
        pred = most_likely(scores)
        metrics, records = classification_report([i for i, *_ in rows], gold, scores, 2)
        for r, p in zip(records, pred):
            r["stats"]["predicted_yes_rate"] = [float(p), 1.0]
        metrics = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                   "majority_accuracy": metrics["majority_accuracy"], "majority_macro_f1": metrics["majority_macro_f1"],
                   "predicted_yes_rate": sum(pred) / len(pred), "dev_loss": metrics["dev_loss"], "n": metrics["n"]}
        self.write_per_example(out_dir, records)
        if out_dir is not None:
            with open(out_dir / "paraphrase_predictions.jsonl", "w") as f:
                for (i, *_), y, p in zip(rows, gold, pred):
                    f.write(json.dumps({"id": i, "label": y, "pred": p}) + "\n")
        return metrics
