"""KTO vs TRL 1.16's ``KTOTrainer._compute_loss`` (loss, gradients, KL baseline and metrics on identical
inputs, and on a stage's batch of a real model, whose forwards TRL runs itself), its properties, its
declared needs, and its data: TRL's unpaired format read by the file task, unpaired examples from the label
tasks and from sonnets' sampled pairs, and the stage's mismatched pairs (each item's partner, fixed at stage
start). A tiny run of ``kto`` through the loop: tests/test_objective_runs.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from helpers import nudge, write_pairs
from postlab.config import TaskConfig
from postlab.data import score_batch
from postlab.errors import ConfigError, DataError
from postlab.logprobs import score
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


def test_declares_unpaired_data_a_reference_and_the_kl_baseline_which_the_stage_prepares():
    spec = get_objective("kto")
    assert (spec.kind, spec.needs_reference, spec.needs_kl_baseline) == ("unpaired", True, True)
    assert not spec.for_args(spec.args(loss_type="apo_zero_unpaired")).needs_kl_baseline
    assert parse_args(spec, {}).loss_type == "kto"  # trainable: base.STAGE_FEEDS has unpaired batches and the KL baseline
    parse_args(spec, {"loss_type": "apo_zero_unpaired"})
    x = make_unpaired(seed=6)
    x.mismatched = None
    with pytest.raises(ValueError, match="mismatched"):
        ours("kto", x)
    ours("kto", x, loss_type="apo_zero_unpaired")  # needs no baseline


# ---- the stage: unpaired items, their partners, one forward of the loop vs TRL on a real model -----------

PAIRS = [  # answers of different lengths
    ("Is the sky blue?", " Yes, the sky is blue on a clear day.", " No."),
    ("Is fire cold?", " No, fire is hot.", " Yes, fire is very cold, colder than ice."),
    ("Do fish swim?", " Yes.", " No, fish never swim in water at all."),
    ("Can birds fly?", " Most birds can fly.", " No bird has ever flown."),
    ("Is the sun a star?", " Yes, the sun is a star.", " No, it is a planet."),
]


def raise_completions(lm, items, steps: int = 3) -> None:
    """A few Adam steps of SFT on every completion the items carry (their own and their partners')."""
    opt = torch.optim.Adam(lm.model.parameters(), lr=1e-2)
    for _ in range(steps):
        logps, mask = score(lm, score_batch(items, lm.tokenizer.pad_token_id))
        (-(logps * mask).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad()


def kto_plan(lm, tmp_path, **objective):
    from helpers import stage_plan, write_records

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_records(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    return stage_plan(lm, {"name": "kto", "task": {"name": "file", "train": str(data)},
                           "objective": {"name": "kto", **objective}}, tmp_path)


@pytest.mark.parametrize("options", [{"beta": 0.5}, {"beta": 0.1}, {"beta": 0.5, "loss_type": "apo_zero_unpaired"}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_kto_stage_batch_equals_trl_on_the_model(options, peaky_llama, tmp_path):
    """fp32, CPU. postlab's stage (the pairs unpaired, each item with its partner's completion, the reference
    pass, one forward of the loop) against TRL's ``KTOTrainer._compute_loss`` on the same items with the partner's
    completion as TRL's ``KL_completion_ids``: TRL runs the policy, reference and KL forwards itself. Equal loss,
    KL baseline, reward metrics and gradients, where the batches coincide (here: all ten items)."""
    from postlab.forward import batch_loss
    from postlab.models import load_lm
    from trl_harness import fused_model, trl_kto_model

    lm = load_lm(str(peaky_llama), device="cpu", precision="fp32")
    plan = kto_plan(lm, tmp_path, **options)  # the reference: the model as the stage starts
    assert len(plan.items) == 2 * len(PAIRS)
    raise_completions(lm, plan.items)  # the policy some steps later: every completion likelier, so z > 0
    loss, m, _ = batch_loss(lm, plan, list(range(len(plan.items))))
    loss.backward()
    policy = fused_model(peaky_llama)
    policy.load_state_dict(lm.model.state_dict())
    ref_loss, ref_m = trl_kto_model(policy, fused_model(peaky_llama), plan.items, lm.tokenizer.pad_token_id,
                                    **options)
    ref_loss.backward()
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for ours_key, trl_key in TRL_METRIC.items():
        assert m[ours_key].item() == pytest.approx(ref_m[trl_key], rel=1e-4, abs=1e-5), ours_key
    if options.get("loss_type") != "apo_zero_unpaired":
        assert m["kl"] > 0  # the comparison sees the baseline
    grads = dict(policy.named_parameters())
    for n, p in lm.model.named_parameters():  # to fp32 round-off relative to each gradient's scale
        assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-5 * float(grads[n].grad.abs().max()))


def test_the_kl_baseline_is_the_policy_against_its_reference_on_mismatched_pairs(peaky_llama, tmp_path):
    """At the stage's start the policy is its reference, so z = 0 (and every loss 1 − σ(0)); once the policy
    moves, z is the batch mean of log π(y'|x) − log πref(y'|x) over the items' partners, clamped at 0."""
    from postlab.forward import batch_loss
    from postlab.models import load_lm

    lm = load_lm(str(peaky_llama), device="cpu", precision="fp32")
    plan = kto_plan(lm, tmp_path)
    idx = list(range(len(plan.items)))
    with torch.no_grad():
        loss, m, _ = batch_loss(lm, plan, idx)
        assert m["kl"].item() == 0.0 and loss.item() == pytest.approx(0.5)
    nudge(lm.model)  # a policy that finds the partners' completions less likely after their prompts: z clamped
    with torch.no_grad():
        mis = [type(it)(it.prompt, it.completions[1:], it.id) for it in plan.items]
        logps, mask = score(lm, score_batch(mis, lm.tokenizer.pad_token_id))
        ref = torch.stack([r[1].sum() for r in plan.inputs.reference])
        expected = ((logps * mask).sum(-1) - ref).mean().clamp(min=0)
        assert batch_loss(lm, plan, idx)[1]["kl"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_each_item_carries_a_partner_with_another_prompt_fixed_at_stage_start(tiny_llama, tmp_path):
    from postlab.models import load_lm
    from postlab.preferences import with_mismatched

    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items = kto_plan(lm, tmp_path).items
    own = [it.completions[0] for it in items]
    assert [it.label for it in items] == [True, False] * len(PAIRS)
    for it in items:
        assert len(it.completions) == 2 and it.completions[1] in own
        partner = next(o for o in items if o.completions[0] == it.completions[1])
        assert partner.prompt != it.prompt  # a mismatched pair: another example's completion
    # a rotation: every completion is one item's partner, once (prompts here differ but for a pair's two halves)
    assert sorted(map(tuple, (it.completions[1] for it in items))) == sorted(map(tuple, own))
    singles = [type(it)(it.prompt, it.completions[:1], it.id, it.label) for it in items]
    assert with_mismatched(singles, 512) == items  # the same partners every time (and for every run seed)
    apo = kto_plan(lm, tmp_path / "apo", loss_type="apo_zero_unpaired").items
    assert all(len(it.completions) == 1 for it in apo)  # no baseline, no partner


def test_a_partner_is_cut_to_fit_the_prompt():
    from postlab.data import Tokenized
    from postlab.preferences import with_mismatched

    items = [Tokenized([1] * 6, [[7, 8]], "a", True), Tokenized([2], [[9] * 9], "b", False)]
    got = with_mismatched(items, max_length=10)
    assert got[0].completions == [[7, 8], [9] * 4] and got[1].completions == [[9] * 9, [7, 8]]


def test_sonnets_kto_items_are_their_sampled_pairs_unpaired(tiny_llama, data_dir, tmp_path, monkeypatch):
    """Sonnets have no undesirable answers of their own: a KTO stage samples them as a DPO stage does
    (task.pairs), then unpairs the pairs: the true continuation desirable, the sample not."""
    from postlab.config import ModelConfig, StageConfig
    from postlab.models import load_lm
    from postlab.stage import stage_items

    d = data_dir / "sonnets"
    task = {"name": "sonnets", "train": str(d / "sonnets.txt"), "dev": str(d / "sonnets_held_out_dev.txt"),
            "dev_reference": str(d / "TRUE_sonnets_held_out_dev.txt"), "train_limit": 3,
            "pairs": {"rejected_from": "base", "generation": {"max_new_tokens": 6, "batch_size": 4}}}
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    _, items = stage_items(lm, StageConfig(task=task, objective={"name": "kto"}),
                           ModelConfig(name=str(tiny_llama), device="cpu", precision="fp32"))
    assert len(items) == 6 and [it.label for it in items] == [True, False] * 3
    assert [it.id for it in items[:2]] == ["1/s0/chosen", "1/s0/rejected"]
    assert all(len(it.completions) == 2 for it in items)


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


def test_the_planner_counts_two_items_per_pair_and_the_partners_tokens(tmp_path, tiny_llama):
    """`postlab study plan`: a KTO stage trains on each pair's two completions, each scored with its partner's
    completion when the loss has a KL baseline (twice a DPO stage's items, the same tokens per item)."""
    import postlab.study as st
    from helpers import write_records, write_study
    from postlab.study.estimate import estimate

    data = write_records(tmp_path / "pairs.jsonl", [{"prompt": f"Question {i}?", "chosen": " yes indeed" * 5,
                                                     "rejected": " no" * 9} for i in range(16)])
    task = {"name": "file", "train": str(data)}
    objectives = {"dpo": {"name": "dpo"}, "kto": {"name": "kto"}, "apo": {"name": "kto", "loss_type": "apo_zero_unpaired"}}
    tree = {"name": "est", "base": {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"},
                                    "optim": {"batch_size": 4}, "task": task},
            "axes": {"objective": {k: {"stages": [{"name": k, "objective": v}]} for k, v in objectives.items()}}}
    runs = st.plan(st.load_study(write_study(tmp_path / "est.yaml", tree)))
    by = {e.run.run_id.split("=")[1]: e.stages[0] for e in estimate(runs)[0]}
    assert by["kto"].examples == 2 * by["dpo"].examples == 32
    assert by["kto"].train_tokens == pytest.approx(2 * by["dpo"].train_tokens)
    assert by["apo"].examples == 32 and by["apo"].train_tokens < by["kto"].train_tokens
