"""The transformer body and the LM head of a causal LM, apart: postlab applies the head only at the
positions it scores (logprobs.py), through any PEFT wrapper and under FSDP (fsdp.py)."""
from __future__ import annotations

import contextlib

import torch

from .errors import ModelError

HIDDEN_METHOD = "postlab_hidden_states"  # set on a model sharded by FSDP: see fsdp.py


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
