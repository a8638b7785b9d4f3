"""Full fine-tuning: every weight trains."""
from __future__ import annotations

from ..lazy import torch
from .base import Parameterization, register


@register
class FullFineTuning(Parameterization):
    name = "fft"

    def apply(self, model: torch.nn.Module, options) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
