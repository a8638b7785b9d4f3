"""`make demo`: the product's main job, a study, on the embedded model and the shared data.

Runs `studies/demo.yaml` (FFT vs LoRA r=8 at matched steps on the sonnets, 3 seeds, sized for 2 CPU
cores), resuming if it was interrupted, then prints the finding, a short table and where the report
is. `--study` runs another study file the same way (e.g. studies/quick.yaml: every regime, 1 seed)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import DataError

log = logging.getLogger("postlab")

DEMO = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"


def demo(data: str, study_file: str | Path = DEMO, study_dir: str | None = None) -> int:
    from .study import format_outcome, load_study, run_study

    if not Path(data).is_dir():
        raise DataError(f"{data}: the shared data directory is not there; pass --data DIR")
    # (each file the study's tasks read is checked before anything trains: study.check_data)
    os.environ["POSTLAB_DATA"] = str(Path(data).resolve())  # the demo study reads its files from there
    study = load_study(study_file)
    log.info("demo: study %s (%s)", study.name, study_file)
    outcome = run_study(study, study_dir)
    print("\n=== postlab demo ===")
    print(format_outcome(outcome, None))
    if outcome.report is not None:
        from .report import summary_text

        print(summary_text(outcome.report))
        print(f"report     {outcome.report} (finding, tables, paired comparisons, plots; all runs in runs.csv)")
    return 1 if outcome.failed else 0
