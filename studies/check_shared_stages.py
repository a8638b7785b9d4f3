"""Do issue 40's studies still share the stages they are designed to share? (No torch, no training.)

    PYTHONPATH=src python studies/check_shared_stages.py        # from the repository root

A stage is copied from another run instead of trained when both have the same model, seed and stage
configs up to it (RunConfig.stage_key); an ExPO stage extrapolates another run's training when they
differ only in expo_lambda (stage_key(i, trained=True)). Editing one study's settings and not the
other's silently turns a copy into a retraining; this checks every intended share:

- sft-objectives' nll arm is lr-reduction's eta arm (both stages);
- expo's runs share lr-reduction's eta-arm SFT stage, and its DPO training (lambda = 1: the whole run).
Exit status 1 and the mismatches listed where a share is broken.
"""
from __future__ import annotations

import sys
from pathlib import Path

from postlab import study as st

STUDIES = Path(__file__).resolve().parent


def runs(name: str) -> dict[tuple, object]:
    """(task, arm, seed) -> the run's RunConfig, for a study file of this folder."""
    s = st.load_study(STUDIES / f"{name}.yaml")
    out = {}
    for r in st.plan(s):
        arm = next((v for k, v in r.axes.items() if k not in ("task", "seed")), None)
        out[(r.axes["task"], arm, r.axes["seed"])] = r.config
    return out


class Checker:
    """Compares stage keys and collects the mismatches."""

    def __init__(self):
        self.problems: list[str] = []
        self.checked = 0

    def same(self, what: str, a, b, i: int, trained: bool = False) -> None:
        self.checked += 1
        if a.stage_key(i, trained=trained) != b.stage_key(i, trained=trained):
            self.problems.append(f"{what}: stage {i} ({a.stages[i].name}) differs")

    def missing(self, what: str) -> None:
        self.problems.append(what)


def check_eta_arm(c: Checker, lr: dict, obj: dict, expo: dict) -> None:
    """lr-reduction's eta arm against sft-objectives' nll arm and every ExPO run of the same task and seed."""
    for (task, arm, seed), cfg in lr.items():
        if arm != "eta":
            continue
        nll = obj.get((task, "nll", seed))
        if nll is None:
            c.missing(f"sft-objectives has no nll run for {task}, seed {seed}")
        else:
            for i in (0, 1):
                c.same(f"lr-reduction eta vs sft-objectives nll ({task}, seed {seed})", cfg, nll, i)
        for (t, lam, s), e in expo.items():
            if (t, s) != (task, seed):
                continue
            what = f"lr-reduction eta vs expo lambda={lam} ({task}, seed {seed})"
            c.same(what, cfg, e, 0)
            c.same(what + ", DPO training", cfg, e, 1, trained=True)
            if e.stages[1].expo_lambda == cfg.stages[1].expo_lambda:
                c.same(what, cfg, e, 1)


def main() -> int:
    lr, obj, expo = (runs(n) for n in ("lr-reduction", "sft-objectives", "expo"))
    c = Checker()
    check_eta_arm(c, lr, obj, expo)
    for p in c.problems:
        print("MISMATCH", p)
    print(f"{c.checked} shared stages checked, {len(c.problems)} problem(s)")
    return 1 if c.problems else 0


if __name__ == "__main__":
    sys.exit(main())
