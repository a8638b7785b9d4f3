"""Per-token log-probs of scored tokens, with the LM head applied only where needed.

Full-vocabulary logits are materialized one chunk of scored rows at a time; in training each chunk is
recomputed in the backward pass (activation checkpointing), so memory holds at most one chunk of
logits, never [tokens, vocab] for a long completion.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .data import Example, ScoreBatch, score_batch, tokenize
from .models import LM, decoder_and_head

CHUNK_ROWS = 512


def _chunk_logps(head: torch.nn.Module, h: torch.Tensor, local_hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return logits[local_hidden, targets] - logits.logsumexp(-1)[local_hidden]


def score(lm: LM, batch: ScoreBatch, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log-probs [answers, slots] in fp32, mask [answers, slots] bool)."""
    body, head = decoder_and_head(lm.model)
    with lm.autocast():
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.hidden_index)
        pieces = []
        U = h.shape[0]
        bounds = torch.searchsorted(batch.entry_hidden.contiguous(), torch.arange(0, U + chunk_rows, chunk_rows, device=h.device))
        for c, s in enumerate(range(0, U, chunk_rows)):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            args = (h[s:s + chunk_rows], batch.entry_hidden[lo:hi] - s, batch.entry_target[lo:hi])
            if torch.is_grad_enabled() and U > chunk_rows:
                pieces.append(checkpoint(_chunk_logps, head, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_logps(head, *args))
    vals = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    out = torch.zeros(batch.n_answers, batch.n_slots, dtype=torch.float32, device=vals.device)
    mask = torch.zeros(batch.n_answers, batch.n_slots, dtype=torch.bool, device=vals.device)
    out = out.index_put((batch.entry_answer, batch.entry_slot), vals)
    mask[batch.entry_answer, batch.entry_slot] = True
    return out, mask


@torch.no_grad()
def score_all(lm: LM, items: list, batch_size: int, desc: str | None = None):
    """Score `items` (Tokenized) in length-sorted batches without gradients; yields
    (indices, log-probs, mask) per batch, indices pointing into `items`."""
    from tqdm.auto import tqdm

    was_training = lm.model.training
    lm.model.eval()
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    pad = lm.tokenizer.pad_token_id
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            idx = order[s:s + batch_size]
            logps, mask = score(lm, score_batch([items[i] for i in idx], pad).to(lm.device))
            yield idx, logps, mask
    finally:
        lm.model.train(was_training)


def token_logps(lm: LM, items: list, batch_size: int, desc: str | None = None) -> list[list[torch.Tensor]]:
    """Per item, per completion: per-token log-probs (fp32, CPU), in the items' order."""
    out: list[list[torch.Tensor]] = [[] for _ in items]
    for idx, logps, mask in score_all(lm, items, batch_size, desc=desc):
        B = len(idx)
        for k in range(len(items[idx[0]].completions)):
            for b, i in enumerate(idx):
                out[i].append(logps[k * B + b][mask[k * B + b]].float().cpu())
    return out


def completion_nll(lm: LM, examples: list[Example], batch_size: int, overlength: str = "refuse",
                   append_eos: bool = True, source: str = "dev") -> tuple[float, int]:
    """(total NLL, number of tokens) of the completions given their prompts, over completion tokens."""
    items, _ = tokenize(examples, lm.tokenizer, lm.max_length, overlength, append_eos=append_eos, source=source)
    total, count = 0.0, 0
    for _, logps, mask in score_all(lm, items, batch_size):
        total -= float(logps[mask].double().sum())
        count += int(mask.sum())
    return total, count
