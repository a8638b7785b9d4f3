"""Preference objectives vs TRL's own loss code: equal losses, gradients and reward metrics on identical inputs.

TRL (1.16) references:
  * trl/trainer/dpo_trainer.py ``DPOTrainer._compute_loss``: sigmoid, ipo, hinge, robust, and RPO as
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, alpha]`` (TRL 1.16 dropped ``rpo_alpha``).
    Called for real on an ``object.__new__`` trainer with a stub model whose output carries our per-token log-probs.
  * trl/experimental/cpo/cpo_trainer.py ``CPOTrainer.cpo_loss``: "simpo" on length-averaged log-probs, and
    "sigmoid" with label smoothing fed with log-ratios (= cDPO; TRL 1.16's DPO sigmoid has no label smoothing).
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from postlab.errors import ConfigError
from postlab.objectives import PairLogps, TokenLogps, get_objective, parse_args

pytest.importorskip("trl")
from trl_harness import METRICS, TRL_NAME, grads, make_pair, ours, trl_cpo, trl_dpo  # noqa: E402

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
