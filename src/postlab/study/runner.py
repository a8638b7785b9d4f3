"""Running a study: data checked before anything trains, runs one after another (or one shard of
them), resumable, each failure recorded and the study going on; the plan as text; the report at the
end."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_write_json, atomic_write_text
from ..config import RunConfig
from ..errors import ConfigError
from ..validate import output_location
from .estimate import RunEstimate, human_n, human_s
from .executors import Job, add_axes, in_process, local_workers, ray_tasks, run_config_of, run_dir
from .file import Study
from .grid import PlannedRun, plan

log = logging.getLogger("postlab")


def check_data(runs: list[PlannedRun]) -> None:
    """Read every distinct local data set the runs train and evaluate on (cheap next to training),
    and check every model they name, so a bad input stops the study before anything trains, naming the runs."""
    from ..run import check_inputs

    check_inputs([(r.run_id, r.config) for r in runs])


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2")
    return int(m.group(1)), int(m.group(2))


def shard_runs(runs: list[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    """Runs of shard i/n: those at plan index ≡ i (mod n); the shards partition the plan."""
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for r in runs if r.index % n == i]


def _stage_cell(s) -> str:
    if s.reused:
        return f"{s.name} (reused)"
    if s.extrapolated:
        return f"{s.name} (ExPO of a trained stage)"
    return f"{s.name} {s.examples if s.examples is not None else '?'}x{s.epochs:g}"


def format_plan(study: Study, runs: list[PlannedRun], study_dir: Path, estimates: list[RunEstimate] | None = None,
                notes: dict | None = None, shard: tuple[int, int] | None = None, total: int | None = None) -> str:
    """The plan as text: one line per run (index, run id, stages), with estimates when given."""
    total = len(runs) if total is None else total
    sizes = " x ".join(f"{a.name} ({len(a.values)})" for a in study.axes)
    product = math.prod(len(a.values) for a in study.axes)
    rules = (f"; exclude {len(study.exclude)} rule(s), include {len(study.include)} rule(s)"
             if study.exclude or study.include else "")
    lines = [f"study {study.name} ({study.path}): {total} run(s) -> {study_dir}/runs/<run id>/",
             f"  grid: {sizes} = {product}{rules}"]
    if study.description:
        lines.append(f"  {study.description.strip()}")
    if shard:
        lines.append(f"  shard {shard[0]}/{shard[1]}: {len(runs)} of {total} run(s)")
    est = {e.run.run_id: e for e in estimates or []}
    table = [["#", "run id", "stages (examples x epochs)"] + (["est. tokens", "est. time"] if estimates is not None else [])]
    for r in runs:
        e = est.get(r.run_id)
        if e is None:
            table.append([str(r.index), r.run_id, ", ".join(f"{s.name} ?x{s.epochs}" for s in r.config.stages)])
            continue
        stages = ", ".join(_stage_cell(s) for s in e.stages)
        table.append([str(r.index), r.run_id, stages, human_n(e.train_tokens), human_s(e.seconds)])
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(table[0]))]
    right = {0, 3, 4}
    lines.append("")
    for row in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(("  " + "  ".join(cells)).rstrip())
    if estimates is not None:
        notes = notes or {}
        secs = [e.seconds for e in estimates]
        known = [s for s in secs if s is not None]
        toks = sum(e.train_tokens for e in estimates if e.train_tokens is not None)
        tps = notes.get("throughput", [])
        lines += ["", f"  total: {len(runs)} run(s), ~{human_n(toks)} training tokens, ~{human_s(sum(known))} "
                      f"one run after another" + (f" ({len(secs) - len(known)} run(s) not estimated)"
                                                  if len(known) < len(secs) else ""),
                  "  These are estimates. Tokens: " + notes.get("tokens", "?") + ". Throughput: " + "; ".join(tps)
                  + ("" if notes.get("measured")
                     else " (pass --measure to time training steps of the configured model here)")
                  + ". Time includes reference log-probs, evaluation and generation roughly; LoRA is assumed "
                    "as fast as full fine-tuning. A stage marked (reused) is identical to an earlier run's "
                    "(same model, seed and stages so far) and is copied, not trained."]
        lines += [f"  data problem (such runs would fail): {u}" for u in notes.get("unavailable", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

@dataclass
class StudyOutcome:
    study_dir: Path
    ran: list[str] = field(default_factory=list)  # trained to completion in this call
    skipped: list[str] = field(default_factory=list)  # already complete
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, first line of the error)
    report: Path | None = None


def run_config(study_dir: Path, r: PlannedRun) -> RunConfig:
    return run_config_of(study_dir, r.run_id, r.tree)


def _complete(out: Path) -> bool:
    path = out / "result.json"
    if not path.is_file():
        return False
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def run_study(study: Study, study_dir: str | Path | None = None, shard: tuple[int, int] | None = None,
              runs: list[PlannedRun] | None = None, progress: bool = True, report: bool | None = None,
              workers: int = 1, executor: str = "local", gpus_per_run: float = 0.0) -> StudyOutcome:
    """Run every run of `study` (or of one shard) in `study_dir`, skipping complete runs and
    resuming interrupted ones, one after another, on `workers` processes side by side, or as Ray
    tasks (postlab.study.executors). A run that fails is recorded (error.txt) and the study goes on.
    Writes the report at the end unless sharded (or `report` says otherwise)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..progress import bar as progress_bar
    from ..progress import enabled

    study_dir = output_location(study_dir if study_dir is not None else study.default_dir(), "study directory")
    runs = plan(study) if runs is None else runs
    mine = shard_runs(runs, shard)
    check_data([r for r in mine if not _complete(run_dir(study_dir, r.run_id))])
    study_dir.mkdir(parents=True, exist_ok=True)
    saved = study_dir / "study.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != study.text:
        log.warning("%s differs from %s: runs whose config changed will fail (a run resumes only with the same "
                    "config); the copy is replaced", saved, study.path)
    atomic_write_text(saved, study.text)
    atomic_write_json(study_dir / "plan.json", {
        "study": study.name, "source": str(study.path),
        "runs": [{"index": r.index, "run_id": r.run_id, "axes": r.axes} for r in runs]})
    outcome = StudyOutcome(study_dir)
    done_times: list[float] = []
    todo = []
    for r in mine:
        out = run_dir(study_dir, r.run_id)
        atomic_write_json(out / "axes.json", r.axes)
        if _complete(out):
            add_axes(out, r.axes)
            outcome.skipped.append(r.run_id)
        else:
            todo.append(r)
    if outcome.skipped:
        log.info("study %s: %d of %d run(s) already complete", study.name, len(outcome.skipped), len(mine))
    if not progress:
        from ..progress import disable

        disable()  # this process's bars and those of the runs it starts
    progress = enabled()
    bar = progress_bar(total=len(mine), initial=len(outcome.skipped), position=0, desc=f"study {study.name}",
                       unit="run", dynamic_ncols=True, bar_format="{desc}: {n}/{total} runs |{bar}| {elapsed}{postfix}")
    jobs = [Job(str(study_dir), r.run_id, r.tree, r.axes) for r in todo]
    if executor == "ray":
        results = ray_tasks(jobs, gpus_per_run=gpus_per_run)
    elif workers > 1:
        log.info("study %s: %d run(s) on %d worker processes", study.name, len(jobs), workers)
        results = local_workers(jobs, workers)
    else:
        results = in_process(jobs)
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    try:
        with redirect:
            if todo and workers == 1 and executor != "ray":
                bar.set_postfix_str(f"now {todo[0].run_id}")
            for k, done in enumerate(results):
                if done.error is None:
                    done_times.append(done.seconds)
                    outcome.ran.append(done.run_id)
                else:
                    outcome.failed.append((done.run_id, done.error))
                    log.error("study %s: run %s failed: %s (details in %s)", study.name, done.run_id, done.error,
                              run_dir(study_dir, done.run_id) / "error.txt")
                bar.update(1)
                left = len(todo) - k - 1
                eta = human_s(sum(done_times) / len(done_times) * left / max(workers, 1)) if done_times and left else "?"
                bar.set_postfix_str(f"{left} left, ETA {eta}" if left else "done")
    finally:
        bar.close()
    if (report if report is not None else shard is None):
        from ..report import write_report

        outcome.report = write_report(study_dir)
    return outcome


def format_outcome(o: StudyOutcome, shard: tuple[int, int] | None) -> str:
    lines = [f"study {o.study_dir}: {len(o.ran)} run(s) trained, {len(o.skipped)} already complete, "
             f"{len(o.failed)} failed" + (f" (shard {shard[0]}/{shard[1]})" if shard else "")]
    for rid, msg in o.failed:
        lines.append(f"  FAILED {rid}: {msg} (see {run_dir(o.study_dir, rid)}/error.txt)")
    if o.failed:
        lines.append("  rerun the same command to retry the failed runs (complete runs are skipped)")
    if o.report:
        lines.append(f"report: {o.report}")
    elif shard:
        lines.append(f"when every shard is done (copy their runs/ folders into one study dir): "
                     f"postlab study report {o.study_dir}")
    return "\n".join(lines)
