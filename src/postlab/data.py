"""From text examples to tensors: tokenization, length-grouped batches, and *score batches*.

A score batch says which hidden states feed the LM head and which target token each scored entry
reads, so the head runs only where a loss or metric needs it (one row for a one-token answer).
Every scored entry belongs to an *answer* (a completion) and a slot (its token index in that answer);
log-probs come back as a right-padded [answers, slots] tensor.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .errors import DataError
from .lazy import torch

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
class UnpairedExample:
    """A prompt and one completion labelled desirable or not (TRL's unpaired format: prompt, completion,
    label), the data of KTO-style objectives."""

    prompt: str
    completion: str
    desirable: bool
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
    completions: list[list[int]]  # one for SFT; [chosen, rejected] for pairs; unpaired: [its own, a partner's]
    id: str = ""
    label: bool | None = None  # unpaired examples: desirable or not

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(c) for c in self.completions)


@dataclass
class TokenizeReport:
    truncated: int = 0
    examples: int = 0


Examples = list[Example] | list[Pair] | list[Choices] | list[UnpairedExample]


def tokenize(examples: Examples, tokenizer, max_length: int, overlength: str = "refuse", append_eos: bool = True,
             source: str = "data", max_completion_tokens: int | None = None) -> tuple[list[Tokenized], TokenizeReport]:
    """Tokenize prompt and completion(s) separately (so the boundary is exact). Too long: refuse, or
    drop tokens from the start of the prompt, keeping the completion whole."""
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    out, report = [], TokenizeReport(examples=len(examples))
    too_long: list[tuple[str, int]] = []  # refused: (id, tokens), all reported together
    for i, ex in enumerate(examples):
        texts = ([ex.completion] if isinstance(ex, (Example, UnpairedExample)) else list(ex.answers)
                 if isinstance(ex, Choices) else [ex.chosen, ex.rejected])
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
        out.append(Tokenized(prompt, comps, ex.id or str(i), getattr(ex, "desirable", None)))
    if too_long:
        shown = ", ".join(f"{k} ({n} tokens)" for k, n in too_long[:3]) + (", ..." if len(too_long) > 3 else "")
        raise DataError(f"{source}: {len(too_long)} of {len(examples)} examples are longer than the limit of "
                        f"{max_length} tokens: {shown}; set task.overlength: truncate (drops the prompt's start) "
                        f"or raise model.max_length up to the model's context")
    return out, report


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: bool = True,
                           window: int = 64) -> list[list[int]]:
    """Shuffle, then sort by length within windows of `window` batches, so a batch holds similar
    lengths (little padding) while the order stays random. Deterministic in `seed`.

    The largest batch (its size times its longest item's length) comes first, as in transformers'
    length-grouped sampler: a batch too big for the device fails at step 1, not hours in, and the
    later steps can fit in the memory the first one touched instead of faulting in more."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group:
        span = batch_size * window
        idx = [i for s in range(0, len(idx), span) for i in sorted(idx[s:s + span], key=lambda j: lengths[j])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    if batches:
        largest = max(range(len(batches)), key=lambda b: len(batches[b]) * max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(largest))
    return batches


@dataclass
class ScoreBatch:
    input_ids: torch.Tensor  # [rows, L]
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
    # Rows that hold a prompt and several answers after it (see score_batch): each token's segment (0 the
    # prompt, k + 1 answer k, -1 padding) and position; or packed rows of whole sequences (segments 1, 2,
    # ..., positions restarting at each); None when every row is one plain sequence.
    segments: torch.Tensor | None = None  # [rows, L]
    position_ids: torch.Tensor | None = None  # [rows, L]

    def chunk_bounds(self, chunk_rows: int) -> list[int]:
        if chunk_rows == CHUNK_ROWS and self.chunk_starts:
            return self.chunk_starts
        hidden = self.entry_hidden.cpu().tolist()
        return _chunk_starts(hidden, self.hidden_index.shape[0], chunk_rows)

    def attention_mask(self) -> torch.Tensor:
        """The 4D boolean mask of the forward pass, built on the device: causal and, in shared rows, an
        answer sees the prompt and itself, never another answer; in packed rows (no segment 0) a sequence
        sees itself only: block-diagonal. Rows are right-padded, so a real token never sees padding under
        the causal mask."""
        L = self.input_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=self.input_ids.device).tril_()[None, None]
        if self.segments is None:
            return causal
        key, query = self.segments[:, None, None, :], self.segments[:, None, :, None]
        return causal & ((key == 0) | (key == query))

    def to(self, device: torch.device) -> "ScoreBatch":
        for name in ("input_ids", "hidden_index", "entry_hidden", "entry_target", "entry_answer", "entry_slot",
                     "segments", "position_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def _pad_rows(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def rows_per_item(items: list[Tokenized]) -> int:
    """Sequences a score batch of these items holds per item, as a forward's row limit counts them: 1
    when every answer is one token (they share the prompt's row), else one per answer (also when they
    share a row: it holds fewer tokens than the answers' own rows would)."""
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


# The cost of a row of L tokens, in units of one token's matmuls: each token also attends over up to L
# others (~4*L*d FLOPs a layer against ~12*d^2 + MLP for the matmuls), which for d = 576 (SmolLM2-135M)
# to 768 (GPT-2) equals the matmuls near L = 3000. Only used to choose between two layouts.
_ATTENTION_CROSSOVER = 3000


def _row_cost(rows: int, length: float) -> float:
    return rows * length * (1 + length / _ATTENTION_CROSSOVER)


def _cost(rows: list[list[int]]) -> float:
    return _row_cost(len(rows), max(len(r) for r in rows))


def forward_tokens(prompt: float, completions: list[float]) -> float:
    """Tokens one item puts through the decoder in the layout score_batch picks for an item of these
    (mean) lengths: for estimates, before any batch exists."""
    separate = [prompt + c for c in completions]
    if len(completions) == 1:
        return separate[0]
    shared = prompt + sum(c - 1 for c in completions)
    return shared if _row_cost(1, shared) < _row_cost(len(completions), max(separate)) else sum(separate)


def _shared_rows(items: list[Tokenized]) -> list[list[int]]:
    """One row per item: the prompt, then each answer but its last token (a last token predicts nothing
    scored, so a one-token answer adds nothing: its row is the prompt alone)."""
    return [it.prompt + [t for c in it.completions for t in c[:-1]] for it in items]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the sequences (indices into `lengths`), longest first, each into the row whose
    room left is the smallest that holds it, else a new row; a row's lengths sum to at most `capacity` (a
    longer sequence gets a row of its own). Deterministic: ties go to the earlier sequence and row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def _packed(groups: list[list[int]], lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segments, positions) [rows, width] of packed rows: the j-th sequence of a row is segment j + 1
    (-1 padding) and its positions restart at 0."""
    seg = [[-1] * width for _ in groups]
    pos = [[0] * width for _ in groups]
    for row, group in enumerate(groups):
        at = 0
        for j, r in enumerate(group):
            seg[row][at:at + lengths[r]] = [j + 1] * lengths[r]
            pos[row][at:at + lengths[r]] = range(lengths[r])
            at += lengths[r]
    return torch.tensor(seg, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


def _shares_rows(items: list[Tokenized], separate: list[list[int]], share_prompt: bool | None) -> bool:
    """Whether an item's answers share its prompt's row (see score_batch)."""
    if len(items[0].completions) == 1:
        return False
    if rows_per_item(items) == 1:
        return True
    return _cost(_shared_rows(items)) < _cost(separate) if share_prompt is None else share_prompt


def _pack(separate: list[list[int]], pack_length: int | None) -> list[list[int]] | None:
    """The sequences of each packed row, or None where no row would hold two. The rows are padded to the
    longest, so where the same number of rows fits into shorter ones (balanced, ~ tokens / rows each) those
    are taken: fewer padding tokens and a shorter attention span."""
    lengths = [len(x) for x in separate]
    groups = pack_rows(lengths, max(pack_length or 0, max(lengths)))
    width = max(sum(lengths[r] for r in g) for g in groups)
    low = max(max(lengths), -(-sum(lengths) // len(groups)))  # no fewer rows can be shorter than this
    for cap in range(low, width, max(1, (width - low) // 8)):  # the shortest of a few widths that keeps the rows
        tighter = pack_rows(lengths, cap)
        if len(tighter) == len(groups):
            groups = tighter
            break
    return groups if len(groups) < len(separate) else None


def _placed(separate: list[list[int]], groups: list[list[int]]):
    """(the packed rows' tokens, each sequence's (row, offset))."""
    where = [(0, 0)] * len(separate)
    for row, g in enumerate(groups):
        at = 0
        for r in g:
            where[r] = (row, at)
            at += len(separate[r])
    return [[t for r in g for t in separate[r]] for g in groups], where


def _separate_entries(items: list[Tokenized], where: list[tuple[int, int]], L: int):
    """(hidden indices, entries) of sequences that each hold a prompt and one answer, answer r at
    (row, offset) where[r]: completion-major, in the same order however they are placed."""
    hidden: list[int] = []
    entries: list[tuple[int, int, int, int]] = []  # (hidden idx, target, answer, slot)
    B = len(items)
    for k in range(len(items[0].completions)):
        for b, it in enumerate(items):
            r = k * B + b
            row, start = where[r][0], where[r][1] + len(it.prompt)
            for s, tok in enumerate(it.completions[k]):
                hidden.append(row * L + start + s - 1)
                entries.append((len(hidden) - 1, tok, r, s))
    return hidden, entries


def _shared_entries(items: list[Tokenized], L: int):
    """(hidden indices, entries, segments, positions) of rows that hold a prompt and its answers."""
    B = len(items)
    hidden: list[int] = []
    entries: list[tuple[int, int, int, int]] = []  # (hidden idx, target, answer, slot)
    segments = torch.full((B, L), -1, dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    for b, it in enumerate(items):
        P = len(it.prompt)
        segments[b, :P] = 0
        positions[b, :P] = torch.arange(P)
        hidden.append(b * L + P - 1)  # the prompt's last position predicts every answer's first token
        first = len(hidden) - 1
        entries += [(first, comp[0], k * B + b, 0) for k, comp in enumerate(it.completions)]
        at = P
        for k, comp in enumerate(it.completions):
            n = len(comp) - 1
            segments[b, at:at + n] = k + 1
            positions[b, at:at + n] = torch.arange(P, P + n)
            for s in range(1, len(comp)):
                hidden.append(b * L + at + s - 1)
                entries.append((len(hidden) - 1, comp[s], k * B + b, s))
            at += n
    if rows_per_item(items) == 1:
        return hidden, entries, None, None  # prompt-only rows: plain causal sequences
    return hidden, entries, segments, positions


def score_batch(items: list[Tokenized], pad_id: int, share_prompt: bool | None = None, pack: bool = False,
                pack_length: int | None = None) -> ScoreBatch:
    """Answers are ordered completion-major: for pairs, answers [0, B) are chosen and [B, 2B) rejected.

    An item's answers share one row when that is cheaper (`share_prompt` None), or when told: the prompt
    runs once and each answer follows it, seeing the prompt and itself only (attention_mask()), at the
    positions it would have alone, so its log-probs are those of its own sequence. One-token answers
    (" yes"/" no") always share: their row is the prompt and one row of logits serves both. Otherwise
    each answer has a row of its own (prompt + answer), or with `pack` the sequences (prompt + answer)
    are packed into rows of at most max(`pack_length`, the longest sequence) tokens (`pack_rows`), each
    seeing only itself, at its own positions: the same scored entries, in the same order, as unpacked.
    """
    n_comp = len(items[0].completions)
    separate = [it.prompt + it.completions[k] for k in range(n_comp) for it in items]
    shared = _shares_rows(items, separate, share_prompt)
    groups = _pack(separate, pack_length) if pack and not shared else None
    if shared:
        rows = _shared_rows(items)
    elif groups is not None:
        rows, where = _placed(separate, groups)
    else:  # (also when nothing packs: the plain layout, rows in order)
        rows, where = separate, [(r, 0) for r in range(len(separate))]
    ids = _pad_rows(rows, pad_id)
    L = ids.shape[1]
    if shared:
        hidden, entries, segments, positions = _shared_entries(items, L)
    else:
        hidden, entries = _separate_entries(items, where, L)
        segments, positions = (None, None) if groups is None else _packed(groups, [len(x) for x in separate], L)
    e = torch.tensor(entries, dtype=torch.long)
    n_slots = max(len(c) for it in items for c in it.completions)
    return ScoreBatch(ids, torch.tensor(hidden, dtype=torch.long), e[:, 0], e[:, 1], e[:, 2], e[:, 3],
                      n_answers=n_comp * len(items), n_slots=n_slots, n_tokens=sum(len(r) for r in rows),
                      ids=[it.id for it in items],
                      chunk_starts=_chunk_starts([x[0] for x in entries], len(hidden), CHUNK_ROWS),
                      segments=segments, position_ids=positions)
