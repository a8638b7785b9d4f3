"""Sampling continuations (evaluation, preference pairs, teacher data): batched, seeded, left-padded."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from typing import TYPE_CHECKING

from .models import LM

if TYPE_CHECKING:
    from .config import GenerationConfig


@torch.no_grad()
def generate(lm: LM, prompts: list[str], cfg: GenerationConfig, desc: str | None = "generating") -> list[str]:
    """Continuations of `prompts` (text after the prompt only). The same seed gives the same text;
    the caller's RNG state is left untouched."""
    tok, model = lm.tokenizer, lm.model
    was_training = model.training
    model.eval()
    out: list[str] = []
    tok.padding_side = "left"
    devices = [lm.device] if lm.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            for s in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, disable=desc is None, leave=False):
                enc = tok(prompts[s:s + cfg.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(lm.device)
                kwargs = dict(do_sample=False) if cfg.greedy else dict(
                    do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0,
                    logits_processor=LogitsProcessorList([NucleusFromTopK(cfg.top_p)]) if cfg.top_p < 1 else None)
                with lm.inference():
                    ids = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, **kwargs)
                out += tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = "right"
        model.train(was_training)
    return out


class NucleusFromTopK(LogitsProcessor):
    """Top-p (nucleus) filtering that finds the nucleus among the `k` most likely tokens instead of
    sorting the whole vocabulary (a full sort of 48 x 49k scores per step cost more than the model's
    forward on CPU). Keeps the tokens whose preceding mass (in order of probability) is below top_p,
    the set transformers' top-p keeps (up to float rounding of the mass at the boundary); a row whose
    top `k` tokens hold less than top_p of the mass falls back to a full sort."""

    def __init__(self, top_p: float, k: int = 1024):
        self.top_p, self.k = top_p, k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        k = min(self.k, scores.shape[-1])
        vals, idx = scores.topk(k, dim=-1)
        full = scores.logsumexp(-1, keepdim=True)
        if not bool(((vals - full).exp().sum(-1) >= self.top_p).all()):
            vals, idx = scores.sort(dim=-1, descending=True)
        probs = (vals - full).exp()
        keep = (probs.cumsum(-1) - probs) < self.top_p
        keep[:, 0] = True
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, idx, vals.masked_fill(~keep, float("-inf")))
