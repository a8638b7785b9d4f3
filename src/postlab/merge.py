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
from pathlib import Path

import torch

from .errors import ModelError, PostlabError
from .models import LM, load_lm
from .parameterization import is_peft

log = logging.getLogger("postlab")


def load_full(path: str) -> LM:
    """A checkpoint as a plain (non-PEFT) fp32 model on the CPU; adapters are merged into their base."""
    lm = load_lm(path, "cpu", "fp32")
    if is_peft(lm.model):
        lm.model = lm.model.merge_and_unload()
    return lm


def combine(paths: list[str], coefficients: list[float]) -> LM:
    """The checkpoint Σ c_i·θ_i (floating-point tensors; integer buffers come from the first)."""
    if len(paths) != len(coefficients) or not paths:
        raise PostlabError(f"merge: {len(paths)} checkpoints but {len(coefficients)} coefficients")
    first = load_full(paths[0])
    acc = {k: v.double() * coefficients[0] if v.is_floating_point() else v.clone()
           for k, v in first.model.state_dict().items()}
    for path, c in zip(paths[1:], coefficients[1:]):
        sd = load_full(path).model.state_dict()
        if sd.keys() != acc.keys() or any(sd[k].shape != acc[k].shape for k in acc):
            diff = sorted(set(sd) ^ set(acc)) or [k for k in acc if sd[k].shape != acc[k].shape]
            raise ModelError(f"merge: {path} does not match {paths[0]} (parameters differ: {diff[:3]}); "
                             f"soups and ExPO need checkpoints of the same base architecture")
        for k, v in sd.items():
            if v.is_floating_point():
                acc[k] += v.double() * c
    dtype = {k: v.dtype for k, v in first.model.state_dict().items()}
    first.model.load_state_dict({k: v.to(dtype[k]) for k, v in acc.items()})
    return first


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
    from .run import save_model

    lm.source = str(out)
    save_model(lm, out)
    atomic_write_text(out / "postlab_merge.json", json.dumps(note, indent=2))
    return out
