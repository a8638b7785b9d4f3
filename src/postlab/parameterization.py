"""How a stage's trainable parameters are chosen: full fine-tuning or LoRA (through PEFT)."""
from __future__ import annotations

import logging

import torch

from .config import ParameterizationConfig
from .errors import ConfigError

log = logging.getLogger("postlab")


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def apply_parameterization(model: torch.nn.Module, cfg: ParameterizationConfig) -> torch.nn.Module:
    """Return the model to train under `cfg`. An existing adapter (from an earlier stage) is kept
    (`adapter: continue`) or merged into the weights first (`adapter: merge`)."""
    if is_peft(model):
        if cfg.method == "lora" and cfg.adapter == "continue":
            return model
        model = model.merge_and_unload()
    if cfg.method == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = cfg.lora
    peft_cfg = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                          target_modules=lcfg.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"parameterization.lora.target_modules={lcfg.target_modules!r}: {str(e).splitlines()[0]} "
                          f"(linear modules in this model: {names})") from None


def describe(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
