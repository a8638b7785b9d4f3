"""Divergences between the policy's next-token distribution and a cached one (reference or teacher)
known only on that model's top-k tokens.

Tail handling: the k cached tokens are k buckets and everything else is one more, the *tail*, whose
probability is 1 − Σ top-k for each model (the policy's own mass on the k tokens comes from its full
softmax, so its tail is exact too). Divergences are computed over these k+1 buckets. Merging outcomes
never increases an f-divergence (data processing), so this is a lower bound of the full-vocabulary
divergence, exact when k = vocabulary size, and tight when the target's tail mass is small (it is
reported as ``tail_mass`` so users can choose k).
"""
from __future__ import annotations

import math

from ..lazy import torch


def with_tail(logp: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs of k tokens -> [..., k+1] log-probs of k buckets plus the tail bucket."""
    covered = logp.logsumexp(-1, keepdim=True).clamp(max=-1e-7)  # log Σ p, kept < 0
    tail = torch.log(-torch.expm1(covered))  # log(1 − Σ p)
    return torch.cat([logp, tail], -1)


def bucket_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) over the last axis (already bucketed log-probs) -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q (GKD's generalized JSD; β→0 tends to a
    scaled KL(p‖q)-like forward term, β=0.5 is the symmetric JSD)."""
    if not 0 < beta < 1:
        raise ValueError("generalized JSD needs 0 < β < 1")
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return beta * bucket_kl(logp, logm) + (1 - beta) * bucket_kl(logq, logm)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token values over real completion tokens of the batch."""
    return (x * mask).sum() / mask.sum().clamp(min=1)
