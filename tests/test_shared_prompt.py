"""A prompt shared by its answers: one row holds the prompt once and each answer after it, each answer
attending to the prompt and to itself, at its own positions. Its log-probs (and their gradients) must
be those of the answer's own row; the layout is chosen by cost. Device: CPU; precision stated."""
from __future__ import annotations

import pytest
import torch

from postlab.data import Pair, score_batch, tokenize
from postlab.logprobs import score
from postlab.models import load_lm

PAIRS = [  # prompts and answers of different lengths, so rows are padded and answers end unevenly
    Pair("Question: is the sky blue on a clear day? Answer briefly:", " yes, it is", " no", "a"),
    Pair("Say hi:", " hello there friend", " good morning to you all", "b"),
    Pair("Count from one: one two", " three four five six", " seven", "c"),
]


def scored(lm, items, share: bool):
    batch = score_batch(items, lm.tokenizer.pad_token_id, share_prompt=share)
    lm.model.zero_grad()
    logps, mask = score(lm, batch)
    (logps * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
    return batch, logps.detach(), mask, grads


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_an_answer_in_a_shared_row_scores_as_in_its_own_row(arch, request):
    """fp32, CPU: the same log-probs and gradients to float round-off, with fewer tokens in the forward."""
    lm = load_lm(str(request.getfixturevalue(arch)), device="cpu", precision="fp32")
    items, _ = tokenize(PAIRS, lm.tokenizer, 128, append_eos=True)
    shared, lp_shared, mask_shared, g_shared = scored(lm, items, True)
    alone, lp_alone, mask_alone, g_alone = scored(lm, items, False)
    assert shared.segments is not None and shared.input_ids.shape[0] == len(items)
    assert alone.input_ids.shape[0] == 2 * len(items)
    assert shared.n_tokens < alone.n_tokens
    assert torch.equal(mask_shared, mask_alone)
    assert torch.allclose(lp_shared, lp_alone, atol=1e-5), (lp_shared - lp_alone).abs().max()
    for name, g in g_alone.items():
        assert torch.allclose(g_shared[name], g, atol=1e-5, rtol=1e-4), name


def test_a_shared_row_in_bf16_agrees_to_bf16_rounding(tiny_llama):
    """bf16 autocast, CPU: other shapes round differently, so agreement to a few bf16 units."""
    from conftest import tolerance

    lm = load_lm(str(tiny_llama), device="cpu", precision="bf16")
    items, _ = tokenize(PAIRS, lm.tokenizer, 128, append_eos=True)
    with torch.no_grad():
        a, mask = score(lm, score_batch(items, lm.tokenizer.pad_token_id, share_prompt=True))
        b, _ = score(lm, score_batch(items, lm.tokenizer.pad_token_id, share_prompt=False))
    per_answer_a, per_answer_b = (a * mask).sum(-1), (b * mask).sum(-1)
    assert torch.allclose(per_answer_a, per_answer_b, atol=tolerance("bf16", scale=float(per_answer_b.abs().max())))


def test_an_answer_never_sees_another_answer(tiny_llama):
    """The mask itself: the rejected answer's tokens see the prompt and their own earlier tokens only."""
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items, _ = tokenize(PAIRS[:1], lm.tokenizer, 128, append_eos=True)
    batch = score_batch(items, lm.tokenizer.pad_token_id, share_prompt=True)
    seg, mask = batch.segments[0], batch.attention_mask()[0, 0]
    P, chosen = len(items[0].prompt), len(items[0].completions[0]) - 1
    first_rejected = P + chosen
    assert seg[first_rejected] == 2 and seg[first_rejected - 1] == 1
    assert mask[first_rejected, :P].all() and not mask[first_rejected, P:first_rejected].any()
    assert mask[first_rejected, first_rejected]
    assert batch.position_ids[0, first_rejected] == P  # where the rejected answer starts in its own sequence


def test_the_layout_follows_the_cost(tiny_llama):
    """Long prompts with short answers share; a one-token prompt with long answers does not (the shared
    row would only add attention); one-token answers always read one prompt-only row."""
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    pad, tok = lm.tokenizer.pad_token_id, lm.tokenizer

    def layout(prompt: str, chosen: str, rejected: str):
        items, _ = tokenize([Pair(prompt, chosen, rejected, "x")] * 2, tok, 512, append_eos=False)
        return score_batch(items, pad)

    long_prompt = layout("word " * 60, " yes sir", " no sir")
    assert long_prompt.segments is not None and long_prompt.input_ids.shape[0] == 2
    long_answers = layout("Go", " one" * 200, " two" * 200)
    assert long_answers.segments is None and long_answers.input_ids.shape[0] == 4
    one_token = layout("word " * 10, " yes", " no")
    assert one_token.segments is None and one_token.input_ids.shape[0] == 2
    assert one_token.input_ids.shape[1] == len(tok("word " * 10, add_special_tokens=False).input_ids)


def test_estimates_count_the_tokens_of_the_layout_batches_use(tiny_llama):
    """`postlab study plan` sizes a preference stage by data.forward_tokens, which must pick the layout
    score_batch picks and count its tokens."""
    from postlab.data import forward_tokens

    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    for prompt, answer in (("word " * 60, " yes sir"), ("Go", " one" * 200), ("Say hi:", " hello there friend")):
        items, _ = tokenize([Pair(prompt, answer, answer, "x")], lm.tokenizer, 512, append_eos=False)
        batch = score_batch(items, lm.tokenizer.pad_token_id)
        P, C = len(items[0].prompt), len(items[0].completions[0])
        assert forward_tokens(P, [C, C]) == batch.n_tokens
    assert forward_tokens(40, [130, 130]) == 40 + 2 * 129  # sonnet-like: sharing is cheaper
    assert forward_tokens(1, [400, 400]) == 2 * 401  # no prompt to share: separate rows


@pytest.mark.slow
@pytest.mark.parametrize("task", ["paraphrase", "sonnets"])
def test_the_embedded_model_scores_a_shared_prompt_as_separate_rows(task, data_dir):
    """The real model (SmolLM2-135M), fp32, CPU, 8 pairs of each task's benchmark data: per-sequence
    log-probs (sonnets: ~570 nats) agree to 1e-6 relative between the two layouts."""
    from postlab.config import TaskConfig
    from postlab.tasks import get_task

    lm = load_lm("smollm2-135m", precision="fp32")
    if task == "paraphrase":
        t = get_task(TaskConfig(name="paraphrase", train=str(data_dir / "quora" / "quora-train.tsv"), train_limit=8))
        pairs = t.preference_pairs("train")[:8]
    else:
        ex = get_task(TaskConfig(name="sonnets", train=str(data_dir / "sonnets" / "sonnets.txt"))).train_examples()[:9]
        pairs = [Pair(e.prompt, e.completion, ex[i + 1].completion, e.id) for i, e in enumerate(ex[:8])]
    items, _ = tokenize(pairs, lm.tokenizer, lm.max_length, append_eos=True)
    with torch.no_grad():
        a, mask = score(lm, score_batch(items, lm.tokenizer.pad_token_id, share_prompt=True))
        b, _ = score(lm, score_batch(items, lm.tokenizer.pad_token_id, share_prompt=False))
    seq_a, seq_b = (a * mask).sum(-1), (b * mask).sum(-1)
    assert torch.allclose(seq_a, seq_b, rtol=1e-6, atol=1e-4), (seq_a - seq_b).abs().max()
