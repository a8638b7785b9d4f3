"""Packed SFT (``optim.packing``): a forward's examples packed into rows by best-fit decreasing, each
attending only to itself at positions that restart per example. Its per-example losses equal the unpacked
ones (fp32), no token sees across an example's boundary, and a packed run trains, matches the unpacked run
step by step and resumes bit-identically. Device: CPU; precision stated per test."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import final_weights, killed_at_optimizer_step, run_config, write_records
from postlab.config import StageConfig, parse_run_config
from postlab.data import Example, pack_rows, score_batch, tokenize
from postlab.errors import ConfigError
from postlab.logprobs import score
from postlab.models import load_lm
from postlab.run import run

EXAMPLES = [  # prompts and completions of different lengths, so rows pack unevenly
    Example("Q: is the sky blue?", " yes", "a"),
    Example("Write a line about the sea:", " The sea is wide and grey and cold tonight, and far away.", "b"),
    Example("Count:", " one two three four five six seven eight nine ten eleven twelve", "c"),
    Example("Say hi", " hello", "d"),
    Example("A long prompt that goes on for quite a while before it asks anything at all: why?", " because", "e"),
    Example("Name a colour:", " green", "f"),
    Example("Finish the proverb: a stitch in time", " saves nine", "g"),
]


def per_example(lm, items, pack: bool, pack_length: int | None = None):
    """(per-example mean NLL with gradients, log-probs, mask, the batch) of one forward."""
    batch = score_batch(items, lm.tokenizer.pad_token_id, pack=pack, pack_length=pack_length)
    logps, mask = score(lm, batch)
    return -(logps * mask).sum(-1) / mask.sum(-1), logps, mask, batch


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_per_example_losses_and_gradients_equal_the_unpacked_ones(arch, request):
    """fp32: the same log-probs, per-example losses and gradients to float round-off, in fewer rows."""
    lm = load_lm(str(request.getfixturevalue(arch)), device="cpu", precision="fp32")
    items, _ = tokenize(EXAMPLES, lm.tokenizer, 256)
    out = {}
    for pack in (False, True):
        lm.model.zero_grad()
        loss, logps, mask, batch = per_example(lm, items, pack, pack_length=64)
        loss.mean().backward()
        grads = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
        out[pack] = (loss.detach(), logps.detach(), mask, batch, grads)
    (loss, logps, mask, plain, grads), (p_loss, p_logps, p_mask, packed, p_grads) = out[False], out[True]
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0] == len(items) and packed.segments is not None
    torch.testing.assert_close(p_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p_logps, logps, rtol=1e-6, atol=1e-5)
    assert torch.equal(p_mask, mask) and packed.n_tokens == plain.n_tokens
    assert packed.input_ids.numel() < plain.input_ids.numel()  # fewer padding tokens
    for name, g in grads.items():
        torch.testing.assert_close(p_grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-9)


def test_no_token_attends_across_an_example_boundary(tiny_llama):
    """fp32. Changing one example's tokens leaves every other example's log-probs bit-identical, though they
    share its row; and the mask itself: block-diagonal and causal, positions restarting at each example."""
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items, _ = tokenize(EXAMPLES, lm.tokenizer, 256)
    pad = lm.tokenizer.pad_token_id
    with torch.no_grad():
        _, logps, _, batch = per_example(lm, items, True, pack_length=64)
        row_of = batch.hidden_index // batch.input_ids.shape[1]
        answer_row = {int(a): int(r) for a, r in zip(batch.entry_answer, row_of[batch.entry_hidden])}
        victim = next(a for a, r in answer_row.items() if list(answer_row.values()).count(r) > 1)
        changed = list(items)
        it = items[victim]
        changed[victim] = type(it)([(t + 7) % 1000 for t in it.prompt], [[(t + 3) % 1000 for t in it.completions[0]]])
        _, logps2, _, batch2 = per_example(lm, changed, True, pack_length=64)
    assert torch.equal(batch2.segments, batch.segments)  # the same packing: only the victim's tokens differ
    others = [a for a in range(len(items)) if a != victim]
    assert answer_row[victim] in {answer_row[a] for a in others}  # it shares a row with another example
    assert torch.equal(logps[others], logps2[others]) and not torch.equal(logps[victim], logps2[victim])
    mask, seg, pos = batch.attention_mask()[:, 0], batch.segments, batch.position_ids
    for r in range(len(seg)):
        for j in range(seg.shape[1]):
            if seg[r, j] > 0:  # a real token sees exactly the earlier tokens of its own example
                sees = (seg[r] == seg[r, j]) & (torch.arange(seg.shape[1]) <= j)
                assert torch.equal(mask[r, j], sees)
                assert pos[r, j] == int(sees.sum()) - 1
    assert (batch.input_ids[seg < 0] == pad).all()


def test_best_fit_decreasing():
    assert pack_rows([5, 3, 8, 2, 4], 8) == [[2], [0, 1], [4, 3]]  # 8 | 5+3 | 4+2
    assert pack_rows([9, 2], 8) == [[0], [1]]  # longer than a row: a row of its own
    rows = pack_rows([7, 1, 6, 2, 5, 3, 4, 4], 8)
    assert sorted(i for r in rows for i in r) == list(range(8)) and len(rows) == 4
    assert all(sum([7, 1, 6, 2, 5, 3, 4, 4][i] for i in r) <= 8 for r in rows)


def test_without_room_to_pack_the_batch_is_the_unpacked_one(tiny_llama):
    """Rows as long as the longest example and examples of similar lengths: nothing packs, and the batch is
    the plain one (no mask to build)."""
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items, _ = tokenize(EXAMPLES[1:3], lm.tokenizer, 256)
    a, b = (score_batch(items, lm.tokenizer.pad_token_id, pack=p) for p in (False, True))
    assert b.segments is None and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.hidden_index, b.hidden_index)


def sft_tree(model, tmp_path, name: str, **optim):
    data = write_records(tmp_path / "sft.jsonl", [{"prompt": e.prompt, "completion": e.completion} for e in EXAMPLES * 2])
    return run_config(model, tmp_path / name, data, task={"name": "file", "train": str(data), "dev": str(data),
                                                          "dev_limit": 4},
                      optim={"lr": 3e-3, "batch_size": 7, "schedule": "constant", **optim}, epochs=3,
                      group_by_length=False, eval_at_start=False, save_every_steps=2, log_every=1)


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "train" and "loss" in r]


def test_a_packed_run_trains_as_the_unpacked_one_and_resumes(tiny_llama, tmp_path):
    """fp32. The same steps on the same examples with fewer padding tokens: each step's loss equals the
    unpacked run's (to round-off), the loss falls, and a run killed mid-stage resumes bit-identically."""
    run(parse_run_config(sft_tree(tiny_llama, tmp_path, "plain")))
    packed = sft_tree(tiny_llama, tmp_path, "packed", packing=True, packing_length=96)
    run(parse_run_config(packed))
    plain_losses, packed_losses = losses(tmp_path / "plain"), losses(tmp_path / "packed")
    assert len(packed_losses) == 6 and packed_losses[-1] < packed_losses[0]
    assert packed_losses == pytest.approx(plain_losses, rel=1e-4)
    cfg = parse_run_config(sft_tree(tiny_llama, tmp_path, "resumed", packing=True, packing_length=96))
    killed_at_optimizer_step(cfg, 5)  # after the step-4 checkpoint
    run(cfg, resume=True)
    a, b = final_weights(tmp_path / "packed"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "resumed") == packed_losses


@pytest.mark.parametrize("stage,needle", [
    ({"objective": {"name": "dpo"}, "optim": {"packing": True}}, "optim.packing packs SFT examples"),
    ({"optim": {"packing_length": 512}}, "set optim.packing: true"),
])
def test_packing_is_refused_where_it_means_nothing(stage, needle):
    with pytest.raises((ValueError, ConfigError), match=needle):
        StageConfig(**stage)
