"""Each objective of issue 41 trains: a few full-batch steps of a tiny random model (fp32, CPU) through the
one training loop lower the objective's own loss (KTO on the pairs unpaired, WPO with the policy's log Σπ²)."""
from __future__ import annotations

import json

import pytest

from helpers import run_config
from postlab.config import parse_run_config
from postlab.run import run

RUNS = [  # (id, objective config)
    ("exo_pair", {"name": "exo_pair", "beta": 0.5}),
    ("nca_pair", {"name": "nca_pair", "beta": 0.5}),
    ("bco_pair", {"name": "bco_pair", "beta": 0.5}),
    ("sppo_hard", {"name": "sppo_hard", "beta": 0.5}),
    ("aot", {"name": "aot", "beta": 0.5}),
    ("aot_unpaired", {"name": "aot_unpaired", "beta": 0.5}),
    ("apo_zero", {"name": "apo_zero", "beta": 0.5}),
    ("apo_down", {"name": "apo_down", "beta": 0.5}),
    ("discopop", {"name": "discopop", "beta": 0.5}),
    ("sigmoid_norm", {"name": "sigmoid_norm", "beta": 0.5}),
    ("dpo-ld_alpha", {"name": "dpo", "beta": 0.5, "ld_alpha": 0.3}),
    ("dpo-wpo", {"name": "dpo", "beta": 0.5, "wpo": True}),
    ("ipo-wpo", {"name": "ipo", "beta": 0.5, "wpo": True}),
    ("kto", {"name": "kto", "beta": 0.5}),
    ("kto-apo_zero_unpaired", {"name": "kto", "beta": 0.5, "loss_type": "apo_zero_unpaired"}),
    ("orpo", {"name": "orpo", "beta": 0.5}),
    ("cpo", {"name": "cpo", "beta": 0.5}),
    ("cpo-simpo", {"name": "cpo", "loss_type": "simpo", "beta": 2.0}),
    ("cpo-alphapo", {"name": "cpo", "loss_type": "alphapo", "alpha": 0.25, "beta": 2.0}),
    ("mix-dpo-nll", {"name": "mix", "terms": [{"name": "dpo", "beta": 0.5}, {"name": "nll"}], "weights": [1.0, 0.2]}),
]
PAIRS = [  # answers of different lengths, so LD-DPO's shared-length cut matters
    ("Is the sky blue?", " Yes, the sky is blue on a clear day.", " No."),
    ("Is fire cold?", " No, fire is hot.", " Yes, fire is very cold, colder than ice."),
    ("Do fish swim?", " Yes.", " No, fish never swim in water at all."),
    ("Is snow white?", " Yes, fresh snow is white.", " No, snow is always green."),
    ("Can birds fly?", " Most birds can fly.", " No bird has ever flown."),
    ("Is the sun a star?", " Yes, the sun is a star.", " No, it is a planet."),
]


@pytest.mark.parametrize("objective", [o for _, o in RUNS], ids=[i for i, _ in RUNS])
def test_a_tiny_run_lowers_its_own_loss(objective, tiny_llama, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    unpaired = objective["name"] == "kto"  # each pair as two examples, chosen desirable and rejected not
    tree = run_config(tiny_llama, tmp_path / "run", data, name="pref", objective=objective,
                      task={"name": "file", "train": str(data), "dev": str(data), "dev_limit": 2},
                      optim={"lr": 3e-3, "batch_size": len(PAIRS) * (2 if unpaired else 1), "schedule": "constant"},
                      epochs=6,
                      eval_at_start=False, log_every=1)
    run(parse_run_config(tree))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0], losses
