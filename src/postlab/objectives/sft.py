"""Supervised objectives over completion tokens."""
from __future__ import annotations

import torch

from . import TokenLogps, ObjectiveArgs, register


@register("nll", kind="sft")
def nll(x: TokenLogps, args: ObjectiveArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood over all completion tokens in the batch."""
    n = x.mask.sum().clamp(min=1)
    loss = -(x.policy * x.mask).sum() / n
    return loss, {"nll": loss.detach()}
