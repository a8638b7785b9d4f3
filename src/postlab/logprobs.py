"""Per-token log-probs of scored tokens, with the LM head applied only where needed.

Full-vocabulary logits are materialized one chunk of scored rows at a time; in training each chunk is
recomputed in the backward pass (activation checkpointing), so memory holds at most one chunk of
logits, never [tokens, vocab] for a long completion.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from . import faults
from .cache import cache_key, load_tensors, location, lock, save_tensors
from .data import CHUNK_ROWS, Example, ScoreBatch, Tokenized, score_batch, tokenize
from .decoder import decoder_and_head
from .models import LM

log = logging.getLogger("postlab")



def _logits(head: torch.nn.Module, h: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Full-vocabulary logits in fp32 at the rows of `h`, for an fp32 log-softmax; returns them with
    the dim that holds the vocabulary: 1 for [rows, vocab], 0 for [vocab, rows].

    Under autocast (bf16, fp16) the head's matmul runs in that dtype, with fp32 accumulation, and
    each row's output is shifted inside the matmul (addmm's input) by minus the fp32 logit of one of
    its targets. A constant per row leaves the log-softmax unchanged; what it changes is the rounding
    of the output: relative to |logit - target logit|, small where the probability is, instead of
    to |logit| (10-30 on the embedded model: steps of 0.03-0.1 in bf16, what autocast's own bf16
    head puts into every log-prob). The product is taken as [vocab, rows], with the weight as
    autocast's own argument, so a scoring pass casts it once (LM.inference). bench/head_precision.py
    measures the error against the head in fp32; that head made a sonnet SFT stage 1.11x slower on
    AMX, and on a GPU would run without tensor cores. Heads with a bias or wrapped by an adapter,
    and fp32 runs, use the fp32 head.
    """
    device = h.device.type
    if not torch.is_autocast_enabled(device) or type(head) is not torch.nn.Linear or head.bias is not None:
        with torch.autocast(device, enabled=False):
            return head(h.float()), 1
    w = head.weight
    # one target per row (the largest id where a row has several: deterministic)
    row_target = torch.zeros(len(h), dtype=torch.long, device=h.device).scatter_reduce(
        0, rows, targets, "amax", include_self=False)
    shift = -(h.detach().float() * w.detach()[row_target].float()).sum(-1)
    return torch.addmm(shift.expand(len(w), len(h)), w, h.t()).float(), 0


def _target_logps(head: torch.nn.Module, h: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
    """(log-probs of `targets` at `rows`, the log-sum-exp at rows [len(rows), 1], a function giving
    the logits at rows [len(rows), vocab], a function giving log Σ_v π(v)² at rows [len(rows)])."""
    logits, v = _logits(head, h, rows, targets)
    lse = logits.logsumexp(v)
    tok = (logits[rows, targets] if v else logits[targets, rows]) - lse[rows]

    def log_sum_sq() -> torch.Tensor:
        # log Σ_v π(v)² = logsumexp(2·logits) − 2·logsumexp(logits): WPO's weights, a constant (no gradient).
        # Unchanged by the shift _logits may add to a row's logits.
        with torch.no_grad():
            return ((2 * logits.detach()).logsumexp(v) - 2 * lse.detach())[rows]

    return tok, lse[rows, None], lambda: logits[rows] if v else logits[:, rows].t(), log_sum_sq


def _chunk_logps(head: torch.nn.Module, h: torch.Tensor, local_hidden: torch.Tensor, targets: torch.Tensor,
                 at: torch.Tensor | None = None, log_sum_sq: bool = False):
    """Log-probs of `targets` at rows `local_hidden` of this chunk; with `at` ([entries, k] token ids)
    also the log-probs of those tokens at the same rows; with `log_sum_sq` also log Σ_v π(v)² there."""
    tok, lse, logits, sum_sq = _target_logps(head, h, local_hidden, targets)
    out = (tok, *(() if at is None else (logits().gather(-1, at) - lse,)), *((sum_sq(),) if log_sum_sq else ()))
    return out if len(out) > 1 else tok


def _chunk_topk(head: torch.nn.Module, h: torch.Tensor, local_hidden: torch.Tensor, targets: torch.Tensor, k: int):
    tok, lse, logits, _ = _target_logps(head, h, local_hidden, targets)
    values, index = logits().topk(k, dim=-1)
    return tok, values - lse, index


def _layout(batch: ScoreBatch, vals: torch.Tensor) -> torch.Tensor:
    """Per-entry values [M, ...] -> [answers, slots, ...] (zeros where no token)."""
    out = torch.zeros(batch.n_answers, batch.n_slots, *vals.shape[1:], dtype=vals.dtype, device=vals.device)
    return out.index_put((batch.entry_answer, batch.entry_slot), vals)


def decoder_hidden(body: torch.nn.Module, batch: ScoreBatch) -> torch.Tensor:
    """The decoder's last hidden states [rows, L, d] for a score batch. The mask is given ready-made
    (4D), because from a 2D padding mask, or none, transformers reads a tensor back to the host to
    decide how to build it: a sync per forward. No KV cache: nothing here generates."""
    return body(input_ids=batch.input_ids, attention_mask=batch.attention_mask(), position_ids=batch.position_ids,
                use_cache=False).last_hidden_state


def _score_chunks(lm: LM, batch: ScoreBatch, chunk_rows: int, fn, extra=None, **kw) -> list:
    """Run the decoder once, then `fn` over chunks of scored rows; `extra` ([M, ...], per entry) is
    sliced along with the entries. Returns the per-output concatenations."""
    body, head = decoder_and_head(lm.model)
    with lm.autocast():
        hidden = decoder_hidden(body, batch)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.hidden_index)
        pieces = []
        U = h.shape[0]
        bounds = batch.chunk_bounds(chunk_rows)  # computed on the host: no device sync per chunk
        for c, s in enumerate(range(0, U, chunk_rows)):
            lo, hi = bounds[c], bounds[c + 1]
            args = (h[s:s + chunk_rows], batch.entry_hidden[lo:hi] - s, batch.entry_target[lo:hi])
            if extra is not None:
                args += (extra[lo:hi],)
            if torch.is_grad_enabled() and U > chunk_rows:
                out = checkpoint(fn, head, *args, use_reentrant=False, **kw)
            else:
                out = fn(head, *args, **kw)
            pieces.append(out if isinstance(out, tuple) else (out,))
    return [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*pieces)]


def _mask(batch: ScoreBatch, device) -> torch.Tensor:
    mask = torch.zeros(batch.n_answers, batch.n_slots, dtype=torch.bool, device=device)
    mask[batch.entry_answer, batch.entry_slot] = True
    return mask


def score(lm: LM, batch: ScoreBatch, chunk_rows: int = CHUNK_ROWS, at: torch.Tensor | None = None,
          log_sum_sq: bool = False):
    """Return (log-probs [answers, slots] in fp32, mask [answers, slots] bool). With `at`
    ([answers, slots, k] token ids, e.g. a cached top-k of the reference or teacher), also the
    log-probs of those tokens at each completion position: a next output [answers, slots, k]. With
    `log_sum_sq`, last, log Σ_v π(v|s_t)² over the whole vocabulary at each completion position
    [answers, slots] (0 at padding), without gradient: WPO's weights (TRL's ``log_sum_sq_probs``)."""
    extra = None if at is None else at[batch.entry_answer, batch.entry_slot]
    outs = _score_chunks(lm, batch, chunk_rows, _chunk_logps, extra, log_sum_sq=log_sum_sq)
    logps, mask = _layout(batch, outs[0]), _mask(batch, outs[0].device)
    return (logps, mask, *(_layout(batch, o) for o in outs[1:]))


@torch.no_grad()
def score_topk(lm: LM, batch: ScoreBatch, k: int, chunk_rows: int = CHUNK_ROWS):
    """(log-probs, mask, top-k log-probs [answers, slots, k], their token ids [answers, slots, k])."""
    logps, values, index = _score_chunks(lm, batch, chunk_rows, _chunk_topk, k=k)
    return _layout(batch, logps), _mask(batch, logps.device), _layout(batch, values), _layout(batch, index)


@torch.no_grad()
def score_all(lm: LM, items: list, batch_size: int, desc: str | None = None, topk: int = 0):
    """Score `items` (Tokenized) in length-sorted batches without gradients; yields
    (indices, log-probs, mask) per batch -- plus top-k log-probs and ids with `topk` -- indices
    pointing into `items`. Callers iterate it inside `lm.inference()`: each weight cast once per pass."""
    from .progress import bar

    was_training = lm.model.training
    lm.model.eval()
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    pad = lm.tokenizer.pad_token_id
    try:
        for s in bar(range(0, len(order), batch_size), desc=desc, main_process=desc is not None, leave=False):
            idx = order[s:s + batch_size]
            faults.point("score-batch")  # reference/teacher passes, evaluation
            batch = score_batch([items[i] for i in idx], pad).to(lm.device)
            yield (idx, *(score_topk(lm, batch, topk) if topk else score(lm, batch)))
    finally:
        lm.model.train(was_training)


def token_logps(lm: LM, items: list, batch_size: int, desc: str | None = None, topk: int = 0):
    """Per item, per completion: per-token log-probs (fp32, CPU), in the items' order. With `topk`,
    a tuple of three such structures: log-probs, top-k log-probs [tokens, k], top-k ids [tokens, k]."""
    n_out = 3 if topk else 1
    outs: list[list[list[torch.Tensor]]] = [[[] for _ in items] for _ in range(n_out)]
    with lm.inference():
        for idx, *scored in score_all(lm, items, batch_size, desc=desc, topk=topk):
            # one copy to the host per output and batch: cut row by row on a GPU, each row would wait for it
            logps, mask, *dist = (t.cpu() for t in scored)
            B = len(idx)
            for k in range(len(items[idx[0]].completions)):
                for b, i in enumerate(idx):
                    row = k * B + b
                    for o, t in enumerate([logps, *dist]):
                        x = t[row][mask[row]]
                        outs[o][i].append(x.to(torch.int32) if x.dtype == torch.long else x.float())
    return tuple(outs) if topk else outs[0]


def completion_nll(lm: LM, examples: list[Example], batch_size: int, overlength: str = "refuse",
                   append_eos: bool = True, source: str = "dev") -> tuple[float, int]:
    """(total NLL, number of tokens) of the completions given their prompts, over completion tokens."""
    per = completion_nll_per_example(lm, examples, batch_size, overlength, append_eos, source)
    return float(sum(n for n, _ in per)), int(sum(t for _, t in per))


def completion_nll_per_example(lm: LM, examples: list[Example], batch_size: int, overlength: str = "refuse",
                               append_eos: bool = True, source: str = "dev") -> list[tuple[float, int]]:
    """Per example, in order: (NLL of its completion given its prompt, number of completion tokens)."""
    items, _ = tokenize(examples, lm.tokenizer, lm.max_length, overlength, append_eos=append_eos, source=source)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    with lm.inference():
        for idx, logps, mask in score_all(lm, items, batch_size):
            nll = -(logps.double() * mask).sum(-1).cpu()
            count = mask.sum(-1).cpu()
            for b, i in enumerate(idx):  # one completion per example: row b
                out[i] = (float(nll[b]), int(count[b]))
    return out


def cached_token_logps(lm: LM, items: list[Tokenized], role: str, batch_size: int = 16,
                       directory: Path | None = None, topk: int = 0):
    """Per item, per completion: the model's per-token log-probs (fp32, CPU). `role` names the use
    (reference, teacher) in logs and file names. With `topk` > 0, returns (log-probs, top-k
    log-probs [tokens, k], their token ids [tokens, k]): the model's distribution at each completion
    position, cut to its k most likely tokens (the objectives treat the rest as one tail bucket)."""
    key = cache_key(lm, items, {"role": role, **({"topk": topk} if topk else {})})
    directory = directory or location("logps")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{role}{f'-top{topk}' if topk else ''}-{key}.safetensors"
    names = ("values", "topk_values", "topk_index") if topk else ("values",)
    with lock(f"logps-{key}"):  # runs side by side compute it once; the others read it
        got = load_tensors(path, key, len(items), names) if path.is_file() else None
        if got is not None:
            log.info("%s log-probs: reusing cache %s", role, path)
        else:
            computed = token_logps(lm, items, batch_size, desc=f"{role} log-probs", topk=topk)
            got = dict(zip(names, computed if topk else (computed,)))
            save_tensors(path, key, got)
            log.info("%s log-probs: computed for %d items, cached at %s", role, len(items), path)
    return tuple(got[n] for n in names) if topk else got["values"]
