"""Teacher data for distillation (`postlab distill sample`): teacher and student responses to the same
prompts, seeded, batched, cached on disk (the sample cache of preferences.py, keyed by each model's
weights, the prompts and the generation settings), written as two training files:

  * ``dsft.jsonl``  prompt/completion = the teacher's response: the data of a dSFT stage;
  * ``pairs.jsonl`` prompt/chosen/rejected = teacher's / student's response: dDPO and daDPO stages
    (pairs whose two responses are identical are dropped and counted).

Both are read by `task: {name: file, train: ...}`. The teacher's log-probs of these responses (and
its top-k for `kd`) are computed when a stage with `teacher:` starts, and cached like reference
log-probs, so the teacher is never in memory during student training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .cache import location
from .checkpoint import atomic_write_json, atomic_write_text
from .config import GenerationConfig, PairsConfig
from .models import LM
from .preferences import sample_completions

log = logging.getLogger("postlab")


def sample_teacher_and_student(teacher: LM, student: LM, prompts: list[str], ids: list[str],
                               generation: GenerationConfig, out: Path, clean_for: str | None = None) -> dict:
    """Sample one response per prompt from each model and write dsft.jsonl, pairs.jsonl, samples.json."""
    cfg = PairsConfig(strategy="same-sonnet", k=1, generation=generation)
    from .tasks import TASKS

    sampled = getattr(TASKS.get(clean_for or ""), "sampled_rejected", None)  # the task cuts samples as it evaluates
    clean = sampled.clean if sampled is not None else (lambda s: s)
    got = {}
    for role, lm in (("teacher", teacher), ("student", student)):
        samples, path = sample_completions(lm, prompts, cfg, location("samples"), tag=f"distill-{role}")
        got[role] = [clean(s[0]) for s in samples]
        log.info("distill: %s responses cached at %s", role, path)
    dsft, pairs, same, empty = [], [], 0, 0
    for pid, prompt, t, s in zip(ids, prompts, got["teacher"], got["student"]):
        if not t.strip():
            empty += 1
            continue
        dsft.append({"id": pid, "prompt": prompt, "completion": t})
        if t.strip() == s.strip() or not s.strip():
            same += 1
            continue
        pairs.append({"id": pid, "prompt": prompt, "chosen": t, "rejected": s})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "dsft.jsonl", "".join(json.dumps(r) + "\n" for r in dsft))
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    summary = {"prompts": len(prompts), "dsft_examples": len(dsft), "pairs": len(pairs),
               "skipped_empty_teacher": empty, "skipped_same_or_empty_student": same,
               "teacher": teacher.source, "student": student.source,
               "generation": generation.model_dump(mode="json")}
    atomic_write_json(out / "samples.json", summary)
    return summary
