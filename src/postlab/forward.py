"""One forward of the training loop: a micro-batch's items -> the policy's log-probs at their scored
positions (and what else the objective declares it needs of the policy's own forward) -> the cached
inputs laid out beside them -> the objective's input shape (TokenLogps, PairLogps, UnpairedLogps) -> its
loss. The loop (postlab.train) branches on nothing here but the objective's declared kind and needs."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .data import score_batch
from .logprobs import score
from .models import LM
from .objectives import ObjectiveSpec, PairLogps, TokenLogps, UnpairedLogps

if TYPE_CHECKING:
    from .stage import StagePlan


def objective_inputs(spec: ObjectiveSpec, logps, mask, n_items: int, desirable=None,
                     **cached) -> TokenLogps | PairLogps | UnpairedLogps:
    """The objective's input: `cached` holds the optional TokenLogps fields (reference, teacher,
    topk_policy, topk_target, log_sum_sq_probs), laid out like `logps` (answers completion-major).
    Unpaired items (`desirable`: their labels [items]) carry their own completion first and, where the
    objective needs a KL baseline, a partner's completion second: its mismatched pair."""
    if spec.kind == "sft":
        return TokenLogps(logps, mask, **cached)

    def part(sl):
        return TokenLogps(logps[sl], mask[sl], **{k: None if v is None else v[sl] for k, v in cached.items()})

    first, second = part(slice(0, n_items)), part(slice(n_items, 2 * n_items))
    if spec.kind == "unpaired":
        return UnpairedLogps(first, desirable, second if spec.needs_kl_baseline else None)
    return PairLogps(first, second)


def batch_loss(lm: LM, plan: StagePlan, idx: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(the objective's loss, its metrics, the real tokens of the forward) on items `idx` of the plan: one
    forward of the policy, with the cached inputs the objective declares."""
    o = plan.cfg.optim
    batch = score_batch([plan.items[i] for i in idx], lm.tokenizer.pad_token_id, pack=o.packing,
                        pack_length=o.packing_length).to(lm.device)
    cached, at_tokens = plan.inputs.for_batch(idx, batch.n_slots, lm.device)
    logps, mask, own = policy_logps(lm, batch, plan.spec, at_tokens)
    loss, m = plan.spec.fn(objective_inputs(plan.spec, logps, mask, len(idx), **cached, **own), plan.args)
    return loss, m, batch.n_tokens


def policy_logps(lm: LM, batch, spec: ObjectiveSpec, at_tokens: torch.Tensor | None):
    """(log-probs, mask, the policy's own cached-like fields) of one forward: the log-probs at the cached
    top-k tokens (`topk_policy`) and log Σ_v π(v)² (`log_sum_sq_probs`) where the objective needs them."""
    logps, mask, *more = score(lm, batch, at=at_tokens, log_sum_sq=spec.needs_log_sum_sq_probs)
    names = [name for name, on in (("topk_policy", at_tokens is not None),
                                   ("log_sum_sq_probs", spec.needs_log_sum_sq_probs)) if on]
    return logps, mask, dict(zip(names, more))
