"""Sampling continuations (evaluation, preference pairs, teacher data): batched, seeded, left-padded."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import GenerationConfig
from .models import LM


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
                kwargs = dict(do_sample=False) if cfg.greedy else dict(do_sample=True, temperature=cfg.temperature,
                                                                       top_p=cfg.top_p, top_k=0)
                with lm.autocast():
                    ids = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, **kwargs)
                out += tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = "right"
        model.train(was_training)
    return out
