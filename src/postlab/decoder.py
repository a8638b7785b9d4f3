"""The transformer body and the LM head of a causal LM, apart: postlab applies the head only at the
positions it scores (logprobs.py), through any PEFT wrapper and under FSDP (fsdp.py)."""
from __future__ import annotations

import contextlib

import torch

from .errors import ModelError

HIDDEN_METHOD = "postlab_hidden_states"  # set on a model sharded by FSDP: see fsdp.py

# PyTorch's CPU flash-attention kernel splits queries into blocks of 32 below 192 tokens; there, in
# bf16, its forward plus backward costs 1.4-2.5x the math kernel's (bench/attention_kernel.py). From
# 192 tokens on, and in fp32, flash stays.
MATH_ATTENTION_BELOW = 192


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns hidden states) and the LM head, through any PEFT wrapper, so the
    head can be applied only at the positions that are scored."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    body = inner.base_model
    if HIDDEN_METHOD in model.__dict__:
        return model.__dict__[HIDDEN_METHOD], head
    if head is None or body is inner:
        raise ModelError(f"{type(inner).__name__} is not a causal LM with a separate output head")
    return body, head


def attention_kernel(body, input_ids: torch.Tensor):
    """The SDPA kernel for a forward of `body` over `input_ids` ([rows, L]): the math kernel in bf16 on
    the CPU for rows shorter than MATH_ATTENTION_BELOW, else PyTorch's own choice. Forward-only passes
    choose alike although flash's forward alone is the faster: the reference pass then computes a DPO
    stage's first policy log-probs bit for bit (the two kernels differ by bf16 rounding), so the first
    loss is log 2. The math kernel keeps each layer's attention weights (fp32) for the backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    compiled = hasattr(body, "_orig_mod")  # torch.compile-d: inductor chooses its own attention
    if input_ids.device.type != "cpu" or input_ids.shape[1] >= MATH_ATTENTION_BELOW or compiled:
        return contextlib.nullcontext()
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (autocast_bf16 or getattr(body, "dtype", None) == torch.bfloat16):
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def compiled_body(model: torch.nn.Module, backend: str | None):
    """Inside the block, scoring runs the transformer body through torch.compile(backend, dynamic
    shapes); nothing changes with backend None."""
    if not backend:
        yield
        return
    body, _ = decoder_and_head(model)
    model.__dict__[HIDDEN_METHOD] = torch.compile(body, backend=backend, dynamic=True)
    try:
        yield
    finally:
        model.__dict__.pop(HIDDEN_METHOD, None)
