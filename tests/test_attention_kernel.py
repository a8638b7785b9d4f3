"""Which attention a forward uses: postlab's short-rows attention on the CPU below SHORT_ROWS_BELOW
tokens (with or without gradients, so a reference pass and the training forward agree bit for bit),
PyTorch's SDPA (flash on the CPU) from there on; both give the same values and gradients.
Device: CPU; precision stated per test."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from postlab import decoder
from postlab.data import Example, Pair, score_batch, tokenize
from postlab.decoder import ATTENTION, decoder_and_head, grouped_attention
from postlab.logprobs import decoder_hidden, score
from postlab.models import load_lm

# SDPA's CPU kernels as a dispatch mode sees them: flash, and the math kernel's guarded softmax
SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_safe_softmax"}


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


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_short_rows_skip_sdpa_and_long_rows_keep_it(arch, precision, request):
    """CPU, bf16 autocast and fp32: short rows run postlab's attention (no SDPA kernel), in training
    and in no-grad passes alike; rows of SHORT_ROWS_BELOW tokens keep SDPA's flash kernel."""
    lm = load_lm(str(request.getfixturevalue(arch)), device="cpu", precision=precision)
    lm.model.eval()  # GPT-2's attention dropout would send training forwards to SDPA
    assert lm.model.config._attn_implementation == ATTENTION
    for grad in (True, False):
        ops = ops_of_a_step(lm, 40, grad=grad)
        assert not ops & SDPA_OPS and "baddbmm" in ops
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops_of_a_step(lm, decoder.SHORT_ROWS_BELOW)


def test_attention_dropout_goes_to_sdpa(tiny_gpt2):
    """fp32, CPU: a training forward with attention dropout (GPT-2's default) is SDPA's."""
    lm = load_lm(str(tiny_gpt2), device="cpu", precision="fp32")
    lm.model.train()
    assert SDPA_OPS & ops_of_a_step(lm, 40)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_short_rows_attention_gives_sdpas_log_probs_and_gradients(tiny_llama, monkeypatch, precision, share_prompt):
    """CPU, fp32 and bf16 autocast, rows with one causal mask and shared-prompt rows (a mask per row):
    per-answer log-probs and gradients of the short-rows attention agree with SDPA's flash kernel
    to the precision's rounding."""
    from conftest import tolerance

    lm = load_lm(str(tiny_llama), device="cpu", precision=precision)
    pairs = [Pair("Question: is the sky blue on a clear day? Answer:", " yes, it is", " no", "a"),
             Pair("Say hi:", " hello there friend", " good morning to you all", "b")]
    items, _ = tokenize(pairs, lm.tokenizer, 128, append_eos=True)

    def run():
        lm.model.zero_grad()
        logps, mask = score(lm, score_batch(items, lm.tokenizer.pad_token_id, share_prompt=share_prompt))
        per_answer = (logps * mask).sum(-1)
        per_answer.sum().backward()
        return per_answer.detach(), {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}

    ours_lp, ours_grads = run()
    monkeypatch.setattr(decoder, "SHORT_ROWS_BELOW", 0)
    sdpa_lp, sdpa_grads = run()
    assert torch.allclose(ours_lp, sdpa_lp, atol=tolerance(precision, scale=float(sdpa_lp.abs().max())))
    assert len(sdpa_grads) == len(ours_grads)
    for name, g in sdpa_grads.items():
        scale = float(g.abs().max())
        assert torch.allclose(ours_grads[name], g, atol=tolerance(precision, scale=scale, ulps=16)), name


def test_a_fully_masked_row_stays_finite():
    """fp32, CPU, 4 query heads over 2 key/value heads: a query row that sees nothing (a left-padded
    position, as transformers builds masks for generation) gives a finite output instead of NaN
    (which would reach every later position through the values); the other rows equal SDPA's."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :2] = False  # row 1: its first two positions are padding
    mask[1, :, :, :2] = False
    out = grouped_attention(q, k, v, mask)
    assert out.shape == (2, 6, 4, 8) and out.is_contiguous()
    assert torch.isfinite(out).all()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(out[0], expected[0], atol=1e-5)
    assert torch.allclose(out[1, 2:], expected[1, 2:], atol=1e-5)


def test_an_exported_config_names_sdpa_not_postlab(tiny_llama, tmp_path):
    """fp32, CPU: the attention postlab sets is not saved, so transformers alone loads the export."""
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    lm.model.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())
