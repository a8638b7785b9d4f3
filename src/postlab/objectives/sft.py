"""Supervised objectives over completion tokens (see docs/objectives.md for the derivations).

All are token-level means over the batch's completion tokens, like ``nll``:
  * ``nll``   −log π(y_t)
  * ``dft``   −sg(π(y_t))·log π(y_t)                       (Dynamic Fine-Tuning; sg = stop-gradient)
  * ``asft``  dft + λ·KL(π‖πref) at each position           (Anchored SFT; KL over the reference's top-k + tail)
  * ``chi2``  −r_t + r_t²/(4α),  r_t = β(log π(y_t) − log πref(y_t))      (Pearson χ² penalty)
  * ``klsft`` −r_t + α(e^{r_t/α} − 1 − r_t/α)                              (KL penalty, via e^{t−1})
"""
from __future__ import annotations

from pydantic import Field

from ..lazy import torch
from .base import ObjectiveArgs, TokenLogps, implicit_reward, register
from .divergence import bucket_kl, masked_mean, with_tail

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


@register("nll", kind="sft")
def nll(x: TokenLogps, args: ObjectiveArgs) -> Out:
    """Mean negative log-likelihood over all completion tokens in the batch."""
    n = x.mask.sum().clamp(min=1)
    loss = -(x.policy * x.mask).sum() / n
    return loss, {"nll": loss.detach()}


def _dft(x: TokenLogps) -> Out:
    loss = masked_mean(-x.policy.detach().exp() * x.policy, x.mask)
    return loss, {"dft": loss.detach(), "nll": masked_mean(-x.policy, x.mask).detach()}


@register("dft", kind="sft")
def dft(x: TokenLogps, args: ObjectiveArgs) -> Out:
    """Dynamic Fine-Tuning: each token's NLL weighted by its detached probability, so the gradient of a
    token is π(y_t)·∇log π(y_t) = ∇π(y_t): tokens the model finds unlikely stop dominating the update."""
    return _dft(x)


class ASFTArgs(ObjectiveArgs):
    lam: float = Field(0.05, ge=0, description="λ: weight of the per-token KL(π‖πref) anchor")
    topk: int = Field(64, ge=1, description="k: reference tokens cached per position; the rest is one tail bucket")


@register("asft", args=ASFTArgs, kind="sft", topk_of="reference")
def asft(x: TokenLogps, args: ASFTArgs) -> Out:
    """Anchored SFT: ``dft`` plus λ·KL(π‖πref) at every completion position, the KL taken over the
    reference's top-k tokens plus one tail bucket (a lower bound of the full KL; see divergence.py)."""
    loss, m = _dft(x)
    target = with_tail(x.topk_target)
    kl = masked_mean(bucket_kl(with_tail(x.topk_policy), target), x.mask)
    m.update({"kl_ref": kl.detach(),
              "tail_mass": masked_mean(target[..., -1].exp(), x.mask).detach()})
    return loss + args.lam * kl, m


class Chi2Args(ObjectiveArgs):
    beta: float = Field(1.0, gt=0, description="β of the per-token implicit reward r_t = β(log π − log πref)")
    alpha: float = Field(1.0, gt=0, description="α: penalty scale; α→∞ gives β·NLL, small α keeps π near πref")


def _implicit_rewards(x: TokenLogps, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r = implicit_reward(x.policy, x.reference, beta)
    return r, {"reward": masked_mean(r, x.mask).detach(), "nll": masked_mean(-x.policy, x.mask).detach()}


@register("chi2", args=Chi2Args, kind="sft", needs_reference=True)
def chi2(x: TokenLogps, args: Chi2Args) -> Out:
    """KL-preserving SFT, Pearson χ²: per token −r_t + r_t²/(4α). Each token's optimum is r_t = 2α
    (π(y_t) = e^{2α/β}·πref(y_t)); beyond it the gradient pulls π back toward πref."""
    r, m = _implicit_rewards(x, args.beta)
    return masked_mean(-r + r.square() / (4 * args.alpha), x.mask), m


@register("klsft", args=Chi2Args, kind="sft", needs_reference=True)
def klsft(x: TokenLogps, args: Chi2Args) -> Out:
    """KL-preserving SFT from the KL divergence's convex conjugate f*(t) = e^{t−1}: per token
    −r_t + α(e^{r_t/α} − 1 − r_t/α). Optimum at r_t = α·ln 2; near r = 0 the penalty is r²/(2α) (twice
    χ²'s) and past the optimum it grows exponentially: a stronger anchor than ``chi2`` at equal α."""
    r, m = _implicit_rewards(x, args.beta)
    t = r / args.alpha
    return masked_mean(-r + args.alpha * (torch.expm1(t) - t), x.mask), m
