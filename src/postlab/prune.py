"""Smaller students by removing whole decoder layers (`postlab prune`).

Two ways to choose the layers:
  * ``uniform``: evenly spaced layers, never the first or the last;
  * ``block-influence`` (ShortGPT, Men et al. 2024): a layer whose output is most similar to its input
    changes the hidden state least; its block influence is BI = 1 − E[cos(x_in, x_out)] over the
    tokens of calibration prompts, and the layers with the lowest BI are removed.
The result is a normal Hugging Face checkpoint (config's layer count updated), loadable with
`transformers`, with `prune.json` beside it (kept/dropped layers, BI scores, parameter counts).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import ModelError, PostlabError
from .models import LM

log = logging.getLogger("postlab")


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the module holding the decoder-layer ModuleList, its attribute name): Llama-style `model.layers`
    or GPT-2-style `transformer.h`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner_name, attr in (("model", "layers"), ("transformer", "h")):
        owner = getattr(inner, owner_name, None)
        if owner is not None and isinstance(getattr(owner, attr, None), torch.nn.ModuleList):
            return owner, attr
    raise ModelError(f"{type(inner).__name__}: cannot find its decoder layers (model.layers or transformer.h)")


def uniform_choice(n_layers: int, n_drop: int) -> list[int]:
    """`n_drop` evenly spaced layer indices among 1..n_layers-2."""
    inner = list(range(1, n_layers - 1))
    if n_drop > len(inner):
        raise PostlabError(f"prune: cannot drop {n_drop} of {n_layers} layers (the first and last stay)")
    step = len(inner) / n_drop if n_drop else 0
    return sorted({inner[int(step * i + step / 2)] for i in range(n_drop)})


@torch.no_grad()
def block_influence(lm: LM, prompts: list[str], batch_size: int = 8) -> list[float]:
    """BI of every decoder layer: 1 − mean cosine(input, output) over the prompts' real tokens."""
    owner, attr = decoder_layers(lm.model)
    layers = getattr(owner, attr)
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(
        i, torch.nn.functional.cosine_similarity(args[0].float(), (out[0] if isinstance(out, tuple) else out).float(), dim=-1)))
        for i, layer in enumerate(layers)]
    lm.model.eval()
    try:
        for s in range(0, len(prompts), batch_size):
            enc = lm.tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                               max_length=lm.max_length, add_special_tokens=False).to(lm.device)
            lm.model(**enc)
            real = enc["attention_mask"].bool()
            for i in range(len(layers)):
                sums[i] += float(captured[i][real].sum())
            count += int(real.sum())
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s / max(count, 1) for s in sums]


def drop_layers(model: torch.nn.Module, drop: list[int]) -> None:
    """Remove decoder layers in place and keep the config (and Llama's per-layer cache indices) consistent."""
    owner, attr = decoder_layers(model)
    layers = getattr(owner, attr)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    setattr(owner, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    for new_idx, layer in enumerate(getattr(owner, attr)):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            setattr(cfg, name, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]


def prune(lm: LM, drop_fraction: float, method: str, prompts: list[str] | None = None) -> dict:
    """Drop round(drop_fraction × layers) decoder layers of `lm.model` in place; returns the report."""
    if not 0 < drop_fraction < 1:
        raise PostlabError(f"prune: --drop must be in (0, 1), got {drop_fraction}")
    owner, attr = decoder_layers(lm.model)
    n = len(getattr(owner, attr))
    n_drop = round(drop_fraction * n)
    if n_drop < 1:
        raise PostlabError(f"prune: --drop {drop_fraction} of {n} layers rounds to 0 layers")
    before = sum(p.numel() for p in lm.model.parameters())
    scores = None
    if method == "uniform":
        drop = uniform_choice(n, n_drop)
    elif method == "block-influence":
        if not prompts:
            raise PostlabError("prune: block-influence needs calibration prompts (--calibration)")
        scores = block_influence(lm, prompts)
        drop = sorted(sorted(range(n), key=lambda i: scores[i])[:n_drop])
    else:
        raise PostlabError(f"prune: unknown method {method!r}; choose uniform or block-influence")
    drop_layers(lm.model, drop)
    after = sum(p.numel() for p in lm.model.parameters())
    return {"method": method, "drop_fraction": drop_fraction, "layers_before": n, "layers_after": n - len(drop),
            "dropped": drop, "block_influence": scores, "params_before": before, "params_after": after,
            "calibration_prompts": len(prompts or [])}


def write(lm: LM, out: Path, report: dict) -> None:
    from .checkpoint import atomic_write_text
    from .parameterizations import save_model

    save_model(lm.model, lm.tokenizer, out, base_source=str(out))  # a full model: it is its own base
    atomic_write_text(out / "prune.json", json.dumps(report, indent=2))
