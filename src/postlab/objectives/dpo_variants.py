"""TRL's other DPO loss types (``DPOConfig.loss_type``, TRL 1.16 ``DPOTrainer._compute_loss``), one
registered objective each under TRL's name. Notation as in preference.py: ρc = logπ(c) − logπref(c),
ρr likewise, h = ρc − ρr; every loss is a batch mean of per-pair losses, and every member takes the
family's options (``beta``, LD-DPO's ``ld_alpha``, WPO's ``wpo``) and logs its reward metrics.

  * ``exo_pair``     EXO (arXiv 2402.00856, Eq. 16): KL(q‖p) over {c, r}, q = (σ(βh), σ(−βh)), p = (1−ε, ε)
  * ``nca_pair``     NCA (arXiv 2402.05369): −logσ(βρc) − ½logσ(−βρc) − ½logσ(−βρr)
  * ``bco_pair``     BCO (arXiv 2404.04656), as TRL 1.16: −logσ(βρc) − logσ(−βρr), no reward shift δ
  * ``sppo_hard``    SPPO (arXiv 2405.00675) with hard win probabilities: (ρc − 1/(2β))² + (ρr + 1/(2β))²
  * ``aot``          AOT (arXiv 2406.05882): sorted policy log-ratio margins against sorted reference ones
  * ``aot_unpaired`` AOT, unpaired: sorted ρc against sorted ρr
  * ``apo_zero``     APO-zero (arXiv 2408.06266, Eq. 7): 1 − σ(βρc) + σ(βρr)
  * ``apo_down``     APO-down (Eq. 8): σ(βρc) + 1 − σ(βh)
  * ``discopop``     DiscoPOP (arXiv 2406.08414, Eq. 5): with z = βh, m = σ(z/τ): (1−m)·(−logσ(z)) + m·e^{−z}
  * ``sigmoid_norm`` DPO on length-averaged log-ratios: −logσ(β(ρc/|c| − ρr/|r|))

``aot`` and ``aot_unpaired`` couple the pairs of a batch (they sort across it): in postlab the batch is one
forward, so ``optim.forward_rows`` below the batch size changes what they sort over.
"""
from __future__ import annotations

import math

from pydantic import Field

from ..lazy import F, torch
from .base import PairLogps
from .preference import DPOArgs, dpo_family, margins, pair_mean, pair_rewards, sequence_logps, smoothed

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class EXOArgs(DPOArgs):
    label_smoothing: float = Field(1e-3, gt=0, lt=1, description="ε: target probability of the rejected answer "
                                                                 "(the paper recommends 1e-3)")


class AOTArgs(DPOArgs):
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: label smoothing of the sorted margins, as cDPO")


class DiscoPOPArgs(DPOArgs):
    tau: float = Field(0.05, gt=0, description="τ: temperature of the blend between the logistic and exponential "
                                               "losses (TRL's discopop_tau)")


@dpo_family("exo_pair", EXOArgs)
def exo_pair(x: PairLogps, a: EXOArgs) -> Out:
    """EXO (pairwise): σ(βh)·(logσ(βh) − log(1−ε)) + σ(−βh)·(logσ(−βh) − log ε); minimal where σ(βh) = 1−ε."""
    z, m = margins(x, a)
    eps = a.label_smoothing
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return pair_mean(losses, x, a), m


@dpo_family("nca_pair")
def nca_pair(x: PairLogps, a: DPOArgs) -> Out:
    """NCA (pairwise): −logσ(βρc) − ½logσ(−βρc) − ½logσ(−βρr): absolute rewards, so the chosen answer's
    likelihood is pushed up, not only the margin."""
    c, r, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    return pair_mean(-F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r), x, a), m


@dpo_family("bco_pair")
def bco_pair(x: PairLogps, a: DPOArgs) -> Out:
    """BCO (pairwise, as TRL 1.16): −logσ(βρc) − logσ(−βρr): chosen and rejected classified separately
    (no running reward baseline δ: stateless)."""
    c, r, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    return pair_mean(-F.logsigmoid(c) - F.logsigmoid(-r), x, a), m


@dpo_family("sppo_hard")
def sppo_hard(x: PairLogps, a: DPOArgs) -> Out:
    """SPPO with hard win probabilities: (ρc − 1/(2β))² + (ρr + 1/(2β))²: each log-ratio pulled to ±1/(2β)."""
    _, _, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    pc, pr, rc, rr = sequence_logps(x, a.ld_alpha)
    target = 0.5 / a.beta
    return pair_mean((pc - rc - target) ** 2 + (pr - rr + target) ** 2, x, a), m


@dpo_family("aot", AOTArgs)
def aot(x: PairLogps, a: AOTArgs) -> Out:
    """AOT (paired): Δ = sort(logπ(c) − logπ(r)) − sort(logπref(c) − logπref(r)) over the batch;
    loss = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ): the policy's margins dominate the reference's in distribution."""
    _, _, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    pc, pr, rc, rr = sequence_logps(x, a.ld_alpha)
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return pair_mean(smoothed(a.beta * delta, a.label_smoothing), x, a), m


@dpo_family("aot_unpaired", AOTArgs)
def aot_unpaired(x: PairLogps, a: AOTArgs) -> Out:
    """AOT (unpaired): Δ = sort(ρc) − sort(ρr) over the batch; loss = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)."""
    c, r, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
    return pair_mean(smoothed(delta, a.label_smoothing), x, a), m


@dpo_family("apo_zero")
def apo_zero(x: PairLogps, a: DPOArgs) -> Out:
    """APO-zero: 1 − σ(βρc) + σ(βρr): the chosen likelihood up, the rejected one down (chosen answers
    better than the model's own)."""
    c, r, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    return pair_mean(1 - torch.sigmoid(c) + torch.sigmoid(r), x, a), m


@dpo_family("apo_down")
def apo_down(x: PairLogps, a: DPOArgs) -> Out:
    """APO-down: σ(βρc) + 1 − σ(β(ρc − ρr)): both likelihoods down, the rejected one more (chosen answers
    worse than the model's own)."""
    c, r, m = pair_rewards(x, a.beta, ld_alpha=a.ld_alpha)
    return pair_mean(torch.sigmoid(c) + 1 - torch.sigmoid(c - r), x, a), m


@dpo_family("discopop", DiscoPOPArgs)
def discopop(x: PairLogps, a: DiscoPOPArgs) -> Out:
    """DiscoPOP (log-ratio modulated): z = βh, m = σ(z/τ), loss = (1−m)·(−logσ(z)) + m·e^{−z}."""
    z, m = margins(x, a)
    blend = torch.sigmoid(z / a.tau)
    return pair_mean((1 - blend) * -F.logsigmoid(z) + blend * torch.exp(-z), x, a), m


@dpo_family("sigmoid_norm")
def sigmoid_norm(x: PairLogps, a: DPOArgs) -> Out:
    """DPO on length-averaged log-ratios: −logσ(β(ρc/|c| − ρr/|r|)); metrics use the summed rewards."""
    _, m = margins(x, a)
    c, r, _ = pair_rewards(x, a.beta, avg=True, ld_alpha=a.ld_alpha)
    return pair_mean(-F.logsigmoid(c - r), x, a), m
