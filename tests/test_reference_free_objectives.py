"""ORPO and CPO (with its SimPO and AlphaPO forms) vs TRL 1.16's ``trl.experimental`` trainers:
``ORPOTrainer.odds_ratio_loss`` and ``CPOTrainer.cpo_loss`` called on the same sequence log-probs, the SFT
term being postlab's ``nll`` of the chosen answers (CPO's equals TRL's: the mean NLL of the chosen completion
tokens; ORPO's differs from TRL's, which also counts the prompt tokens); plus the properties TRL cannot check."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from postlab.errors import ConfigError
from postlab.objectives import PairLogps, TokenLogps, get_objective, parse_args

pytest.importorskip("trl")
from trl_harness import grads, make_pair, ours, trl_cpo, trl_orpo  # noqa: E402


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_matches_trl_odds_ratio_plus_chosen_nll(beta, seed):
    x = make_pair(seed=seed, dtype=torch.float32)  # log-probs < 0; TRL computes the odds ratio in float32
    loss, m = ours("orpo", x, beta=beta)
    losses, rc, rr, log_odds_ratio, log_odds_chosen = trl_orpo(x.chosen.mean(), x.rejected.mean(), beta)
    expected = ours("nll", x.chosen)[0] - losses.mean()  # TRL: policy_nll_loss - losses.mean()
    assert_close(loss, expected)
    for g, ref_g in zip(grads(loss, x), grads(expected, x)):
        assert_close(g, ref_g)
    assert_close(m["rewards/chosen"], rc.mean())
    assert_close(m["rewards/rejected"], rr.mean())
    assert_close(m["rewards/accuracy"], (rc > rr).float().mean())
    assert_close(m["log_odds_ratio"], log_odds_ratio.detach())
    assert_close(m["log_odds_chosen"], log_odds_chosen.detach())


def test_orpo_stays_finite_when_the_model_is_certain():
    """p = 1 in floating point (log p = 0) would give log(1 − p) = −∞ and NaN gradients; the cap keeps both finite."""
    mask = torch.tensor([[True, True]])
    c = TokenLogps(torch.zeros(1, 2, requires_grad=True), mask)
    r = TokenLogps(torch.full((1, 2), -2.0, requires_grad=True), mask)
    loss, _ = ours("orpo", PairLogps(c, r))
    g = torch.autograd.grad(loss, [c.policy, r.policy])
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in g)


def test_orpo_is_nll_when_the_odds_ratio_is_decided():
    """A chosen answer far likelier than the rejected one: logσ(log odds ratio) → 0, so ORPO → NLL(chosen)."""
    x = make_pair(seed=2, gap=0.0)
    x.rejected.policy = x.rejected.policy.detach() - 40
    assert_close(ours("orpo", x)[0], ours("nll", x.chosen)[0], atol=1e-9, rtol=0)


CPO_CASES = [  # (postlab options, TRL loss_type, TRL options): TRL averages the log-probs for ipo and simpo
    ({"loss_type": "sigmoid"}, "sigmoid", {}),
    ({"loss_type": "sigmoid", "label_smoothing": 0.2}, "sigmoid", {"label_smoothing": 0.2}),
    ({"loss_type": "hinge"}, "hinge", {}),
    ({"loss_type": "ipo"}, "ipo", {}),
    ({"loss_type": "simpo", "simpo_gamma": 0.7}, "simpo", {"simpo_gamma": 0.7}),
    ({"loss_type": "simpo", "label_smoothing": 0.1, "cpo_alpha": 0.3}, "simpo", {"label_smoothing": 0.1}),
    ({"loss_type": "sigmoid", "alpha": 0.25}, "sigmoid", {"alpha": 0.25}),  # AlphaPO rewards on CPO
    # TRL's CPOConfig turns loss_type "alphapo" into "simpo" with cpo_alpha 0
    ({"loss_type": "alphapo", "alpha": 0.25}, "simpo", {"alpha": 0.25}),
    ({"loss_type": "alphapo", "alpha": -0.5, "simpo_gamma": 0.2}, "simpo", {"alpha": -0.5, "simpo_gamma": 0.2}),
]


@pytest.mark.parametrize("options,loss_type,trl_options", CPO_CASES,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_cpo_matches_trl_cpo_loss_plus_cpo_alpha_nll(options, loss_type, trl_options, beta):
    x = make_pair(seed=3)
    loss, m = ours("cpo", x, beta=beta, **options)
    mean = loss_type in ("ipo", "simpo")
    sc, sr = (x.chosen.mean(), x.rejected.mean()) if mean else (x.chosen.sum(), x.rejected.sum())
    trl_loss, rc, rr = trl_cpo(sc, sr, loss_type, beta, **trl_options)
    nll_weight = options.get("cpo_alpha", 0.0 if options["loss_type"] == "alphapo" else 1.0)
    expected = trl_loss + nll_weight * ours("nll", x.chosen)[0]  # TRL: losses.mean() + cpo_alpha * nll_loss
    assert_close(loss, expected)
    for g, ref_g in zip(grads(loss, x), grads(expected, x)):
        assert_close(g, ref_g)
    assert_close(m["rewards/chosen"], rc.mean())
    assert_close(m["rewards/rejected"], rr.mean())
    assert_close(m["logps/chosen"], sc.detach().mean())


def test_cpo_simpo_without_nll_is_simpo():
    x = make_pair(seed=4)
    for beta, gamma, eps in [(2.0, 0.5, 0.0), (1.0, 1.2, 0.1)]:
        cpo, _ = ours("cpo", x, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps, cpo_alpha=0)
        assert_close(cpo, ours("simpo", x, beta=beta, gamma=gamma, label_smoothing=eps)[0])


def test_alphapo_rewards_tend_to_log_probs_as_alpha_goes_to_zero():
    """(1 − p^(−α))/α → log p as α → 0, so AlphaPO → SimPO."""
    x = make_pair(seed=5)
    small, _ = ours("cpo", x, loss_type="alphapo", alpha=1e-7)
    assert_close(small, ours("cpo", x, loss_type="alphapo")[0], rtol=1e-5, atol=1e-6)


def test_reference_free_and_defaults():
    for name in ("orpo", "cpo"):
        spec = get_objective(name)
        assert spec.kind == "preference" and not spec.needs_reference and spec.doc
    assert parse_args(get_objective("orpo"), {}).beta == 0.1
    a = parse_args(get_objective("cpo"), {})
    assert (a.beta, a.loss_type, a.nll_weight, a.simpo_gamma, a.alpha) == (0.1, "sigmoid", 1.0, 0.5, 0.0)
    assert parse_args(get_objective("cpo"), {"loss_type": "alphapo"}).nll_weight == 0.0


@pytest.mark.parametrize("name,raw,needle", [
    ("orpo", {"beta": 0}, "beta"),
    ("cpo", {"loss_type": "kto_pair"}, "loss_type"),
    ("cpo", {"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing does not apply"),
    ("cpo", {"loss_type": "alphapo", "cpo_alpha": 1.0}, "without the NLL"),
    ("cpo", {"cpo_alpha": -1}, "cpo_alpha"),
])
def test_arg_validation(name, raw, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_args(get_objective(name), raw)
