"""Pairwise preference objectives (the DPO family) over a :class:`PairLogps`.

Notation: logπ(y) is the sum of y's completion-token log-probs (``TokenLogps.sum``); the implicit reward is
r(y) = β·(logπ(y) − logπref(y)) and h = [logπ(c) − logπref(c)] − [logπ(r) − logπref(r)], so βh = r(c) − r(r).
σ is the logistic function. Losses are means over the batch. Every objective reports ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracy`` (fraction with r(c) > r(r)), ``rewards/margin`` (mean r(c) − r(r)),
``logps/chosen`` and ``logps/rejected`` (batch means). The formulas match TRL 1.16 (see
tests/test_preference_objectives.py, which compares losses and gradients with TRL's own code).
"""
from __future__ import annotations

from pydantic import Field

from ..lazy import F, torch
from .base import ObjectiveArgs, PairLogps, implicit_reward, register
from .sft import nll

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class DPOArgs(ObjectiveArgs):
    beta: float = Field(0.1, gt=0, description="β: inverse temperature of the implicit reward β·log(π/πref)")


class IPOArgs(DPOArgs):
    """β is the IPO paper's τ: the loss pulls the length-averaged margin h towards 1/(2β)."""


class HingeArgs(DPOArgs):
    """β scales the margin; the loss is zero once βh ≥ 1."""


class CDPOArgs(DPOArgs):
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="ε: assumed probability that a label is flipped")


class RobustArgs(CDPOArgs):
    """Same knobs as cDPO; ε < 0.5 because the loss divides by 1 − 2ε."""


class SimPOArgs(ObjectiveArgs):
    """SimPO: reward β·logπ(y)/|y| and target margin γ.

    ``gamma`` is the absolute margin in reward units, i.e. TRL's ``CPOConfig.simpo_gamma`` (TRL computes
    logits = Δ − simpo_gamma/β and loss = −logσ(β·logits), which is −logσ(βΔ − γ)). The SimPO reference code
    instead takes ``gamma_beta_ratio`` = γ/β; with the defaults here (β=2, γ=0.5) that ratio is 0.25.
    """

    beta: float = Field(2.0, gt=0, description="β: scale of the length-normalized reward β·logπ(y)/|y|")
    gamma: float = Field(0.5, ge=0, description="γ: target reward margin (TRL's simpo_gamma; = β·gamma_beta_ratio)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: label smoothing, as in cDPO")


class RPOArgs(DPOArgs):
    """``alpha`` weighs the NLL of the chosen completions. TRL 1.16 has no ``rpo_alpha`` any more: RPO is
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, alpha]``, whose "sft" term is the mean NLL over all
    chosen completion tokens of the batch (token-level, not per-sequence) -- exactly postlab's ``nll``."""

    alpha: float = Field(1.0, ge=0, description="α: weight of the chosen-completion NLL added to the DPO loss")


def _rewards(x: PairLogps, beta: float, ref: bool = True, avg: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards r(c), r(r) = β·(logπ − logπref) (β·logπ without ``ref``; per-token means with ``avg``) -> [batch] each,
    with gradients, plus the detached reward/log-prob metrics shared by every objective."""
    seq = "mean" if avg else "sum"
    pc, pr = getattr(x.chosen, seq)("policy"), getattr(x.rejected, seq)("policy")
    c = implicit_reward(pc, getattr(x.chosen, seq)("reference"), beta) if ref else beta * pc
    r = implicit_reward(pr, getattr(x.rejected, seq)("reference"), beta) if ref else beta * pr
    m = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracy": (c > r).float().mean(),
         "rewards/margin": (c - r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    return c, r, {k: v.detach() for k, v in m.items()}


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z), batch mean."""
    return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()


@register("dpo", args=DPOArgs, kind="preference", needs_reference=True)
def dpo(x: PairLogps, a: DPOArgs) -> Out:
    """DPO (sigmoid): loss = −logσ(βh)."""
    c, r, m = _rewards(x, a.beta)
    return _smoothed(c - r, 0.0), m


@register("ipo", args=IPOArgs, kind="preference", needs_reference=True)
def ipo(x: PairLogps, a: IPOArgs) -> Out:
    """IPO: loss = (h − 1/(2β))², h on length-averaged log-ratios (as TRL); metrics use the summed rewards."""
    _, _, m = _rewards(x, a.beta)
    c, r, _ = _rewards(x, 1.0, avg=True)  # per-token log-ratios
    return ((c - r - 1 / (2 * a.beta)) ** 2).mean(), m


@register("hinge", args=HingeArgs, kind="preference", needs_reference=True)
def hinge(x: PairLogps, a: HingeArgs) -> Out:
    """Hinge (SLiC): loss = relu(1 − βh)."""
    c, r, m = _rewards(x, a.beta)
    return torch.relu(1 - (c - r)).mean(), m


@register("cdpo", args=CDPOArgs, kind="preference", needs_reference=True)
def cdpo(x: PairLogps, a: CDPOArgs) -> Out:
    """Conservative DPO (label smoothing ε): loss = −(1−ε)·logσ(βh) − ε·logσ(−βh)."""
    c, r, m = _rewards(x, a.beta)
    return _smoothed(c - r, a.label_smoothing), m


@register("robust", args=RobustArgs, kind="preference", needs_reference=True)
def robust(x: PairLogps, a: RobustArgs) -> Out:
    """Robust DPO (unbiased under label-flip rate ε): loss = (−(1−ε)·logσ(βh) + ε·logσ(−βh)) / (1 − 2ε)."""
    c, r, m = _rewards(x, a.beta)
    eps, z = a.label_smoothing, c - r
    return ((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)).mean(), m


@register("simpo", args=SimPOArgs, kind="preference")
def simpo(x: PairLogps, a: SimPOArgs) -> Out:
    """SimPO (reference-free): with Δ = logπ(c)/|c| − logπ(r)/|r|, loss = −(1−ε)·logσ(βΔ − γ) − ε·logσ(γ − βΔ).
    Rewards are β·logπ(y)/|y| and ``logps/*`` are per-token means."""
    c, r, m = _rewards(x, a.beta, ref=False, avg=True)
    return _smoothed(c - r - a.gamma, a.label_smoothing), m


@register("rpo", args=RPOArgs, kind="preference", needs_reference=True)
def rpo(x: PairLogps, a: RPOArgs) -> Out:
    """RPO: loss = −logσ(βh) + α·NLL(chosen), NLL = mean over all chosen completion tokens in the batch."""
    loss, m = dpo(x, a)
    n, _ = nll(x.chosen, a)
    return loss + a.alpha * n, {**m, "nll": n.detach()}
