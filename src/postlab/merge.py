"""Weight-space tools: model soups and ExPO extrapolation, as linear combinations of checkpoints.

Both are θ = Σ_i c_i·θ_i over checkpoints of the same architecture (Σ c_i = 1):
  * soup: c_i = w_i / Σ w (uniform by default) -- Wortsman et al., "Model soups";
  * ExPO: θ = θ_sft + λ(θ_dpo − θ_sft), i.e. c = (1 − λ, λ); λ > 1 extrapolates past the aligned
    model (Zheng et al., "Weak-to-strong extrapolation expedites alignment").
A LoRA adapter is merged into its base first, so adapters and full checkpoints mix freely. The output
is a plain Hugging Face checkpoint (safetensors + config + tokenizer), loadable with `transformers`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from .errors import ModelError, PostlabError
from .models import LM, load_lm
from .parameterizations import extrapolated_names, plain

log = logging.getLogger("postlab")


def load_full(path: str) -> LM:
    """A checkpoint as a plain (non-PEFT) fp32 model on the CPU; adapters are merged into their base."""
    lm = load_lm(path, "cpu", "fp32")
    return replace(lm, model=plain(lm.model))


def linear_combination(states: list[dict[str, torch.Tensor]], coefficients: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i c_i·states[i] for floating-point tensors (accumulated in float64, returned in the first
    state's dtypes); other tensors (integer buffers) come from the first state."""
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k].double() * c for s, c in zip(states, coefficients)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def combine(paths: list[str], coefficients: list[float]) -> LM:
    """The checkpoint Σ c_i·θ_i of full (adapter-merged) checkpoints of one architecture."""
    if len(paths) != len(coefficients) or not paths:
        raise PostlabError(f"merge: {len(paths)} checkpoints but {len(coefficients)} coefficients")
    first = load_full(paths[0])
    states = [first.model.state_dict()]
    for path in paths[1:]:
        sd = load_full(path).model.state_dict()
        ref = states[0]
        if sd.keys() != ref.keys() or any(sd[k].shape != ref[k].shape for k in ref):
            diff = sorted(set(sd) ^ set(ref)) or [k for k in ref if sd[k].shape != ref[k].shape]
            raise ModelError(f"merge: {path} does not match {paths[0]} (parameters differ: {diff[:3]}); "
                             f"soups and ExPO need checkpoints of the same base architecture")
        states.append(sd)
    first.model.load_state_dict(linear_combination(states, coefficients))
    return first


def extrapolate_in_place(model: torch.nn.Module, start: dict[str, torch.Tensor], lam: float) -> None:
    """ExPO inside a run: the weights the stage's parameterization names (by default every trainable
    one; for a fresh LoRA adapter only B, which scales the update B·A by λ exactly) become
    θ_start + λ(θ_end − θ_start)."""
    names = set(extrapolated_names(model, start))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.copy_(linear_combination([{name: start[name]}, {name: p.detach()}], expo_coefficients(lam))[name])


def soup_coefficients(n: int, weights: list[float] | None) -> list[float]:
    weights = weights or [1.0] * n
    if len(weights) != n:
        raise PostlabError(f"merge soup: {n} checkpoints but {len(weights)} --weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise PostlabError("merge soup: weights must be non-negative with a positive sum (a soup is an average)")
    return [w / sum(weights) for w in weights]


def expo_coefficients(lam: float) -> list[float]:
    """θ_sft + λ(θ_dpo − θ_sft) = (1 − λ)·θ_sft + λ·θ_dpo."""
    return [1.0 - lam, lam]


def write(lm: LM, out: Path, note: dict) -> Path:
    import json

    from .checkpoint import atomic_write_text
    from .parameterizations import save_model

    save_model(lm.model, lm.tokenizer, out, base_source=str(out))  # a full model: it is its own base
    atomic_write_text(out / "postlab_merge.json", json.dumps(note, indent=2))
    return out
