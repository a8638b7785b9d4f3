"""Paired speed ratios of a benchmark's interleaved repeats, with a 95% confidence interval.

    .venv/bin/python bench/paired_ratio.py bench/results/vs_trl_paraphrase_bf16_amx_warm.json bench/results/allocator_huge_pages.json

Each repeat of vs_trl.py (TRL then postlab), of vs_commit.py (the past commit then this one), of
allocator.py (one process per setting) and of inference_casts.py (one region per forward, then per
pass) ran side by side, so its ratio is one
paired observation. Reports the geometric mean of the ratios with a
Student-t interval on their logarithms (postlab.report.stats.summarize): an interval that holds 1 (or a
target such as 3x) is not evidence either way, and its half-width is the smallest effect these
repeats could have resolved.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from postlab.report.stats import summarize


def ratio_ci(ratios: list[float]) -> dict:
    s = summarize([math.log(r) for r in ratios])
    return {"n": s["n"], "ratio": math.exp(s["mean"]), "ci_low": math.exp(s["ci_low"]), "ci_high": math.exp(s["ci_high"]),
            "paired": [round(r, 3) for r in ratios]}


def comparisons(doc: dict) -> dict[str, list[float]]:
    """name -> paired ratios (> 1: the first-named is faster)."""
    out = {}
    for case, row in doc["results"].items():
        if isinstance(row, dict) and row and all(isinstance(v, dict) and "per pass" in v for v in row.values()):
            for weights, ways in row.items():  # inference_casts.py: the two ways alternate within a repeat
                out[f"{case} ({weights}): per pass vs per forward"] = [
                    f / p for f, p in zip(ways["per forward"]["seconds"], ways["per pass"]["seconds"])]
            continue
        runs = row.get("runs", {}) if isinstance(row, dict) else {}
        if "trl" in runs:  # vs_trl.py
            out[f"{case}: postlab vs TRL"] = [t["seconds"] / p["seconds"] for t, p in zip(runs["trl"], runs["postlab"])]
            continue
        if "past" in runs and "now" in runs:  # vs_commit.py
            out[f"{case}: now vs past"] = [p["seconds"] / n["seconds"] for p, n in zip(runs["past"], runs["now"])]
            continue
        names = list(runs)  # allocator.py: each setting against the later ones
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for key in ("stage_s", "second_stage_s"):
                    if key in runs[a][0]:
                        out[f"{case} {key}: {a} vs {b}"] = [y[key] / x[key] for x, y in zip(runs[a], runs[b])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    a = ap.parse_args()
    for path in a.results:
        doc = json.loads(path.read_text())
        print(f"{path} ({doc['meta'].get('machine')}, {doc['meta'].get('precision')}):")
        for name, ratios in comparisons(doc).items():
            r = ratio_ci(ratios)
            print(f"  {name}: {r['ratio']:.2f}x, 95% CI {r['ci_low']:.2f}-{r['ci_high']:.2f}x (n={r['n']}; paired {r['paired']})")


if __name__ == "__main__":
    main()
