"""Parameterizations: which weights a stage trains, registered like objectives.

A parameterization is a class with a `name`, an optional `Options` model (validated from the stage
config's `parameterization.<name>` block) and the few things the rest of postlab asks of it: apply
itself to a model, merge an adapter back into plain weights, describe what a model computes (for
cache keys), extrapolate a stage's update (ExPO) and save a model. `fft.py`, `lora.py` and `dora.py`
are the registered ones; a new method is one file and a `@register`, and no other module knows its
name.

A stage config names one: `parameterization: {method: lora, lora: {r: 8}, adapter: continue}`.
When the previous stage trained an adapter, `adapter: continue` keeps training it if this stage uses
the same method; otherwise (or with `adapter: merge`) it is merged into the weights first.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..lazy import torch
from .base import REGISTRY, Parameterization, get_parameterization, register  # noqa: F401

log = logging.getLogger("postlab")


def normalized_config(raw: Any) -> Any:
    """A stage's `parameterization` block with the chosen method's options validated and filled with
    their defaults, and other methods' option blocks dropped (they do not apply): what config.yaml
    holds and what cache keys hash. Raises ValueError naming the field at fault."""
    if not isinstance(raw, dict):
        return raw
    out = {k: v for k, v in raw.items() if k in ("method", "adapter")}
    method = get_parameterization(str(raw.get("method", "fft")))
    for key in raw:
        if key not in ("method", "adapter") and key not in REGISTRY:
            raise ValueError(f"unknown key {key!r} (expected method, adapter, or a method's options: {sorted(REGISTRY)})")
    if method.Options is not None:
        given = raw.get(method.name) or {}
        try:
            out[method.name] = method.Options(**given).model_dump(mode="json")
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"{method.name}.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        except TypeError:
            raise ValueError(f"{method.name}: expected a mapping of {method.name} options, got {given!r}") from None
    return out


def options(cfg) -> BaseModel | None:
    """The chosen method's options, parsed."""
    method = get_parameterization(cfg.method)
    return None if method.Options is None else method.Options(**((cfg.model_extra or {}).get(method.name) or {}))


def adapter_of(model: torch.nn.Module) -> Parameterization | None:
    """The registered method whose adapter `model` carries, if any."""
    return next((m for m in REGISTRY.values() if m.adapter and m.owns(model)), None)


def plain(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with any adapter merged into its weights."""
    method = adapter_of(model)
    return method.merge(model) if method is not None else model


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model computing what `model` computes, leaving `model` as it is: `model` itself when it
    carries no adapter, else a merged copy. For decoding, where an adapter's extra products and calls
    on every token cost more than copying the weights once."""
    import copy

    method = adapter_of(model)
    return model if method is None else method.merge(copy.deepcopy(model))


def prepare(model: torch.nn.Module, cfg) -> tuple[torch.nn.Module, bool]:
    """(the model a stage with parameterization `cfg` trains, whether an earlier adapter was merged
    into the weights to get it: then the stage's base exists only in memory)."""
    method = get_parameterization(cfg.method)
    current = adapter_of(model)
    if current is not None and current.name == method.name and cfg.adapter == "continue":
        return model, False
    merged = current is not None
    return method.apply(plain(model), options(cfg)), merged


def function_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    method = adapter_of(model)
    return method.function_state(model) if method is not None else model.state_dict()


def extrapolated_names(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> list[str]:
    method = adapter_of(model)
    return method.extrapolated(model, start) if method is not None else list(start)


def save_model(model: torch.nn.Module, tokenizer, path: Path, base_source: str) -> None:
    """HF format, atomically: a full checkpoint, or an adapter whose config names `base_source`."""
    import shutil
    import tempfile

    from ..checkpoint import replace_dir

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=path.parent))
    if adapter_of(model) is not None:
        for c in model.peft_config.values():
            c.base_model_name_or_path = base_source
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)
    shutil.rmtree(tmp, ignore_errors=True)


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


def describe(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


from . import dora, fft, lora  # noqa: E402,F401  (registration)
