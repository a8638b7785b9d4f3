"""A stage's `against_reference` reading, per held-out pair: the KL to the reference accounted pair by
pair (exact over the vocabulary), the per-pair statistics a study report tests, the pair limit
`against_reference_examples` and its cost in `postlab study plan`. Tiny random models, fp32 on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from helpers import run_config, write_pairs
from postlab.config import TaskConfig, parse_run_config
from postlab.data import Pair, tokenize
from postlab.metrics import AGAINST_REFERENCE, AGAINST_REFERENCE_SPECS, read_per_example
from postlab.models import load_lm
from postlab.run import run
from postlab.tasks import get_task

# answers of several tokens and of different lengths, so that contexts belong to pairs unevenly
PAIRS = [Pair(f"Question {i}: how do I learn {'physics' if i % 2 else 'cooking'}?",
              " By reading a good book every day" if i % 3 else " Practice",
              " No" if i % 2 else " I would not know where to begin", f"q{i}") for i in range(7)]


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory, tokenizer_dir):
    """(policy, reference): tiny Llamas with different random weights, fp32 on CPU."""
    paths = [build_tiny_model(tmp_path_factory.mktemp(f"llama{s}"), "llama", tokenizer_dir, seed=s) for s in (5, 6)]
    return tuple(load_lm(str(p), "cpu", "fp32") for p in paths)


def test_position_kl_per_pair_is_each_chosen_answers_kl_from_a_plain_forward(two_llamas):
    """Per pair, the KL summed over the positions that predict its chosen tokens equals a plain
    forward of prompt + chosen through both models (full softmaxes), whatever batch the pair was in;
    the sums over pairs give the mean KL per chosen-answer token as a single aggregate did."""
    from postlab.diagnose import position_kl

    policy, reference = two_llamas
    items, _ = tokenize(PAIRS, policy.tokenizer, policy.max_length, "truncate", append_eos=True, source="pairs")
    sums, counts = position_kl(policy, reference, items, batch_size=3)  # batches of 3, 3, 1
    by_hand, tokens = [], []
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it.prompt + it.completions[0]])
            at = slice(len(it.prompt) - 1, len(it.prompt) + len(it.completions[0]) - 1)  # predict the chosen tokens
            p = torch.log_softmax(policy.model(ids).logits[0, at].double(), -1)
            q = torch.log_softmax(reference.model(ids).logits[0, at].double(), -1)
            by_hand.append(float((p.exp() * (p - q)).sum()))
            tokens.append(len(it.completions[0]))
    assert counts == tokens and len(set(counts)) > 1
    assert sums == pytest.approx(by_hand, rel=1e-4) and min(sums) > 0
    assert sum(sums) / sum(counts) == pytest.approx(sum(by_hand) / sum(tokens), rel=1e-4)
    # the batching does not move any pair's share
    assert position_kl(policy, reference, items, batch_size=16)[0] == pytest.approx(sums, rel=1e-5)


def test_against_reference_writes_per_pair_statistics_that_give_its_metrics(two_llamas, tmp_path):
    from postlab.diagnose import against_reference

    policy, reference = two_llamas
    got = against_reference(policy, reference, PAIRS, 0.5, 4, True, out_dir=tmp_path / AGAINST_REFERENCE)
    per = read_per_example(tmp_path / AGAINST_REFERENCE)
    assert per is not None and per.ids == [p.id for p in PAIRS] and set(per.stats) == set(AGAINST_REFERENCE_SPECS)
    assert not per.specs["ref_kl"].higher_is_better and per.specs["ref_reward_accuracy"].higher_is_better
    for m in AGAINST_REFERENCE_SPECS:  # result.json's scalars are the per-pair statistics' corpus values
        assert per.value(m) == pytest.approx(got[m], rel=1e-9)
    assert got["ref_pairs"] == len(PAIRS)
    acc = per.stats["ref_reward_accuracy"]
    assert set(acc[:, 0]) <= {0.0, 1.0} and (acc[:, 1] == 1).all()
    # a subset of pairs gives the reading of those pairs alone, as the report's resampling needs
    alone = against_reference(policy, reference, PAIRS[:3], 0.5, 4, True)
    for m in AGAINST_REFERENCE_SPECS:
        assert per.value(m, np.arange(3)) == pytest.approx(alone[m], rel=1e-5)


@pytest.mark.parametrize("limit", [None, 5])
def test_a_stage_writes_its_reading_against_the_reference_per_pair(tmp_path, tiny_llama, limit):
    """A DPO stage with against_reference writes <stage>/against-reference/ beside eval/; with
    against_reference_examples: 5 it reads the first 5 dev pairs only."""
    from postlab.diagnose import against_reference

    data = write_pairs(tmp_path / "p.tsv", 16)
    cfg = run_config(tiny_llama, tmp_path / "run", data, epochs=1, eval_at_start=False)
    cfg["stages"].append({**cfg["stages"][0], "name": "dpo", "objective": {"name": "dpo", "beta": 0.2},
                          "against_reference": True, "against_reference_examples": limit})
    got = run(parse_run_config(cfg))["metrics"]
    n = limit or 8  # dev_limit 8
    per = read_per_example(tmp_path / "run" / "1-dpo" / AGAINST_REFERENCE)
    dev = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data), dev_limit=8)).preference_pairs("dev")
    assert got["ref_pairs"] == n and per.ids == [p.id for p in dev[:n]]
    assert {m: per.value(m) for m in AGAINST_REFERENCE_SPECS} == pytest.approx({m: got[m] for m in AGAINST_REFERENCE_SPECS})
    policy = load_lm(str(tmp_path / "run" / "1-dpo" / "model"), "cpu", "fp32")
    reference = load_lm(str(tmp_path / "run" / "0-sft" / "model"), "cpu", "fp32")
    assert against_reference(policy, reference, dev[:n], 0.2, 16, False) == pytest.approx(
        {k: v for k, v in got.items() if k.startswith("ref_")})
    assert not (tmp_path / "run" / "0-sft" / AGAINST_REFERENCE).exists()  # only the stage that asks


def test_against_reference_examples_needs_against_reference_and_keys_the_stage(tiny_llama, tmp_path):
    from postlab.errors import ConfigError

    data = write_pairs(tmp_path / "p.tsv", 8)
    with pytest.raises(ConfigError, match="against_reference_examples.*against_reference: true"):
        parse_run_config(run_config(tiny_llama, tmp_path / "r", data, against_reference_examples=4))
    keys = {n: parse_run_config(run_config(tiny_llama, tmp_path / "r", data, against_reference=True,
                                           against_reference_examples=n)).stage_key(0) for n in (None, 4, 6)}
    assert len(set(keys.values())) == 3  # a stage copied from another run read as many pairs


def test_plan_counts_only_the_pairs_the_stage_reads(tiny_llama, tmp_path):
    """The estimate's against_reference cost scales with the pairs read: the first N of the 40 dev pairs."""
    from postlab.study.estimate import estimate
    from postlab.study.grid import PlannedRun

    data = write_pairs(tmp_path / "p.tsv", 40)

    def seconds(**stage) -> float:
        cfg = parse_run_config(run_config(tiny_llama, tmp_path / "r", data, task={"dev_limit": 40}, **stage))
        return estimate([PlannedRun(0, "r", {}, {}, cfg)])[0][0].seconds

    plain, whole, ten = seconds(), seconds(against_reference=True), seconds(against_reference=True,
                                                                            against_reference_examples=10)
    assert plain < ten < whole
    assert (whole - plain) / (ten - plain) == pytest.approx(4.0)
