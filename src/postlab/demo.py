"""`make demo`: the product's main job, a study, on the embedded model and the shared data.

Runs `studies/quick.yaml` (SFT-only, DPO-only and SFT->DPO, FFT and LoRA, on paraphrase and sonnets,
sized for 2 CPU cores), resuming if it was interrupted, then prints the report's main table and
where the report is."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import DataError

log = logging.getLogger("postlab")

QUICK = Path(__file__).resolve().parents[2] / "studies" / "quick.yaml"


def demo(data: str, study_file: str | Path = QUICK, study_dir: str | None = None) -> int:
    from .study import format_outcome, load_study, run_study

    for need in ("quora/quora-train.tsv", "sonnets/sonnets.txt"):
        if not (Path(data) / need).is_file():
            raise DataError(f"{data}: the shared data ({need}) is not there; pass --data DIR")
    os.environ["POSTLAB_DATA"] = str(Path(data).resolve())  # the quick study reads its files from there
    study = load_study(study_file)
    log.info("demo: study %s (%s)", study.name, study_file)
    outcome = run_study(study, study_dir)
    print("\n=== postlab demo ===")
    print(format_outcome(outcome, None))
    if outcome.report is not None:
        print(main_table(outcome.report))
        print(f"report     {outcome.report} (tables, paired comparisons, plots; all runs in runs.csv)")
    return 1 if outcome.failed else 0


def main_table(report: Path) -> str:
    """The report's first table (the study's main result)."""
    lines = report.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    heading = next((lines[i] for i in range(start, -1, -1) if lines[i].startswith("#")), "")
    return "\n".join([heading.lstrip("# ")] + lines[start:end])
