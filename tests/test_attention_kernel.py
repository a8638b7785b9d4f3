"""Which SDPA kernel a forward uses: the math kernel for bf16 forwards on the CPU over short rows
(PyTorch's CPU flash backward is slow there), with or without gradients (so a reference pass and the
training forward agree bit for bit), flash otherwise; both kernels give the same values.
Device: CPU; precision stated per test."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from postlab import decoder
from postlab.data import Example, Pair, score_batch, tokenize
from postlab.decoder import decoder_and_head
from postlab.logprobs import decoder_hidden, score
from postlab.models import load_lm

FLASH = "_scaled_dot_product_flash_attention_for_cpu"


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def ops_of_a_step(lm, length: int, grad: bool = True) -> set[str]:
    """aten op names of one forward (and backward, with `grad`) of the body over rows of `length`."""
    body, _ = decoder_and_head(lm.model)
    items, _ = tokenize([Example("x " * (length - 2), " y", "e")], lm.tokenizer, 512, append_eos=False)
    batch = score_batch(items * 2, lm.tokenizer.pad_token_id)
    assert batch.input_ids.shape[1] == length
    with OpNames() as rec, torch.set_grad_enabled(grad), lm.autocast():
        hidden = decoder_hidden(body, batch)
        if grad:
            hidden.float().sum().backward()
    return rec.names


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_bf16_on_short_rows_uses_the_math_kernel(arch, request):
    """bf16 autocast, CPU: short rows go through the math kernel, in training and in no-grad passes
    alike; long rows keep flash."""
    lm = load_lm(str(request.getfixturevalue(arch)), device="cpu", precision="bf16")
    assert FLASH not in ops_of_a_step(lm, 40)
    assert FLASH not in ops_of_a_step(lm, 40, grad=False)
    assert FLASH in ops_of_a_step(lm, decoder.MATH_ATTENTION_BELOW)


def test_fp32_training_keeps_flash(tiny_llama):
    """fp32, CPU: the flash kernel is as fast there, so nothing changes."""
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    assert FLASH in ops_of_a_step(lm, 40)


def test_both_kernels_give_the_same_log_probs_and_gradients(tiny_llama, monkeypatch):
    """bf16 autocast, CPU, shared-prompt rows (a segment mask): per-answer log-probs and gradients of
    the math kernel agree with flash's to bf16 rounding."""
    from conftest import tolerance

    lm = load_lm(str(tiny_llama), device="cpu", precision="bf16")
    pairs = [Pair("Question: is the sky blue on a clear day? Answer:", " yes, it is", " no", "a"),
             Pair("Say hi:", " hello there friend", " good morning to you all", "b")]
    items, _ = tokenize(pairs, lm.tokenizer, 128, append_eos=True)

    def run():
        lm.model.zero_grad()
        logps, mask = score(lm, score_batch(items, lm.tokenizer.pad_token_id, share_prompt=True))
        per_answer = (logps * mask).sum(-1)
        per_answer.sum().backward()
        return per_answer.detach(), {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}

    math_lp, math_grads = run()
    monkeypatch.setattr(decoder, "MATH_ATTENTION_BELOW", 0)
    flash_lp, flash_grads = run()
    assert torch.allclose(math_lp, flash_lp, atol=tolerance("bf16", scale=float(flash_lp.abs().max())))
    for name, g in flash_grads.items():
        scale = float(g.abs().max())
        assert torch.allclose(math_grads[name], g, atol=tolerance("bf16", scale=scale, ulps=16)), name
