"""A run's log, `metrics.jsonl`: one JSON object per line (train records every `log_every` steps, dev
records at each evaluation, events). `MetricsLog` writes it during a run; `read_jsonl` is the one
reader (the report, a reused stage, resuming), and skips lines a kill left torn."""
from __future__ import annotations

import json
from pathlib import Path

from . import distributed as dist


def read_jsonl(path: Path):
    """Yield the JSON objects of a .jsonl file, skipping blank or torn lines (crashed runs)."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (flushed per line)."""

    def __init__(self, path: Path, trackers=None):
        self.path = path
        self.trackers = trackers  # postlab.tracking.Trackers: TensorBoard / MLflow views of the records
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop records of `stage` logged after its checkpoint (they will be logged again)."""
        if not dist.is_main() or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and rec.get("stage") == stage and rec.get("step", 0) > step:
                continue
            keep.append(line)
        from .checkpoint import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in keep))
