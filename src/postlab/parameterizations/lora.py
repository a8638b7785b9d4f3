"""LoRA through PEFT: low-rank adapters B·A on frozen weights (`parameterization: {method: lora,
lora: {r, alpha, dropout, target_modules}}`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..lazy import torch
from .base import Parameterization, register


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    # PEFT's default. On CPU a dropout > 0 costs about what LoRA saves: an SFT stage took 0.93x the
    # time of full fine-tuning with dropout 0.05 and 0.62x without (bench/results/lora_speed.json).
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


@register
class LoRA(Parameterization):
    name = "lora"
    Options = LoraOptions
    adapter = True
    use_dora = False  # DoRA (dora.py) is this method with PEFT's weight decomposition

    def apply(self, model: torch.nn.Module, options: LoraOptions) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                         target_modules=options.target_modules, task_type="CAUSAL_LM", use_dora=self.use_dora)
        try:
            return get_peft_model(model, cfg)
        except ValueError as e:
            names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"parameterization.{self.name}.target_modules={options.target_modules!r}: "
                              f"{str(e).splitlines()[0]} (linear modules in this model: {names})") from None

    def owns(self, model: torch.nn.Module) -> bool:
        configs = getattr(model, "peft_config", None)
        if not configs:
            return False
        cfg = next(iter(configs.values()))
        return str(getattr(cfg, "peft_type", "")).endswith("LORA") and bool(getattr(cfg, "use_dora", False)) == self.use_dora

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.merge_and_unload()

    def function_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A fresh adapter (every B = 0) computes its base model's function: described by the base's
        tensors under the base's names, so caches of the base model (reference log-probs,
        evaluations) are shared between full fine-tuning and adapter runs."""
        sd = model.state_dict()
        lora_b = [t for k, t in sd.items() if "lora_B" in k]
        if not lora_b or any(bool(t.any()) for t in lora_b):
            return sd
        return {k.removeprefix("base_model.model.").replace(".base_layer.", "."): t
                for k, t in sd.items() if "lora_" not in k}

    def extrapolated(self, model: torch.nn.Module, start: dict[str, torch.Tensor]) -> list[str]:
        """ExPO on a fresh adapter scales only B, which scales the update B·A by λ exactly
        (extrapolating A too would scale the product by more than λ)."""
        names = [n for n in start if "lora_B" in n]
        if any(bool(start[n].any()) for n in names):
            raise ConfigError(f"expo_lambda on a {self.name} stage needs a fresh adapter at the stage start "
                              f"(parameterization.adapter: merge)")
        return names + self.extra_extrapolated(start)

    def extra_extrapolated(self, start: dict[str, torch.Tensor]) -> list[str]:
        return []
