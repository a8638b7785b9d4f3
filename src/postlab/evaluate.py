"""Evaluation beyond a task's own metrics: implicit rewards of a checkpoint against a reference.

The implicit-reward view reads any policy (an SFT checkpoint too) as a reward model
r(x, y) = β·log πθ(y|x)/πref(y|x); on preference pairs we report how often r ranks chosen above
rejected, and by what margin."""
from __future__ import annotations

import torch

from .data import Pair, tokenize
from .logprobs import cached_token_logps, token_logps
from .models import LM
from .objectives import implicit_reward


def implicit_rewards(policy: LM, reference: LM, pairs: list[Pair], beta: float = 0.1, batch_size: int = 16,
                     append_eos: bool = True) -> dict[str, float]:
    items, _ = tokenize(pairs, policy.tokenizer, policy.max_length, "truncate", append_eos=append_eos, source="pairs")
    ref = cached_token_logps(reference, items, "reference", batch_size)
    pol = token_logps(policy, items, batch_size, desc="policy log-probs")
    seq = lambda xs: torch.stack([torch.stack([t.sum() for t in x]) for x in xs])  # noqa: E731 -> [n, 2]
    r = implicit_reward(seq(pol), seq(ref), beta)
    margin = r[:, 0] - r[:, 1]
    kl = (seq(pol) - seq(ref))[:, 0]  # log-ratio on chosen answers: a sample estimate of KL(π‖πref) only
    return {"reward_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean()),
            "reward_chosen": float(r[:, 0].mean()), "reward_rejected": float(r[:, 1].mean()),
            "logratio_chosen": float(kl.mean()), "pairs": float(len(pairs))}
