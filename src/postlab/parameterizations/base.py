"""The Parameterization base class and the registry (see the package docstring)."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from ..errors import ConfigError
from ..lazy import torch


class Parameterization:
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel] | None] = None  # this method's settings, or None
    adapter: ClassVar[bool] = False  # trains an adapter on frozen base weights (saved as a PEFT adapter)

    def apply(self, model: torch.nn.Module, options: BaseModel | None) -> torch.nn.Module:
        """The model to train, from a plain model (no adapter)."""
        raise NotImplementedError

    def owns(self, model: torch.nn.Module) -> bool:
        """Does `model` carry this method's adapter?"""
        return False

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain model computing what `model` computes."""
        return model

    def function_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that define what `model` computes (cache keys of log-probs and evaluations)."""
        return model.state_dict()

    def extrapolated(self, model: torch.nn.Module, start: dict[str, torch.Tensor]) -> list[str]:
        """Names of the parameters ExPO moves to start + λ(end − start): by default every trainable one."""
        return [n for n in start]


REGISTRY: dict[str, Parameterization] = {}


def register(cls: type[Parameterization]) -> type[Parameterization]:
    REGISTRY[cls.name] = cls()
    return cls


def get_parameterization(name: str) -> Parameterization:
    if name not in REGISTRY:
        raise ConfigError(f"parameterization.method: unknown method {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]
