"""Sampling continuations (evaluation, preference pairs, teacher data): batched, seeded, left-padded."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .models import LM
from .parameterizations import merged_copy
from .progress import bar

if TYPE_CHECKING:
    from .config import GenerationConfig


@torch.no_grad()
def generate(lm: LM, prompts: list[str], cfg: GenerationConfig, desc: str | None = "generating") -> list[str]:
    """Continuations of `prompts` (text after the prompt only). The same seed gives the same text;
    the caller's RNG state is left untouched."""
    tok, model = lm.tokenizer, merged_copy(lm.model)  # an adapter's per-layer path: ~1/4 of a step
    lm = replace(lm, model=model)
    was_training = model.training
    model.eval()
    out: list[str] = []
    tok.padding_side = "left"
    devices = [lm.device] if lm.device.type == "cuda" else []
    # Sampling is a logits processor that leaves only the drawn token, so generate's own argmax picks
    # it (transformers' sampling draws over the whole vocabulary each step). On a GPU a whole-row sort
    # is cheap and the top-k search's boolean indexing would wait for the device at every token:
    # ks=(). The tokens drawn are the same either way.
    sampler = None if cfg.greedy else LogitsProcessorList([SampleNucleus(
        cfg.temperature, cfg.top_p, ks=(256, 2048) if lm.device.type == "cpu" else ())])
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            for s in bar(range(0, len(prompts), cfg.batch_size), desc=desc, main_process=desc is not None, leave=False):
                enc = tok(prompts[s:s + cfg.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(lm.device)
                with lm.inference():
                    ids = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, do_sample=False, logits_processor=sampler)
                out += tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = "right"
        model.train(was_training)
    return out


class SampleNucleus(LogitsProcessor):
    """Draws each row's next token from the temperature-scaled distribution restricted to its nucleus
    (the tokens transformers' top-p keeps: those whose preceding mass, in order of probability, is
    below top_p) and returns scores that are -inf except at the drawn token. The same distribution as
    transformers' temperature + top-p sampling at a fraction of its cost on CPU: a row's nucleus is
    looked for among its `ks[0]` most likely tokens, then (rows whose top tokens hold less than top_p
    of the mass) among more, and only the rest are sorted whole, where transformers sorts every row
    whole and draws an exponential variate per vocabulary entry (together about a third of a decoding
    step of a 135M model at batch 12 on 2 CPU cores). Sampling sonnets with the 135M base model, half
    the nuclei hold at most 122 tokens, 8% more than 1,024, 1% more than 2,048 (bench/nucleus_sizes.py).
    Each row draws one uniform number per step and takes the token where it falls in the nucleus'
    cumulative mass, in descending probability with ties in token-id order, so which tokens a seed
    draws does not depend on `ks` or on where a row's nucleus was found."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, ks: tuple[int, ...] = (256, 2048)):
        self.temperature, self.top_p, self.ks = temperature, top_p, ks

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() if self.temperature == 1 else scores.float() / self.temperature
        logp = logits.log_softmax(-1)
        u = torch.rand(logp.shape[0], 1, device=logp.device)
        if self.top_p >= 1:  # no nucleus: the whole distribution, in vocabulary order
            cdf = logp.exp().cumsum(-1)
            return _only(scores, _pick(cdf, torch.full_like(u, cdf.shape[-1], dtype=torch.long), u))
        token = torch.empty_like(u, dtype=torch.long)
        rows = torch.arange(logp.shape[0], device=logp.device)  # rows whose nucleus is still to find
        for k in (*(k for k in self.ks if k < logp.shape[-1]), None):
            part = logp[rows]
            # Candidates in descending probability, ties in token-id order (bf16 logits tie often):
            # the order a whole row's stable sort gives, however the candidates were found.
            top, idx = part.sort(dim=-1, descending=True, stable=True) if k is None else _by_id(*part.topk(k, dim=-1))
            probs = top.exp()
            cdf = probs.cumsum(-1)
            size = ((cdf - probs) < self.top_p).sum(-1, keepdim=True).clamp(min=1)  # a prefix: the nucleus
            if k is None:  # whole rows: no boolean indexing, so no host sync (on a GPU, ks=() does only this)
                token[rows] = idx.gather(1, _pick(cdf, size, u[rows]))
                break
            # Found when the nucleus ends before the candidates' last value, so no token left out ties with it.
            found = (cdf[:, -1] >= self.top_p) & (top.gather(1, size - 1)[:, 0] > top[:, -1])
            token[rows[found]] = idx[found].gather(1, _pick(cdf[found], size[found], u[rows[found]]))
            rows = rows[~found]
            if len(rows) == 0:
                break
        return _only(scores, token)


def _by_id(top: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates reordered by descending value, ties by ascending token id."""
    by_id = idx.argsort(dim=-1)
    top, idx = top.gather(1, by_id), idx.gather(1, by_id)
    order = top.argsort(dim=-1, descending=True, stable=True)
    return top.gather(1, order), idx.gather(1, order)


def _pick(cdf: torch.Tensor, size: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the position where `u` falls in the cumulative mass `cdf` of its first `size` entries."""
    pos = torch.searchsorted(cdf, u * cdf.gather(1, size - 1), right=True)
    return torch.minimum(pos, size - 1)  # (u * mass rounding onto the last cumulative value)


def _only(scores: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """-inf everywhere but at each row's drawn token: generate's argmax takes it."""
    return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
