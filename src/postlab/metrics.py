"""Corpus metrics as functions of per-example statistics summed over a dev set.

Every task metric postlab reports (accuracy, macro-F1, corpus chrF, dev loss, perplexity) is a
function of *sums* of small per-example vectors: accuracy = Σcorrect / Σ1, macro-F1 from summed
per-class (tp, fp, fn), corpus chrF from summed character n-gram counts, dev loss = ΣNLL / Σtokens.
An evaluation writes each example's vector next to its id (``per_example.jsonl``) and the name of
each metric's aggregate (``per_example_spec.json``). Any subset or resample of the dev set then gives
the metric exactly as the evaluation would have computed it on those examples, which is what the
paired tests in :mod:`postlab.report.paired` need (bootstrap resamples, leave-one-out pseudo-values).

Aggregates are vectorized: ``sums[..., k] -> values[...]``, so thousands of resamples cost one
matrix product.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PER_EXAMPLE = "per_example.jsonl"
SPEC = "per_example_spec.json"
CHRF_ORDER = 6  # sacrebleu's chrF defaults: character 6-grams, no word n-grams, beta 2
CHRF_BETA = 2.0


def ratio(sums: np.ndarray) -> np.ndarray:
    """Σa / Σb (accuracy: [correct, 1]; mean NLL per token: [nll, tokens])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums[..., 0] / sums[..., 1]


def exp_ratio(sums: np.ndarray) -> np.ndarray:
    """exp(Σa / Σb): perplexity from [nll, tokens]."""
    return np.exp(np.minimum(ratio(sums), 700.0))


def macro_f1(sums: np.ndarray) -> np.ndarray:
    """Mean over classes of 2tp / (2tp + fp + fn), from [tp, fp, fn] per class (0 where a class is
    neither predicted nor present, as postlab.tasks.paraphrase.classification_metrics scores it)."""
    s = sums.reshape(*sums.shape[:-1], -1, 3)
    tp, fp, fn = s[..., 0], s[..., 1], s[..., 2]
    den = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    return f1.mean(-1)


def chrf(sums: np.ndarray) -> np.ndarray:
    """Corpus chrF (0-100) from summed [hyp, ref, match] counts per character order: sacrebleu's
    CHRF._compute_f_score (default settings) on arrays."""
    s = sums.reshape(*sums.shape[:-1], CHRF_ORDER, 3)
    hyp, ref, match = s[..., 0], s[..., 1], s[..., 2]
    eps = 1e-16
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(hyp > 0, match / np.where(hyp > 0, hyp, 1), eps)
        rec = np.where(ref > 0, match / np.where(ref > 0, ref, 1), eps)
    effective = (hyp > 0) & (ref > 0)
    n_eff = effective.sum(-1)
    avg_prec = np.where(n_eff > 0, (prec * effective).sum(-1) / np.maximum(n_eff, 1), 0.0)
    avg_rec = np.where(n_eff > 0, (rec * effective).sum(-1) / np.maximum(n_eff, 1), 0.0)
    f = CHRF_BETA ** 2
    den = f * avg_prec + avg_rec
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(avg_prec + avg_rec > 0, 100 * (1 + f) * avg_prec * avg_rec / np.where(den > 0, den, 1), 0.0)


AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ratio": ratio, "exp_ratio": exp_ratio, "macro_f1": macro_f1, "chrf": chrf}


def chrf_stats(hypothesis: str, reference: str) -> list[float]:
    """One example's chrF statistics ([hyp, ref, match] per character order), as sacrebleu counts them."""
    from sacrebleu.metrics import CHRF

    return [float(x) for x in CHRF()._extract_corpus_statistics([hypothesis], [[reference]])[0]]


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (sacrebleu defaults, 0-100) of one hypothesis against one reference."""
    from sacrebleu import sentence_chrf as chrf_of

    return float(chrf_of(hypothesis, [reference]).score)


def class_stats(gold: int, pred: int, n_classes: int = 2) -> list[float]:
    """One example's [tp, fp, fn] per class (macro-F1's statistics)."""
    out = []
    for c in range(n_classes):
        out += [float(gold == c and pred == c), float(gold != c and pred == c), float(gold == c and pred != c)]
    return out


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is computed from per-example statistics, and which way is better."""

    aggregate: str  # a key of AGGREGATES
    higher_is_better: bool = True
    # For `postlab study plan` without measured variances: a stated, deliberately conservative guess
    # of the variance components (seed, example, residual) of a difference between two arms.
    planning: tuple[float, float, float] | None = None

    def value(self, sums: np.ndarray) -> np.ndarray:
        return AGGREGATES[self.aggregate](np.asarray(sums, dtype=float))


# A stage's `against_reference` reading (postlab.diagnose.against_reference), per held-out pair, in
# <stage>/against-reference/ beside its eval/: [ranks the pair right, 1], [implicit-reward margin, 1]
# and [KL(π‖πref) summed over the contexts that predict the chosen answer's tokens, those contexts], so
# ref_kl is the mean KL per chosen-answer token over any subset of pairs. Lower KL counts as better:
# closer to the reference is what the implicit-reward view's KL term asks (arXiv 2507.00018).
AGAINST_REFERENCE = "against-reference"
AGAINST_REFERENCE_SPECS = {
    # planning: a 0/1 difference, the worst case of accuracy's (postlab.tasks.paraphrase); the margin's and
    # the KL's scale depend on β and the data, so the planner measures them (--variance-from) or says "?"
    "ref_reward_accuracy": MetricSpec("ratio", planning=(4e-4, 0.25, 0.25)),
    "ref_reward_margin": MetricSpec("ratio"),
    "ref_kl": MetricSpec("ratio", higher_is_better=False),
}


@dataclass
class PerExample:
    """One evaluation's per-example statistics: ids in dev order and, per metric, an [n, k] array."""

    ids: list[str]
    stats: dict[str, np.ndarray]
    specs: dict[str, MetricSpec]

    def value(self, metric: str, index: np.ndarray | None = None) -> float:
        s = self.stats[metric] if index is None else self.stats[metric][index]
        return float(self.specs[metric].value(s.sum(0)))

    def aligned(self, ids: list[str]) -> "PerExample":
        """The same evaluation restricted to (and ordered by) `ids`."""
        pos = {i: k for k, i in enumerate(self.ids)}
        idx = np.array([pos[i] for i in ids], dtype=int)
        return PerExample(list(ids), {m: s[idx] for m, s in self.stats.items()}, self.specs)


def write_per_example(out_dir: Path | None, records: list[dict], specs: dict[str, MetricSpec]) -> None:
    """``per_example.jsonl`` (one line per dev example: ``id``, ``score`` (the task's headline score
    of that example, higher is better: what win rates compare) and ``stats`` {metric: vector}) and
    ``per_example_spec.json`` {metric: {aggregate, higher_is_better}}."""
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / PER_EXAMPLE, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": str(r["id"]), "score": float(r["score"]),
                                **({"stats": r["stats"]} if "stats" in r else {})}) + "\n")
    (out_dir / SPEC).write_text(json.dumps({"metrics": {m: {"aggregate": s.aggregate, "higher_is_better": s.higher_is_better}
                                                        for m, s in specs.items()}}, indent=1), encoding="utf-8")


def read_per_example(eval_dir: Path) -> PerExample | None:
    """The per-example statistics an evaluation wrote, or None when it wrote none (runs from before
    postlab recorded them, or torn files)."""
    spec_file, rec_file = eval_dir / SPEC, eval_dir / PER_EXAMPLE
    if not spec_file.is_file() or not rec_file.is_file():
        return None
    try:
        specs = {m: MetricSpec(d["aggregate"], bool(d.get("higher_is_better", True)))
                 for m, d in json.loads(spec_file.read_text(encoding="utf-8"))["metrics"].items()
                 if d.get("aggregate") in AGGREGATES}
        ids, rows = [], []
        for line in rec_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                ids.append(str(rec["id"]))
                rows.append(rec.get("stats") or {})
        stats = {m: np.array([r[m] for r in rows], dtype=float) for m in specs if rows and all(m in r for r in rows)}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ids or not stats or len(set(ids)) != len(ids):
        return None
    return PerExample(ids, stats, {m: specs[m] for m in stats})


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
