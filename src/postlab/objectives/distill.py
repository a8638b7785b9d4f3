"""Teacher→student distillation objectives (daDPO paper, arXiv 2506.15717; GKD for the divergences).

  * ``kd``    token-level KD on teacher responses: forward KL(teacher‖student), reverse
              KL(student‖teacher), or the generalized JSD with β, at every completion position, over
              the teacher's cached top-k tokens plus one tail bucket (see divergence.py).
  * ``ddpo``  DPO on distillation pairs (chosen = teacher response, rejected = student response,
              reference = the student after dSFT): the ``dpo`` loss under its own name.
  * ``dadpo`` −log σ((β1+β2)·Δlogπθ − β1·Δlogπref − β2·Δlogπteacher), Δ = chosen − rejected sequence
              log-probs: DPO plus the teacher's distribution; β2 = 0 is ``ddpo`` with β = β1.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..lazy import F, torch
from .base import ObjectiveArgs, PairLogps, TokenLogps, register
from .divergence import bucket_kl, generalized_jsd, masked_mean, with_tail
from .preference import DPOArgs, dpo, dpo_family, pair_rewards

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]


class KDArgs(ObjectiveArgs):
    divergence: Literal["forward", "reverse", "jsd"] = Field(
        "forward", description="forward: KL(teacher‖student); reverse: KL(student‖teacher); jsd: generalized JSD")
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight of the teacher (GKD's β); jsd only")
    topk: int = Field(64, ge=1, description="k: teacher tokens cached per position; the rest is one tail bucket")


@register("kd", args=KDArgs, kind="sft", topk_of="teacher")
def kd(x: TokenLogps, a: KDArgs) -> Out:
    """Token-level knowledge distillation against the teacher's next-token distribution."""
    teacher, student = with_tail(x.topk_target), with_tail(x.topk_policy)
    if a.divergence == "forward":
        d = bucket_kl(teacher, student)
    elif a.divergence == "reverse":
        d = bucket_kl(student, teacher)
    else:
        d = generalized_jsd(teacher, student, a.beta)
    loss = masked_mean(d, x.mask)
    return loss, {"kd": loss.detach(), "nll": masked_mean(-x.policy, x.mask).detach(),
                  "tail_mass": masked_mean(teacher[..., -1].exp(), x.mask).detach()}


@dpo_family("ddpo")
def ddpo(x: PairLogps, a: DPOArgs) -> Out:
    """dDPO: DPO (sigmoid) on teacher-vs-student pairs; the reference is the dSFT student."""
    return dpo(x, a)


class DADPOArgs(ObjectiveArgs):
    beta1: float = Field(0.1, gt=0, description="β1: weight of KL(π‖πref), the reference (dSFT student)")
    beta2: float = Field(0.1, ge=0, description="β2: weight of KL(π‖πteacher); 0 gives dDPO")


@register("dadpo", args=DADPOArgs, kind="preference", needs_reference=True, needs_teacher=True)
def dadpo(x: PairLogps, a: DADPOArgs) -> Out:
    """daDPO: −logσ((β1+β2)·Δlogπθ − β1·Δlogπref − β2·Δlogπteacher). Rewards are reported as DPO's with
    β = β1; ``teacher_margin`` is the mean Δlogπθ − Δlogπteacher."""
    _, _, m = pair_rewards(x, a.beta1)
    delta = {w: x.chosen.sum(w) - x.rejected.sum(w) for w in ("policy", "reference", "teacher")}
    z = (a.beta1 + a.beta2) * delta["policy"] - a.beta1 * delta["reference"] - a.beta2 * delta["teacher"]
    m["teacher_margin"] = (delta["policy"] - delta["teacher"]).mean().detach()
    return -F.logsigmoid(z).mean(), m
