"""Pairwise preference objectives (the DPO family) over a :class:`PairLogps`.

Notation: logπ(y) is the sum of y's completion-token log-probs (``TokenLogps.sum``); the implicit reward is
r(y) = β·(logπ(y) − logπref(y)) and h = [logπ(c) − logπref(c)] − [logπ(r) − logπref(r)], so βh = r(c) − r(r).
σ is the logistic function. Losses are means over the batch. Every objective reports ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracy`` (fraction with r(c) > r(r)), ``rewards/margin`` (mean r(c) − r(r)),
``logps/chosen`` and ``logps/rejected`` (batch means). The formulas match TRL 1.16 (see
tests/test_preference_objectives.py, which compares losses and gradients with TRL's own code).

Two options of every reference-based member (``DPOArgs``), as TRL's DPOTrainer applies them to every loss type:
  * ``ld_alpha`` (LD-DPO, arXiv 2409.06411): a sequence's log-prob counts its first min(|c|, |r|) completion
    tokens fully and the rest with weight α, for policy and reference alike (α = 1 is plain DPO).
  * ``wpo`` (WPO, arXiv 2406.11827): each pair's loss is weighted by w(c)·w(r), w(y) = exp(mean over y's tokens of
    log π(y_t) − log Σ_v π(v|s_t)²), without gradient. It needs log Σ_v π(v)² over the whole vocabulary at every
    position (``TokenLogps.log_sum_sq_probs``), which the scored tokens' log-probs cannot give: ``wpo: true``
    declares ``needs_log_sum_sq_probs``.
"""
from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from ..lazy import F, torch
from .base import ObjectiveArgs, ObjectiveSpec, PairLogps, TokenLogps, implicit_reward, register
from .sft import nll

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class DPOArgs(ObjectiveArgs):
    beta: float = Field(0.1, gt=0, description="β: inverse temperature of the implicit reward β·log(π/πref)")
    ld_alpha: float | None = Field(None, ge=0, le=1, description=(
        "LD-DPO's α: completion tokens past the shorter answer of the pair count with weight α (None or 1: plain)"))
    wpo: bool = Field(False, description=(
        "WPO: weight each pair by w(c)·w(r), w(y) = exp(mean_t log π(y_t) − log Σ_v π(v)²), log Σ_v π(v)² "
        "from the policy's own training forward"))


def wpo_needs(spec: ObjectiveSpec, a: DPOArgs) -> ObjectiveSpec:
    """``wpo: true`` needs the policy's log Σ_v π(v)² at every position (registered as ``resolve``)."""
    return replace(spec, needs_log_sum_sq_probs=True) if a.wpo else spec


def dpo_family(name: str, args: type[DPOArgs] = DPOArgs, needs_reference: bool = True):
    """``register`` for a member of the DPO family: preference kind, the ``wpo`` option's need resolved."""
    return register(name, args=args, kind="preference", needs_reference=needs_reference, resolve=wpo_needs)


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
    chosen completion tokens of the batch (token-level, not per-sequence) -- exactly postlab's ``nll``; the
    ``mix`` objective builds the same loss from its terms."""

    alpha: float = Field(1.0, ge=0, description="α: weight of the chosen-completion NLL added to the DPO loss")


def token_weights(x: PairLogps, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of chosen and rejected in their sequence log-probs: the mask, or with LD-DPO's α,
    1 on each completion's first min(|c|, |r|) tokens and α past them (0 at padding), as TRL's ``ld_alpha``."""
    if ld_alpha is None:
        return x.chosen.mask, x.rejected.mask
    shared = torch.minimum(x.chosen.n_tokens, x.rejected.n_tokens)[:, None]

    def weights(t: TokenLogps) -> torch.Tensor:
        position = t.mask.cumsum(-1)  # 1-based index of each completion token
        inside = torch.where(position <= shared, 1.0, ld_alpha).to(t.policy.dtype)
        return inside * t.mask

    return weights(x.chosen), weights(x.rejected)


def sequence_logps(x: PairLogps, ld_alpha: float | None = None, avg: bool = False, ref: bool = True):
    """Sequence log-probs (policy chosen, policy rejected, reference chosen, reference rejected) -> [batch]
    each; LD-DPO-weighted with ``ld_alpha``; divided by the completion lengths with ``avg`` (as TRL, the full
    lengths, also under LD-DPO); the reference pair is None without ``ref``."""
    wc, wr = token_weights(x, ld_alpha)
    nc, nr = (x.chosen.n_tokens.clamp(min=1), x.rejected.n_tokens.clamp(min=1)) if avg else (1, 1)
    out = [(x.chosen.policy * wc).sum(-1) / nc, (x.rejected.policy * wr).sum(-1) / nr]
    if ref:
        out += [(x.chosen.reference * wc).sum(-1) / nc, (x.rejected.reference * wr).sum(-1) / nr]
    else:
        out += [None, None]
    return tuple(out)


def pair_rewards(x: PairLogps, beta: float, ref: bool = True, avg: bool = False,
             ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rewards r(c), r(r) = β·(logπ − logπref) (β·logπ without ``ref``; per-token means with ``avg``; LD-DPO
    log-probs with ``ld_alpha``) -> [batch] each, with gradients, plus the detached reward/log-prob metrics
    shared by every objective."""
    pc, pr, rc, rr = sequence_logps(x, ld_alpha, avg, ref)
    c = implicit_reward(pc, rc, beta) if ref else beta * pc
    r = implicit_reward(pr, rr, beta) if ref else beta * pr
    return c, r, reward_metrics(c, r, pc, pr)


def reward_metrics(c: torch.Tensor, r: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detached batch means every preference objective logs, from per-pair rewards of chosen (c) and
    rejected (r) and their sequence log-probs (pc, pr)."""
    m = {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracy": (c > r).float().mean(),
         "rewards/margin": (c - r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    return {k: v.detach() for k, v in m.items()}


def wpo_weights(x: PairLogps) -> torch.Tensor:
    """WPO's pair weights w(c)·w(r) -> [batch], without gradient (TRL's ``use_weighting``, WPO Eq. 2)."""
    def weight(t: TokenLogps) -> torch.Tensor:
        if t.log_sum_sq_probs is None:
            raise ValueError("wpo needs TokenLogps.log_sum_sq_probs (log Σ_v π(v)² per position) from the stage")
        aligned = ((t.policy.detach() - t.log_sum_sq_probs) * t.mask).sum(-1) / t.n_tokens.clamp(min=1)
        return aligned.exp()

    return weight(x.chosen) * weight(x.rejected)


def pair_mean(losses: torch.Tensor, x: PairLogps, a: DPOArgs) -> torch.Tensor:
    """The batch mean of per-pair losses, WPO-weighted when ``a.wpo``."""
    return (losses * wpo_weights(x)).mean() if a.wpo else losses.mean()


def smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Per pair −(1−ε)·logσ(z) − ε·logσ(−z)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def margins(x: PairLogps, a: DPOArgs) -> tuple[torch.Tensor, dict]:
    """βh per pair (with LD-DPO log-probs when ``a.ld_alpha``), and the reward metrics."""
    c, r, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    return c - r, m


@dpo_family("dpo")
def dpo(x: PairLogps, a: DPOArgs) -> Out:
    """DPO (sigmoid): loss = −logσ(βh)."""
    z, m = margins(x, a)
    return pair_mean(smoothed(z, 0.0), x, a), m


@dpo_family("ipo", IPOArgs)
def ipo(x: PairLogps, a: IPOArgs) -> Out:
    """IPO: loss = (h − 1/(2β))², h on length-averaged log-ratios (as TRL); metrics use the summed rewards."""
    _, m = margins(x, a)
    c, r, _ = pair_rewards(x, 1.0, avg=True, ld_alpha=a.ld_alpha)  # per-token log-ratios
    return pair_mean((c - r - 1 / (2 * a.beta)) ** 2, x, a), m


@dpo_family("hinge", HingeArgs)
def hinge(x: PairLogps, a: HingeArgs) -> Out:
    """Hinge (SLiC): loss = relu(1 − βh)."""
    z, m = margins(x, a)
    return pair_mean(torch.relu(1 - z), x, a), m


@dpo_family("cdpo", CDPOArgs)
def cdpo(x: PairLogps, a: CDPOArgs) -> Out:
    """Conservative DPO (label smoothing ε): loss = −(1−ε)·logσ(βh) − ε·logσ(−βh)."""
    z, m = margins(x, a)
    return pair_mean(smoothed(z, a.label_smoothing), x, a), m


@dpo_family("robust", RobustArgs)
def robust(x: PairLogps, a: RobustArgs) -> Out:
    """Robust DPO (unbiased under label-flip rate ε): loss = (−(1−ε)·logσ(βh) + ε·logσ(−βh)) / (1 − 2ε)."""
    z, m = margins(x, a)
    eps = a.label_smoothing
    return pair_mean((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), x, a), m


@register("simpo", args=SimPOArgs, kind="preference")
def simpo(x: PairLogps, a: SimPOArgs) -> Out:
    """SimPO (reference-free): with Δ = logπ(c)/|c| − logπ(r)/|r|, loss = −(1−ε)·logσ(βΔ − γ) − ε·logσ(γ − βΔ).
    Rewards are β·logπ(y)/|y| and ``logps/*`` are per-token means."""
    c, r, m = pair_rewards(x, a.beta, ref=False, avg=True)
    return smoothed(c - r - a.gamma, a.label_smoothing).mean(), m


@dpo_family("rpo", RPOArgs)
def rpo(x: PairLogps, a: RPOArgs) -> Out:
    """RPO: loss = −logσ(βh) + α·NLL(chosen), NLL = mean over all chosen completion tokens in the batch
    (with ``wpo``, as TRL weights its "sft" term, the NLL times the batch's mean pair weight)."""
    loss, m = dpo(x, a)
    n, _ = nll(x.chosen, a)
    return loss + a.alpha * (n * wpo_weights(x).mean() if a.wpo else n), {**m, "nll": n.detach()}
