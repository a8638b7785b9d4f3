"""Preference objectives vs TRL's own loss code: equal losses, gradients and reward metrics on identical inputs.

TRL (1.16) references:
  * trl/trainer/dpo_trainer.py ``DPOTrainer._compute_loss``: sigmoid, ipo, hinge, robust, and RPO as
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, alpha]`` (TRL 1.16 dropped ``rpo_alpha``).
    Called for real on an ``object.__new__`` trainer with a stub model whose output carries our per-token log-probs.
  * trl/experimental/cpo/cpo_trainer.py ``CPOTrainer.cpo_loss``: "simpo" on length-averaged log-probs, and
    "sigmoid" with label smoothing fed with log-ratios (= cDPO; TRL 1.16's DPO sigmoid has no label smoothing).
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from postlab.errors import ConfigError
from postlab.objectives import PairLogps, TokenLogps, get_objective, parse_args

pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402

CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"]
TRL_NAME = {"rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}


def make_pair(b: int = 8, t: int = 7, seed: int = 0, gap: float = 0.0) -> PairLogps:
    """Random per-token log-probs; varying lengths; junk (not zero) in padded positions; chosen shifted by ``gap``."""
    g = torch.Generator().manual_seed(seed)

    def side(shift: float) -> TokenLogps:
        lens = torch.randint(1, t + 1, (b,), generator=g)
        lens[0] = t
        mask = torch.arange(t) < lens[:, None]
        policy = (-3 * torch.rand(b, t, generator=g, dtype=torch.float64) + shift).requires_grad_()
        return TokenLogps(policy, mask, reference=-3 * torch.rand(b, t, generator=g, dtype=torch.float64))

    return PairLogps(side(gap), side(0.0))


def ours(name: str, x: PairLogps, **raw):
    spec = get_objective(name)
    return spec.fn(x, parse_args(spec, raw))


def grads(loss: torch.Tensor, x: PairLogps):
    return torch.autograd.grad(loss, [x.chosen.policy, x.rejected.policy])


class StubModel:
    """Stands in for the policy: DPOTrainer reads ``outputs.log_probs`` (0 where labels are -100) and logging fields."""

    training = True

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        z = torch.zeros_like(self.log_probs).detach()
        return SimpleNamespace(log_probs=self.log_probs, entropy=z, mean_logits=z, is_top1=z.bool())


def trl_dpo(x: PairLogps, loss_types: list[str], beta: float, label_smoothing: float = 0.0, loss_weights=None):
    """Run TRL's ``DPOTrainer._compute_loss`` on precomputed reference log-probs; return (loss, last metrics)."""
    c, r = x.chosen, x.rejected
    model = StubModel(torch.cat([c.policy * c.mask, r.policy * r.mask]))
    mask = torch.cat([c.mask, r.mask]).long()
    completion_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)  # one prompt token; TRL shifts by one
    tr = object.__new__(DPOTrainer)
    vars(tr).update(
        model=model, accelerator=CPU, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": c.sum("reference"), "ref_rejected_logps": r.sum("reference"),
    }
    loss = tr._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


def trl_cpo(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float = 0.0,
            simpo_gamma: float = 0.5):
    """TRL's ``CPOTrainer.cpo_loss`` (alpha=0, i.e. plain log-prob rewards); returns (mean loss, rewards c, r)."""
    tr = object.__new__(CPOTrainer)
    vars(tr).update(accelerator=CPU, alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                    simpo_gamma=simpo_gamma)
    losses, rc, rr = tr.cpo_loss(chosen, rejected)
    return losses.mean(), rc, rr


DPO_CASES = [  # (our name, our args, TRL loss types, TRL kwargs)
    ("dpo", {"beta": 0.1}, ["sigmoid"], {"beta": 0.1}),
    ("dpo", {"beta": 0.7}, ["sigmoid"], {"beta": 0.7}),
    ("ipo", {"beta": 0.1}, ["ipo"], {"beta": 0.1}),
    ("ipo", {"beta": 0.8}, ["ipo"], {"beta": 0.8}),
    ("hinge", {"beta": 0.5}, ["hinge"], {"beta": 0.5}),
    ("robust", {"beta": 0.3, "label_smoothing": 0.2}, ["robust"], {"beta": 0.3, "label_smoothing": 0.2}),
    ("rpo", {"beta": 0.2, "alpha": 0.7}, ["sigmoid", "sft"], {"beta": 0.2, "loss_weights": [1.0, 0.7]}),
]


@pytest.mark.parametrize("name,args,loss_types,kw", DPO_CASES, ids=lambda v: str(v) if isinstance(v, str) else None)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_dpo_trainer(name, args, loss_types, kw, seed):
    x = make_pair(seed=seed)
    loss, metrics = ours(name, x, **args)
    ref_loss, ref_metrics = trl_dpo(x, loss_types, **kw)
    assert_close(loss, ref_loss)
    for g, ref_g in zip(grads(loss, x), grads(ref_loss, x)):
        assert_close(g, ref_g)
    for k in METRICS:
        assert metrics[k].item() == pytest.approx(ref_metrics[TRL_NAME.get(k, k)], rel=1e-6, abs=1e-9), k


def test_hinge_case_has_active_and_inactive_pairs():
    """Guard for the hinge comparison above: both sides of the kink occur, so gradients are really compared."""
    for seed in (0, 1):
        x = make_pair(seed=seed)
        h = (x.chosen.sum() - x.chosen.sum("reference")) - (x.rejected.sum() - x.rejected.sum("reference"))
        assert ((0.5 * h) < 1).any() and ((0.5 * h) > 1).any()


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (0.5, 0.3), (0.2, 0.0)])
def test_cdpo_matches_trl_label_smoothed_sigmoid(beta, eps):
    x = make_pair(seed=3)
    loss, m = ours("cdpo", x, beta=beta, label_smoothing=eps)
    c, r = x.chosen, x.rejected
    ref_loss, rc, rr = trl_cpo(c.sum() - c.sum("reference"), r.sum() - r.sum("reference"), "sigmoid", beta, eps)
    assert_close(loss, ref_loss)
    for g, ref_g in zip(grads(loss, x), grads(ref_loss, x)):
        assert_close(g, ref_g)
    assert_close(m["rewards/chosen"], rc.mean())
    assert_close(m["rewards/rejected"], rr.mean())
    if eps == 0.0:
        assert_close(loss, ours("dpo", x, beta=beta)[0])


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (1.0, 1.4, 0.0), (2.5, 0.3, 0.15)])
def test_simpo_matches_trl_cpo(beta, gamma, eps):
    x = make_pair(seed=4)
    loss, m = ours("simpo", x, beta=beta, gamma=gamma, label_smoothing=eps)
    ref_loss, rc, rr = trl_cpo(x.chosen.mean(), x.rejected.mean(), "simpo", beta, eps, simpo_gamma=gamma)
    assert_close(loss, ref_loss)
    for g, ref_g in zip(grads(loss, x), grads(ref_loss, x)):
        assert_close(g, ref_g)
    assert_close(m["rewards/chosen"], rc.mean())
    assert_close(m["rewards/rejected"], rr.mean())
    assert_close(m["rewards/accuracy"], (rc > rr).float().mean())
    assert_close(m["logps/chosen"], x.chosen.mean().detach().mean())


def test_simpo_ignores_reference():
    x = make_pair(seed=5)
    y = PairLogps(TokenLogps(x.chosen.policy, x.chosen.mask), TokenLogps(x.rejected.policy, x.rejected.mask))
    assert_close(ours("simpo", x)[0], ours("simpo", y)[0])


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_rpo_is_dpo_plus_alpha_nll(alpha):
    x = make_pair(seed=6)
    c = x.chosen
    nll = -(c.policy * c.mask).sum() / c.mask.sum()  # mean over all chosen completion tokens
    loss, m = ours("rpo", x, beta=0.1, alpha=alpha)
    assert_close(loss, ours("dpo", x, beta=0.1)[0] + alpha * nll)
    assert_close(m["nll"], nll.detach())


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "cdpo", "robust", "simpo", "rpo"])
def test_metrics(name):
    good = make_pair(seed=7, gap=5.0)  # chosen policy log-probs far above rejected ones
    loss, m = ours(name, good)
    assert loss.dim() == 0 and torch.isfinite(loss)
    for k in METRICS:
        assert m[k].dim() == 0 and not m[k].requires_grad, k
    assert m["rewards/accuracy"].item() == 1.0
    assert m["rewards/margin"] > 0
    assert_close(m["rewards/margin"], m["rewards/chosen"] - m["rewards/rejected"])
    bad = PairLogps(good.rejected, good.chosen)
    assert ours(name, bad)[1]["rewards/accuracy"].item() == 0.0


def test_reward_values_by_hand():
    mask = torch.tensor([[True, True, False]])
    c = TokenLogps(torch.tensor([[-1.0, -1.0, -9.0]]), mask, reference=torch.tensor([[-2.0, -2.0, -9.0]]))
    r = TokenLogps(torch.tensor([[-3.0, -3.0, -9.0]]), mask, reference=torch.tensor([[-2.0, -2.0, -9.0]]))
    loss, m = ours("dpo", PairLogps(c, r), beta=0.5)  # h = 2 - (-2) = 4, beta*h = 2
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-1.0)
    assert m["logps/chosen"].item() == pytest.approx(-2.0)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(2.0)).item())


def test_registry_flags_and_defaults():
    for name in ["dpo", "ipo", "hinge", "cdpo", "robust", "rpo"]:
        spec = get_objective(name)
        assert spec.kind == "preference" and spec.needs_reference and spec.doc
    assert not get_objective("simpo").needs_reference
    a = parse_args(get_objective("simpo"), {})
    assert (a.beta, a.gamma, a.label_smoothing) == (2.0, 0.5, 0.0)
    assert parse_args(get_objective("cdpo"), {}).label_smoothing == 0.1
    assert parse_args(get_objective("rpo"), {}).alpha == 1.0
    assert parse_args(get_objective("dpo"), {}).beta == 0.1


@pytest.mark.parametrize("name,raw,needle", [
    ("dpo", {"betta": 0.1}, "betta"),
    ("dpo", {"beta": -0.1}, "beta"),
    ("ipo", {"beta": 0.0}, "beta"),
    ("cdpo", {"label_smoothing": 0.5}, "label_smoothing"),
    ("robust", {"label_smoothing": -0.1}, "label_smoothing"),
    ("simpo", {"gamma": -1.0}, "gamma"),
    ("simpo", {"beta": -2.0}, "beta"),
    ("rpo", {"alpha": -1.0}, "alpha"),
    ("hinge", {"label_smoothing": 0.1}, "label_smoothing"),
])
def test_arg_validation(name, raw, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_args(get_objective(name), raw)
