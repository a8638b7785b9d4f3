"""Reference-free preference objectives with an SFT term on the chosen answers: ORPO and CPO (with its
SimPO and AlphaPO forms), as TRL 1.16's ``trl.experimental`` trainers compute them. Notation: mc, mr are the
per-token mean log-probs of chosen and rejected, sc, sr their sums; NLL is the mean NLL over all chosen
completion tokens of the batch (postlab's ``nll`` on the chosen answers).

  * ``orpo``  NLL − λ·logσ(log odds(c) − log odds(r)), odds(y) = p/(1−p) with p = e^{m_y}   (arXiv 2403.07691)
  * ``cpo``   L_pref + cpo_alpha·NLL, L_pref over β-scaled sequence log-probs: sigmoid (CPO, arXiv 2401.08417),
              hinge, ipo, simpo (−logσ(βΔ − γ) on mean log-probs) or alphapo (SimPO on AlphaPO's rewards
              (1 − p^{−α})/α, arXiv 2501.03884, without the NLL)

TRL's ORPO takes its NLL over prompt and answer tokens; postlab's over the answer tokens only (the ORPO
paper's L_SFT); the odds-ratio term is TRL's to the formula (tests/test_reference_free_objectives.py).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..lazy import F, torch
from .base import ObjectiveArgs, PairLogps, register
from .preference import reward_metrics, smoothed
from .sft import nll

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class ORPOArgs(ObjectiveArgs):
    beta: float = Field(0.1, gt=0, description="λ: weight of the odds-ratio term (TRL's ORPOConfig.beta)")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, each side of −ln 2 by the form that keeps its precision. x is capped just
    below 0: a completion the model is certain of (p = 1 in floating point) gives a large finite log-odds
    instead of an infinite one with NaN gradients."""
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("orpo", args=ORPOArgs, kind="preference")
def orpo(x: PairLogps, a: ORPOArgs) -> Out:
    """ORPO: NLL(chosen) − λ·logσ(log odds(c) − log odds(r)), log odds(y) = m_y − log(1 − e^{m_y}) on the
    per-token mean log-probs m_y. Rewards are λ·m_y, as TRL logs them."""
    mc, mr = x.chosen.mean(), x.rejected.mean()
    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    ratio = F.logsigmoid(log_odds)
    n, _ = nll(x.chosen, a)
    m = reward_metrics(a.beta * mc, a.beta * mr, mc, mr)
    m.update(nll=n.detach(), log_odds_ratio=ratio.mean().detach(), log_odds_chosen=log_odds.mean().detach())
    return n - a.beta * ratio.mean(), m


class CPOArgs(ObjectiveArgs):
    beta: float = Field(0.1, gt=0, description="β: scale of the sequence log-prob rewards")
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"] = Field(
        "sigmoid", description="sigmoid (CPO), hinge, ipo, simpo (mean log-probs, margin γ), alphapo (simpo on "
                               "AlphaPO rewards, no NLL)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: label smoothing (sigmoid, simpo, alphapo)")
    cpo_alpha: float | None = Field(None, ge=0, description="weight of the chosen answers' NLL (default 1; alphapo: 0)")
    simpo_gamma: float = Field(0.5, ge=0, description="γ: target reward margin (simpo, alphapo)")
    alpha: float = Field(0.0, description="AlphaPO's α: rewards (1 − p^(−α))/α instead of log p (0: log p)")

    @model_validator(mode="after")
    def _consistent(self) -> "CPOArgs":
        if self.label_smoothing and self.loss_type in ("hinge", "ipo"):
            raise ValueError(f"label_smoothing does not apply to loss_type {self.loss_type!r} (TRL ignores it)")
        if self.loss_type == "alphapo" and self.cpo_alpha:
            raise ValueError("loss_type alphapo is simpo without the NLL (cpo_alpha 0); for simpo plus NLL use "
                             "loss_type simpo with alpha")
        return self

    @property
    def nll_weight(self) -> float:
        return self.cpo_alpha if self.cpo_alpha is not None else (0.0 if self.loss_type == "alphapo" else 1.0)


@register("cpo", args=CPOArgs, kind="preference")
def cpo(x: PairLogps, a: CPOArgs) -> Out:
    """CPO: L_pref(sequence log-probs; summed, or per-token means for ipo/simpo/alphapo) + cpo_alpha·NLL(chosen),
    reference-free. With AlphaPO's α ≠ 0 the rewards are (1 − p^(−α))/α of those log-probs."""
    mean = a.loss_type in ("ipo", "simpo", "alphapo")
    pc, pr = (x.chosen.mean(), x.rejected.mean()) if mean else (x.chosen.sum(), x.rejected.sum())
    if a.alpha:
        c, r = -torch.expm1(-a.alpha * pc) / a.alpha, -torch.expm1(-a.alpha * pr) / a.alpha
    else:
        c, r = pc, pr
    logits = c - r
    if a.loss_type == "hinge":
        losses = torch.relu(1 - a.beta * logits)
    elif a.loss_type == "ipo":
        losses = (logits - 1 / (2 * a.beta)) ** 2
    else:
        shift = a.simpo_gamma if a.loss_type in ("simpo", "alphapo") else 0.0
        losses = smoothed(a.beta * logits - shift, a.label_smoothing)
    n, _ = nll(x.chosen, a)
    m = reward_metrics(a.beta * c, a.beta * r, pc, pr)
    m["nll"] = n.detach()
    return losses.mean() + a.nll_weight * n, m
