"""`parallel: fsdp`: the policy's weights, gradients and optimizer state sharded across processes
(PyTorch's FSDP2 `fully_shard`: one unit per transformer block, plus the root for embeddings, final
norm and the tied head). The step is DDP's step: each process scores its share of every micro-batch,
gradients are summed (reduce-scattered, each process keeping its shard) and every shard takes the same
optimizer step. Evaluation, checkpoints and saved models see the whole model: the shards are gathered
for them. Same methods as `distributed.Replicated`, so the training loop does not know which it runs.

Training runs on a sharded copy of `lm.model`; `lm.model` keeps its structure (and its tied
weights) but hands back its weights' memory until `whole_model` or `finish` fills them in again.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch

from . import distributed as dist
from .decoder import HIDDEN_METHOD, decoder_and_head
from .errors import ConfigError, TrainingError

log = logging.getLogger("postlab")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes): one FSDP unit
    each, so only one block's weights are whole at a time."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"parallel: fsdp: cannot tell the transformer blocks of {type(inner).__name__} (it names "
                          f"no _no_split_modules); use parallel: ddp")
    return blocks


def _release(model: torch.nn.Module) -> None:
    # Replacing .data keeps each Parameter object, so tied weights stay tied when filled in again.
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.data = state[name].to(p.device)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class FullyShard:
    def __init__(self):
        self.plain: torch.nn.Module | None = None
        self.sharded: torch.nn.Module | None = None

    def prepare(self, lm) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        self.plain = lm.model
        model = copy.deepcopy(self.plain)
        mesh = init_device_mesh(dist.device().type, (dist.world_size(),))
        blocks = transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        body, _ = decoder_and_head(model)
        # Scoring runs the body, then the head at the scored rows only. As a method of the root,
        # FSDP gathers the root's weights (embeddings, tied head) around it, as around a forward.
        setattr(model, HIDDEN_METHOD, lambda **kw: body(**kw))
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, HIDDEN_METHOD)
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                # The loop weights each process's loss by its share of the micro-batch: gradients are
                # summed, not averaged. gloo has no pre-multiplied sum, hence plain sums.
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        _release(self.plain)
        log.info("fsdp: %d blocks + root sharded over %d processes", len(blocks), dist.world_size())
        self.sharded = lm.model = model
        return model

    def forwards(self, items, idx: list[int], max_rows: int) -> list[tuple[list[int], float]]:
        """Every forward is collective under FSDP (each block gathers its weights), so every process
        runs as many as the busiest one: the others repeat one of theirs with weight 0."""
        from .data import forward_chunks

        most = max(len(forward_chunks(items, dist.my_share(idx, r)[0], max_rows)) for r in range(dist.world_size()))
        mine = dist.forwards(items, idx, max_rows)  # at least one
        return mine + [(mine[0][0], 0.0)] * (most - len(mine))

    def reduce_gradients(self, params) -> None:
        pass  # reduce-scattered during the backward passes

    def clip_gradients(self, params, max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def fused_optimizer(self) -> bool:
        return False  # fused AdamW takes plain tensors

    @contextlib.contextmanager
    def whole_model(self, lm):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.sharded, options=_options(cpu_offload=True))  # the main process's
        if dist.is_main():
            _fill(self.plain, state)
            lm.model = self.plain
        del state
        try:
            yield
        finally:
            if dist.is_main():
                _release(self.plain)
                lm.model = self.sharded

    def checkpoint_state(self, model, optimizer) -> tuple[dict, dict | None]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = get_model_state_dict(model, options=_options(cpu_offload=True))
        optim = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
        return {n: t.contiguous() for n, t in weights.items() if n in trainable}, optim

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not all(isinstance(k, str) for k in state.get("state", {})):
            raise TrainingError("the checkpoint was written with parallel: ddp (or one process); resume it the same way")
        set_optimizer_state_dict(model, optimizer, state, options=_options())

    def finish(self, lm) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        _fill(self.plain, get_model_state_dict(self.sharded, options=_options()))  # on every process
        lm.model, self.sharded = self.plain, None


def strategy(parallel: str):
    """How processes share a stage's work: `parallel: ddp` (or a single process) -> distributed.Replicated;
    `parallel: fsdp` with several processes -> FullyShard (this module knows both; distributed.py
    knows nothing of sharding)."""
    if parallel == "fsdp" and dist.world_size() > 1:
        return FullyShard()
    return dist.Replicated()
