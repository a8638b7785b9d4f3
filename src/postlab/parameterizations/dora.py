"""DoRA (weight-decomposed LoRA, PEFT's `use_dora`): each adapted weight is a learned magnitude times
the direction of W + B·A (`parameterization: {method: dora, dora: {r, alpha, dropout,
target_modules}}`, the same options as LoRA)."""
from __future__ import annotations

from ..lazy import torch
from .base import register
from .lora import LoRA


@register
class DoRA(LoRA):
    name = "dora"
    use_dora = True

    def extra_extrapolated(self, start: dict[str, torch.Tensor]) -> list[str]:
        # with B fresh (0) the magnitude starts at ‖W‖ and the stage's update is (ΔB, Δm): both scaled by λ
        return [n for n in start if "lora_magnitude_vector" in n]
