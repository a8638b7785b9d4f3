"""From text examples to tensors: tokenization, length-grouped batches, and *score batches*.

A score batch says which hidden states feed the LM head and which target token each scored entry
reads, so the head runs only where a loss or metric needs it (one row for a one-token answer).
Every scored entry belongs to an *answer* (a completion) and a slot (its token index in that answer);
log-probs come back as a right-padded [answers, slots] tensor.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .errors import DataError

# The LM head runs over at most this many scored rows at a time (logprobs.py): the logits of one chunk
# ([rows, vocab]) are the largest activation a long completion makes.
CHUNK_ROWS = 512


@dataclass
class Example:
    """A prompt and its completion (SFT), with an id to trace it back to its source."""

    prompt: str
    completion: str
    id: str = ""


@dataclass
class Pair:
    """A prompt with a chosen and a rejected completion (preference data)."""

    prompt: str
    chosen: str
    rejected: str
    id: str = ""


@dataclass
class Choices:
    """A prompt with several candidate answers (cloze classification: one per label word)."""

    prompt: str
    answers: list[str]
    id: str = ""


@dataclass
class Tokenized:
    prompt: list[int]
    completions: list[list[int]]  # one for SFT; [chosen, rejected] for pairs
    id: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(c) for c in self.completions)


@dataclass
class TokenizeReport:
    truncated: int = 0
    examples: int = 0


def tokenize(examples: list[Example] | list[Pair] | list[Choices], tokenizer, max_length: int, overlength: str = "refuse",
             append_eos: bool = True, source: str = "data",
             max_completion_tokens: int | None = None) -> tuple[list[Tokenized], TokenizeReport]:
    """Tokenize prompt and completion(s) separately (so the boundary is exact). Too long: refuse, or
    drop tokens from the start of the prompt, keeping the completion whole."""
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    out, report = [], TokenizeReport(examples=len(examples))
    too_long: list[tuple[str, int]] = []  # refused: (id, tokens), all reported together
    for i, ex in enumerate(examples):
        texts = ([ex.completion] if isinstance(ex, Example) else list(ex.answers) if isinstance(ex, Choices)
                 else [ex.chosen, ex.rejected])
        prompt = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        comps = [(tokenizer(t, add_special_tokens=False).input_ids + eos)[:max_completion_tokens] for t in texts]
        if not prompt:
            raise DataError(f"{source}: example {ex.id or i} has an empty prompt (the first token has nothing "
                            f"to be predicted from)")
        if any(len(c) == 0 for c in comps):
            raise DataError(f"{source}: example {ex.id or i} has an empty completion")
        longest = len(prompt) + max(len(c) for c in comps)
        if longest > max_length:
            room = max_length - max(len(c) for c in comps)
            if room < 1:
                raise DataError(f"{source}: example {ex.id or i}: its completion alone is {longest - len(prompt)} "
                                f"tokens, more than the limit of {max_length}; cut it (task.max_completion_tokens) "
                                f"or raise model.max_length up to the model's context")
            if overlength == "refuse":
                too_long.append((ex.id or str(i), longest))
                continue
            prompt = prompt[-room:]
            report.truncated += 1
        out.append(Tokenized(prompt, comps, ex.id or str(i)))
    if too_long:
        shown = ", ".join(f"{k} ({n} tokens)" for k, n in too_long[:3]) + (", ..." if len(too_long) > 3 else "")
        raise DataError(f"{source}: {len(too_long)} of {len(examples)} examples are longer than the limit of "
                        f"{max_length} tokens: {shown}; set task.overlength: truncate (drops the prompt's start) "
                        f"or raise model.max_length up to the model's context")
    return out, report


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: bool = True,
                           window: int = 64) -> list[list[int]]:
    """Shuffle, then sort by length within windows of `window` batches, so a batch holds similar
    lengths (little padding) while the order stays random. Deterministic in `seed`."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group:
        span = batch_size * window
        idx = [i for s in range(0, len(idx), span) for i in sorted(idx[s:s + span], key=lambda j: lengths[j])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class ScoreBatch:
    input_ids: torch.Tensor  # [rows, L]
    attention_mask: torch.Tensor  # [rows, L]
    hidden_index: torch.Tensor  # [U] flat row*L+pos of hidden states fed to the head
    entry_hidden: torch.Tensor  # [M] index into hidden_index (sorted)
    entry_target: torch.Tensor  # [M] target token id
    entry_answer: torch.Tensor  # [M] answer index
    entry_slot: torch.Tensor  # [M] token index within the answer
    n_answers: int
    n_slots: int
    n_tokens: int = 0  # real (unpadded) tokens in the forward pass
    ids: list[str] = field(default_factory=list)
    # Entry index where each chunk of CHUNK_ROWS scored rows starts (and the end): computed on the host when
    # the batch is built, so scoring needs no device read and a compiled forward no Python call.
    chunk_starts: list[int] = field(default_factory=list)

    def chunk_bounds(self, chunk_rows: int) -> list[int]:
        if chunk_rows == CHUNK_ROWS and self.chunk_starts:
            return self.chunk_starts
        hidden = self.entry_hidden.cpu().tolist()
        return _chunk_starts(hidden, self.hidden_index.shape[0], chunk_rows)

    def to(self, device: torch.device) -> "ScoreBatch":
        for name in ("input_ids", "attention_mask", "hidden_index", "entry_hidden", "entry_target",
                     "entry_answer", "entry_slot"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def _pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def rows_per_item(items: list[Tokenized]) -> int:
    """Sequences a score batch of these items holds per item: 1 when every answer is one token (they
    share the prompt's row), else one per answer."""
    n_comp = len(items[0].completions)
    return 1 if n_comp == 1 or all(len(c) == 1 for it in items for c in it.completions) else n_comp


def forward_chunks(items: list[Tokenized], idx: list[int], max_rows: int) -> list[list[int]]:
    """`idx` cut into contiguous parts whose score batches hold at most `max_rows` sequences."""
    if not idx:
        return []
    per = max(1, max_rows // rows_per_item([items[i] for i in idx]))
    return [idx[s:s + per] for s in range(0, len(idx), per)]


def _chunk_starts(entry_hidden: list[int], rows: int, chunk_rows: int) -> list[int]:
    import bisect

    return [bisect.bisect_left(entry_hidden, s) for s in range(0, rows + chunk_rows, chunk_rows)]


def score_batch(items: list[Tokenized], pad_id: int) -> ScoreBatch:
    """Answers are ordered completion-major: for pairs, answers [0, B) are chosen and [B, 2B) rejected.

    When every item's completions are single tokens (e.g. " yes"/" no"), all of an item's answers are
    read from one row: one forward pass and one row of logits serve both answers.
    """
    n_comp = len(items[0].completions)
    B = len(items)
    shared = n_comp > 1 and rows_per_item(items) == 1
    rows: list[list[int]] = []
    hidden: list[int] = []
    entries: list[tuple[int, int, int, int]] = []  # (hidden idx, target, answer, slot)
    if shared:
        rows = [it.prompt for it in items]
    else:
        rows = [it.prompt + it.completions[k] for k in range(n_comp) for it in items]
    ids, mask = _pad_rows(rows, pad_id)
    L = ids.shape[1]
    if shared:
        for b, it in enumerate(items):
            hidden.append(b * L + len(it.prompt) - 1)
            for k, comp in enumerate(it.completions):
                entries.append((len(hidden) - 1, comp[0], k * B + b, 0))
    else:
        for k in range(n_comp):
            for b, it in enumerate(items):
                r = k * B + b
                start = len(it.prompt)
                for s, tok in enumerate(it.completions[k]):
                    hidden.append(r * L + start + s - 1)
                    entries.append((len(hidden) - 1, tok, r, s))
    e = torch.tensor(entries, dtype=torch.long)
    n_slots = max(len(c) for it in items for c in it.completions)
    return ScoreBatch(ids, mask, torch.tensor(hidden, dtype=torch.long), e[:, 0], e[:, 1], e[:, 2], e[:, 3],
                      n_answers=n_comp * B, n_slots=n_slots, n_tokens=sum(len(r) for r in rows),
                      ids=[it.id for it in items],
                      chunk_starts=_chunk_starts([x[0] for x in entries], len(hidden), CHUNK_ROWS))
