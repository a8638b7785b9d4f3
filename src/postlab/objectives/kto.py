"""KTO (arXiv 2402.01306) on unpaired data: completions labelled desirable or undesirable, as TRL 1.16's
``KTOTrainer`` computes it (``loss_type`` "kto" or "apo_zero_unpaired").

With ρ = logπ(y|x) − logπref(y|x) (summed over the completion) and the KL baseline
z = max(0, mean over the batch of [logπ(y'|x) − logπref(y'|x)]) taken over *mismatched* pairs (prompt x_i
with another example's completion y'; TRL uses y_{i−1}), detached:

    desirable:   λ_D·(1 − σ(β(ρ − z)))
    undesirable: λ_U·(1 − σ(β(z − ρ)))

and the loss is the mean over the batch. ``apo_zero_unpaired`` drops z: 1 − σ(βρ) and σ(βρ).
z is a batch statistic: in postlab the batch is one forward (TRL averages it over processes too).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from ..lazy import torch
from .base import ObjectiveArgs, ObjectiveSpec, UnpairedLogps, implicit_reward, register

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class KTOArgs(ObjectiveArgs):
    beta: float = Field(0.1, gt=0, description="β: scale of the implicit reward β·log(π/πref)")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D: weight of the desirable examples' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U: weight of the undesirable examples' losses")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto: with the KL baseline; apo_zero_unpaired: APO-zero per example, no baseline")


def kl_needs(spec: ObjectiveSpec, a: KTOArgs) -> ObjectiveSpec:
    """Only ``loss_type: kto`` needs the mismatched pairs of the KL baseline."""
    return replace(spec, needs_kl_baseline=a.loss_type == "kto")


def kl_baseline(x: UnpairedLogps) -> torch.Tensor:
    """z = max(0, mean_i[logπ(y'_i|x_i) − logπref(y'_i|x_i)]) over the mismatched pairs, detached."""
    if x.mismatched is None:
        raise ValueError("kto needs UnpairedLogps.mismatched (the KL baseline's mismatched pairs) from the stage")
    mis = x.mismatched
    return (mis.sum("policy") - mis.sum("reference")).mean().detach().clamp(min=0)


def _mean_over(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the examples `where` is True (0 when there are none: every batch logs the same keys)."""
    return (values * where).sum() / where.sum().clamp(min=1)


@register("kto", args=KTOArgs, kind="unpaired", needs_reference=True, needs_kl_baseline=True, resolve=kl_needs)
def kto(x: UnpairedLogps, a: KTOArgs) -> Out:
    """KTO: desirable λ_D·(1 − σ(β(ρ − z))), undesirable λ_U·(1 − σ(β(z − ρ))), z the KL baseline of
    mismatched pairs; batch mean. Logs ``kl`` (z) and rewards/log-probs of each label's examples."""
    y, good = x.completions, x.desirable.bool()
    logratio = y.sum("policy") - y.sum("reference")
    if a.loss_type == "kto":
        z = kl_baseline(x)
        desirable, undesirable = 1 - torch.sigmoid(a.beta * (logratio - z)), 1 - torch.sigmoid(a.beta * (z - logratio))
    else:
        z = torch.zeros((), dtype=logratio.dtype, device=logratio.device)
        desirable, undesirable = 1 - torch.sigmoid(a.beta * logratio), torch.sigmoid(a.beta * logratio)
    losses = torch.where(good, a.desirable_weight * desirable, a.undesirable_weight * undesirable)
    rewards, logps = implicit_reward(y.sum("policy"), y.sum("reference"), a.beta).detach(), y.sum("policy").detach()
    m = {"kl": z, "rewards/chosen": _mean_over(rewards, good), "rewards/rejected": _mean_over(rewards, ~good),
         "logps/chosen": _mean_over(logps, good), "logps/rejected": _mean_over(logps, ~good),
         "desirable_fraction": good.float().mean()}
    m["rewards/margin"] = m["rewards/chosen"] - m["rewards/rejected"]
    return losses.mean(), m
