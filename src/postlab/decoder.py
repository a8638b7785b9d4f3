"""The transformer body and the LM head of a causal LM, apart: postlab applies the head only at the
positions it scores (logprobs.py), through any PEFT wrapper and under FSDP (fsdp.py); and the
attention the models postlab loads run (SDPA, or on the CPU over short rows grouped_attention)."""
from __future__ import annotations

import contextlib

import torch

from .errors import ModelError

HIDDEN_METHOD = "postlab_hidden_states"  # set on a model sharded by FSDP: see fsdp.py

# Below this many tokens per row, attention on the CPU runs in short_rows_attention; from there on,
# PyTorch's SDPA (its flash kernel on the CPU). bench/attention_kernel.py measures the rule.
SHORT_ROWS_BELOW = 192
ATTENTION = "postlab_sdpa"  # the attention implementation postlab sets on the models it loads


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


def short_rows_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """transformers' SDPA attention, except on the CPU over rows shorter than SHORT_ROWS_BELOW with a
    boolean 4D mask and no dropout: there, grouped_attention. The same code runs with and without
    gradients, so a reference pass and a training forward agree bit for bit."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, _ = query.shape
    mask = attention_mask
    if (query.device.type != "cpu" or length >= SHORT_ROWS_BELOW or key.shape[2] != length or dropout
            or mask is None or mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1
            or tuple(mask.shape[2:]) != (length, length) or len(mask) not in (1, rows)
            or heads % key.shape[1] or torch.compiler.is_compiling()
            or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return grouped_attention(query, key, value, mask, scaling), None


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      scaling: float | None = None) -> torch.Tensor:
    """Attention as plain batched products in fp32 (autocast off), the query heads that share a
    key/value head stacked along the rows, so keys and values are never repeated, and the mask added
    inside the first product. q [rows, heads, L, d], k and v [rows, kv_heads, L, d], mask
    [rows or 1, 1, L, L] (True: attend) -> [rows, L, heads, d] contiguous, in autocast's dtype (else
    q's). On a CPU over short rows PyTorch's kernels cost more: its flash kernel splits the queries
    into blocks of 32, and its math kernel under bf16 autocast casts q, k and v to bf16, back to fp32
    and the output to bf16 again, repeats keys and values per query head and guards fully masked rows
    with four more passes (bench/attention_kernel.py). Masked scores get float32's lowest value, as
    transformers' eager attention does: a fully masked row (a padded query) averages instead of
    dividing by zero, and is never scored."""
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q = _contiguous(query, torch.float32).view(rows * kv_heads, group * length, dim)
    k = _contiguous(key, torch.float32).view(rows * kv_heads, length, dim)
    v = _contiguous(value, torch.float32).view(rows * kv_heads, length, dim)
    # the additive mask [rows * kv_heads, group * length, length]: one [length, length] block per query head
    bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, :, None]
    if len(bias) == 1:  # one mask for all rows: a broadcast view
        bias = bias[0, 0].expand(group, -1, -1).reshape(group * length, length).expand(rows * kv_heads, -1, -1)
    else:
        bias = bias.expand(-1, kv_heads, group, -1, -1).reshape(rows * kv_heads, group * length, length)
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=dim ** -0.5 if scaling is None else scaling)
        out = torch.bmm(scores.softmax(-1), v)
    return _contiguous(out.view(rows, heads, length, dim).transpose(1, 2), out_dtype)


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # one copy either way: `to` with another dtype and a memory format copies once, but with the same
    # dtype it returns a non-contiguous tensor as it is
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def use_postlab_attention(model: torch.nn.Module) -> None:
    """Route a model's SDPA attention through short_rows_attention (registered with transformers under
    ATTENTION, its masks built as SDPA's); models with another implementation keep it. The name is
    not saved with the config: exported checkpoints load as SDPA models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, short_rows_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) == "sdpa":
        inner.set_attn_implementation(ATTENTION)


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
