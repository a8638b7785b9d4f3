"""Calibration of the seed x example test (postlab.report.paired) by simulation: false-positive rate under
the null and power at the planner's detectable effect, over a grid of variance components, seeds and
dev sizes (down to 2 dev examples). Also the tests it combines, alone (the crossed test without its
guards, the paired t-test over seeds, the t-test over examples), to show why each is needed.
docs/statistics.md quotes its output.

    python bench/stats_calibration.py --sims 4000 --out bench/results/stats_calibration.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from postlab.report.paired import Components, crossed_from_mean_squares, detectable_effect, mean_squares

# (seed SD, example SD, residual SD) of a per-example difference; seeds; dev examples
GRID = [
    ((0.00, 0.00, 1.00), 3, 12, "pure per-example noise, no structure"),
    ((0.10, 0.30, 0.30), 3, 12, "12 sonnets, all three sources"),
    ((0.05, 0.30, 0.30), 3, 200, "200 pairs, training noise matters"),
    ((0.10, 0.30, 0.30), 3, 200, "200 pairs, training noise dominates"),
    ((0.30, 0.00, 0.30), 3, 12, "no example effect"),
    ((0.02, 0.30, 0.40), 3, 400, "400 pairs, little training noise"),
    ((0.05, 0.20, 0.20), 5, 50, "5 seeds"),
    ((0.10, 0.20, 0.20), 2, 100, "2 seeds"),
    ((0.00, 0.30, 0.30), 5, 2, "2 dev examples, 5 seeds"),
    ((0.30, 1.00, 0.30), 10, 2, "2 dev examples, 10 seeds"),
    ((0.30, 1.00, 0.30), 10, 3, "3 dev examples, 10 seeds"),
    ((0.30, 1.00, 0.30), 3, 4, "4 dev examples, 3 seeds"),
]


def rates(sd: tuple[float, float, float], S: int, n: int, delta: float, sims: int, rng) -> dict:
    su, sv, sw = sd
    D = (delta + su * rng.standard_normal((sims, S, 1)) + sv * rng.standard_normal((sims, 1, n))
         + sw * rng.standard_normal((sims, S, n)))
    m, ms_s, ms_e, ms_r = mean_squares(D)
    res = crossed_from_mean_squares(m, ms_s, ms_e, ms_r, S, n)
    return {"postlab": float((res["p_value"] < 0.05).mean()), "crossed_alone": float((res["p_crossed"] < 0.05).mean()),
            "seeds_alone": float((res["p_seeds"] < 0.05).mean()), "examples_alone": float((res["p_examples"] < 0.05).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=4000)
    ap.add_argument("--out", default="bench/results/stats_calibration.json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for sd, S, n, what in GRID:
        comps = Components(*(x * x for x in sd))
        mde = detectable_effect(comps, S, n)
        row = {"case": what, "seed_sd": sd[0], "example_sd": sd[1], "residual_sd": sd[2], "seeds": S, "examples": n,
               "detectable_effect": mde, "false_positive_rate": rates(sd, S, n, 0.0, a.sims, rng),
               "power_at_detectable_effect": rates(sd, S, n, mde, a.sims, rng)}
        rows.append(row)
        fp, pw = row["false_positive_rate"], row["power_at_detectable_effect"]
        print(f"{what:38s} S={S:2d} n={n:4d}  false positives: postlab {fp['postlab']:.3f} (crossed alone "
              f"{fp['crossed_alone']:.3f}, seeds alone {fp['seeds_alone']:.3f}, examples alone "
              f"{fp['examples_alone']:.3f})  detectable {mde:.3g}: found {pw['postlab']:.3f}")
    out = {"command": f"python bench/stats_calibration.py --sims {a.sims} --out {a.out}", "alpha": 0.05,
           "stated_power": 0.8, "sims_per_cell": a.sims, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    if not all(math.isfinite(r["detectable_effect"]) for r in rows):
        raise SystemExit("a detectable effect is not finite")


if __name__ == "__main__":
    main()
