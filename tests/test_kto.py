"""KTO vs TRL 1.16's ``KTOTrainer._compute_loss`` (loss, gradients, KL baseline and metrics on identical
inputs), its properties, its declared needs, and its data: TRL's unpaired format read by the file task and
unpaired examples from the label tasks.

Stage wiring left to do (the lead's): the training stage does not yet build unpaired batches nor score the
KL baseline's mismatched pairs, so ``kto`` is refused at config validation (``base.STAGE_FEEDS``) and its
"tiny run" here is gradient descent on free per-token logits through the loss function itself
(``test_kto_descent_on_free_logits_lowers_the_loss``); docs/objectives.md says what the stage must prepare.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from helpers import write_pairs
from postlab.config import TaskConfig
from postlab.errors import ConfigError, DataError
from postlab.objectives import TokenLogps, UnpairedLogps, get_objective, parse_args
from postlab.tasks import get_task

pytest.importorskip("trl")
from trl_harness import ours, random_side, trl_kto  # noqa: E402


def make_unpaired(b: int = 8, t: int = 6, seed: int = 0, labels=None, kl_shift: float = 0.0) -> UnpairedLogps:
    g = torch.Generator().manual_seed(seed)
    y = random_side(g, b, t)
    mismatched = random_side(g, b, t, shift=kl_shift)
    desirable = torch.tensor(labels if labels is not None else [i % 3 != 0 for i in range(b)])
    return UnpairedLogps(y, desirable, mismatched)


CASES = [  # (postlab options = TRL options)
    {"beta": 0.1},
    {"beta": 0.5},
    {"beta": 0.2, "desirable_weight": 1.33, "undesirable_weight": 0.7},
    {"beta": 0.3, "loss_type": "apo_zero_unpaired"},
]
TRL_METRIC = {"kl": "kl", "rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
              "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected", "rewards/margin": "rewards/margins"}


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("seed,kl_shift", [(0, 0.0), (1, 1.0), (2, -1.0)])  # KL baseline near 0, > 0, clamped
def test_matches_trl_kto_trainer(options, seed, kl_shift):
    x = make_unpaired(seed=seed, kl_shift=kl_shift)
    loss, m = ours("kto", x, **options)
    ref_loss, ref_m = trl_kto(x, **options)
    assert_close(loss, ref_loss)
    assert_close(torch.autograd.grad(loss, x.completions.policy)[0],
                 torch.autograd.grad(ref_loss, x.completions.policy)[0])
    for ours_key, trl_key in TRL_METRIC.items():
        assert m[ours_key].item() == pytest.approx(ref_m[trl_key], rel=1e-6, abs=1e-9), ours_key


def test_kl_baseline_cases_cover_zero_and_positive():
    """Guard for the comparison above: the baseline is clamped to 0 in one case and positive in another."""
    kls = [ours("kto", make_unpaired(seed=s, kl_shift=k))[1]["kl"].item() for s, k in [(1, 1.0), (2, -1.0)]]
    assert kls[0] > 0 and kls[1] == 0


def test_only_desirable_examples_match_trl_and_log_zero_for_the_missing_label():
    x = make_unpaired(seed=3, labels=[True] * 8)
    loss, m = ours("kto", x)
    ref_loss, ref_m = trl_kto(x, beta=0.1)
    assert_close(loss, ref_loss)
    assert "rewards/rejected" not in ref_m and m["rewards/rejected"].item() == 0.0  # every batch logs every key


def test_gradients_raise_desirable_and_lower_undesirable_log_probs_and_skip_the_baseline():
    x = make_unpaired(seed=4)
    x.mismatched.policy.requires_grad_()
    loss, _ = ours("kto", x, beta=0.5)
    g_y, g_kl = torch.autograd.grad(loss, [x.completions.policy, x.mismatched.policy], allow_unused=True)
    real = x.completions.mask
    assert (g_y[x.desirable][real[x.desirable]] < 0).all()  # descent raises their log-probs
    assert (g_y[~x.desirable][real[~x.desirable]] > 0).all()
    assert g_kl is None or not g_kl.any()  # z is a detached baseline (TRL scores it under no_grad)


def test_kl_baseline_shifts_the_reference_point():
    """With z > 0 a desirable example needs ρ > z to be rewarded: its loss is higher than with z = 0."""
    x = make_unpaired(seed=5, labels=[True] * 8, kl_shift=2.0)
    with_z, m = ours("kto", x)
    without, _ = ours("kto", x, loss_type="apo_zero_unpaired")  # 1 − σ(βρ): KTO's desirable loss at z = 0
    assert m["kl"] > 0 and with_z > without


def test_kto_descent_on_free_logits_lowers_the_loss():
    """What a tiny-model run would show, through the loss alone (the stage cannot feed KTO yet): per-token
    logits as free parameters, the KL pass scored under the same logits shifted by one example (TRL's
    mismatched pairs), 30 Adam steps lower the KTO loss and separate desirable from undesirable rewards."""
    g = torch.Generator().manual_seed(0)
    b, t, vocab = 8, 5, 11
    logits = torch.zeros(b, t, vocab, requires_grad=True)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.arange(t) < torch.randint(2, t + 1, (b, 1), generator=g)
    desirable = torch.tensor([i % 2 == 0 for i in range(b)])
    reference = torch.full((b, t), -torch.log(torch.tensor(float(vocab))))
    opt = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(30):
        policy = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        mismatched = TokenLogps(policy.roll(1, 0).detach(), mask.roll(1, 0), reference=reference)
        loss, m = ours("kto", UnpairedLogps(TokenLogps(policy, mask, reference=reference), desirable, mismatched),
                       beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert m["rewards/chosen"] > 0 > m["rewards/rejected"]


def test_declares_unpaired_data_a_reference_and_the_kl_baseline_and_is_refused_until_wired():
    spec = get_objective("kto")
    assert (spec.kind, spec.needs_reference, spec.needs_kl_baseline) == ("unpaired", True, True)
    assert not spec.for_args(spec.args(loss_type="apo_zero_unpaired")).needs_kl_baseline
    with pytest.raises(ConfigError, match="unpaired batches nor the KL baseline"):
        parse_args(spec, {})
    with pytest.raises(ConfigError, match="unpaired batches"):
        parse_args(spec, {"loss_type": "apo_zero_unpaired"})
    x = make_unpaired(seed=6)
    x.mismatched = None
    with pytest.raises(ValueError, match="mismatched"):
        ours("kto", x)
    ours("kto", x, loss_type="apo_zero_unpaired")  # needs no baseline


@pytest.mark.parametrize("raw,needle", [({"beta": 0}, "beta"), ({"desirable_weight": 0}, "desirable_weight"),
                                        ({"loss_type": "bco"}, "loss_type")])
def test_arg_validation(raw, needle):
    with pytest.raises(ValueError, match=needle):
        get_objective("kto").args(**raw)


# ---- data: TRL's unpaired format and unpaired examples from the tasks ------------------------------------

def test_file_task_reads_prompt_completion_label_records(tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"prompt": "Q1", "completion": " good", "label": True}, {"prompt": "Q1", "completion": " bad", "label": False},
            {"prompt": "Q2", "completion": " fine", "label": 1}, {"prompt": "Q3", "completion": " no", "label": "false"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task(TaskConfig(name="file", train=str(path), dev=str(path)))
    got = task.unpaired_examples()
    assert [(e.prompt, e.completion, e.desirable) for e in got] == [
        ("Q1", " good", True), ("Q1", " bad", False), ("Q2", " fine", True), ("Q3", " no", False)]
    # the same file serves SFT (and dev loss) with its desirable completions only
    assert [e.completion for e in task.train_examples()] == [" good", " fine"]
    assert [e.completion for e in task.dev_examples()] == [" good", " fine"]


def test_file_task_labels_from_csv_and_bad_labels(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nQ,a,True\nQ,b,0\n")
    task = get_task(TaskConfig(name="file", train=str(path)))
    assert [e.desirable for e in task.unpaired_examples()] == [True, False]
    path.write_text("prompt,completion,label\nQ,a,maybe\n")
    with pytest.raises(DataError, match="label must be true or false.*'maybe'"):
        task.unpaired_examples()


def test_preference_file_and_label_tasks_give_unpaired_examples(tmp_path):
    pref = tmp_path / "pairs.jsonl"
    pref.write_text(json.dumps({"prompt": "P", "chosen": " c", "rejected": " r", "id": "a"}) + "\n")
    got = get_task(TaskConfig(name="file", train=str(pref))).unpaired_examples()
    assert [(e.completion, e.desirable, e.id) for e in got] == [(" c", True, "a/chosen"), (" r", False, "a/rejected")]
    paraphrase = get_task(TaskConfig(name="paraphrase", train=str(write_pairs(tmp_path / "p.tsv", 6))))
    pairs, unpaired = paraphrase.preference_pairs(), paraphrase.unpaired_examples()
    assert len(unpaired) == 2 * len(pairs) and sum(e.desirable for e in unpaired) == len(pairs)
    assert all(u.completion == p.chosen for u, p in zip(unpaired[::2], pairs))
    cloze = tmp_path / "c.jsonl"
    cloze.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(3)))
    task = get_task(TaskConfig(name="cloze", train=str(cloze),
                               cloze={"template": "{text}:", "labels": {0: " a", 1: " b", 2: " c"}}))
    got = task.unpaired_examples()
    assert len(got) == 12 and sum(e.desirable for e in got) == 6  # a pair per wrong label: balanced labels


def test_sonnets_say_where_their_unpaired_examples_come_from():
    with pytest.raises(ConfigError, match="samples its undesirable answers.*build_pairs.*unpair"):
        get_task(TaskConfig(name="sonnets")).unpaired_examples()
