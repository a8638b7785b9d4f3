"""TRL's own loss code called on postlab's inputs, for the tests that compare objectives with TRL (1.16).

Each ``trl_*`` function builds the smallest trainer object TRL's loss method reads (``object.__new__`` plus
the attributes it uses) and feeds it the same per-token log-probs as postlab's objective: through a stub
model whose output carries them (``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``), or as the
sequence log-probs the method takes (``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``). No formula
is written here: the losses are TRL's.
"""
from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import torch

from postlab.objectives import PairLogps, TokenLogps, UnpairedLogps, get_objective

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental
CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"]
TRL_NAME = {"rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}


def random_side(g: torch.Generator, b: int, t: int, shift: float = 0.0, dtype=torch.float64) -> TokenLogps:
    """Random per-token log-probs of `b` completions of 1..t tokens (the first has t), with junk (not zeros)
    in padded positions, a reference and a policy log Σπ² (WPO's input, ≤ 0 like a real one)."""
    lens = torch.randint(1, t + 1, (b,), generator=g)
    lens[0] = t
    mask = torch.arange(t) < lens[:, None]
    policy = (-3 * torch.rand(b, t, generator=g, dtype=dtype) + shift).requires_grad_()
    return TokenLogps(policy, mask, reference=-3 * torch.rand(b, t, generator=g, dtype=dtype),
                      log_sum_sq_probs=-2 * torch.rand(b, t, generator=g, dtype=dtype))


def make_pair(b: int = 8, t: int = 7, seed: int = 0, gap: float = 0.0, dtype=torch.float64) -> PairLogps:
    """Random pairs of varying lengths; chosen policy log-probs shifted by ``gap``."""
    g = torch.Generator().manual_seed(seed)
    return PairLogps(random_side(g, b, t, gap, dtype), random_side(g, b, t, 0.0, dtype))


def ours(name: str, x, **raw):
    """postlab's objective `name` on `x` with options `raw` (validated by its args model)."""
    spec = get_objective(name)
    return spec.fn(x, spec.args(**raw))


def grads(loss: torch.Tensor, x: PairLogps):
    return torch.autograd.grad(loss, [x.chosen.policy, x.rejected.policy], retain_graph=True)


class StubModel:
    """Stands in for the policy: TRL reads ``outputs.log_probs`` (0 where labels are -100), WPO's
    ``log_sum_sq_probs`` and logging fields. `by_input` maps an input_ids tensor to other log-probs
    (KTO's KL pass)."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # accelerate's is_peft_model looks for compiled submodules

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None, by_input=()):
        self.log_probs, self.log_sum_sq_probs, self.by_input = log_probs, log_sum_sq_probs, list(by_input)

    def __call__(self, **kwargs):
        log_probs = next((lp for ids, lp in self.by_input if kwargs["input_ids"] is ids), self.log_probs)
        z = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, log_sum_sq_probs=self.log_sum_sq_probs, entropy=z,
                               mean_logits=z, is_top1=z.bool())


def _trainer(cls, **attrs):
    tr = object.__new__(cls)
    vars(tr).update(accelerator=CPU, aux_loss_enabled=False, _metrics={"train": defaultdict(list),
                    "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, **attrs)
    return tr


def _with_prompt_token(mask: torch.Tensor) -> torch.Tensor:
    """A completion mask with one prompt position in front (TRL shifts masks by one)."""
    return torch.cat([torch.zeros_like(mask[:, :1]), mask], 1).long()


def trl_dpo(x: PairLogps, loss_types: list[str], beta: float, label_smoothing: float = 0.0, loss_weights=None,
            ld_alpha: float | None = None, use_weighting: bool = False, discopop_tau: float = 0.05):
    """TRL's ``DPOTrainer._compute_loss`` on precomputed reference log-probs; returns (loss, last metrics)."""
    from trl import DPOTrainer

    c, r = x.chosen, x.rejected
    model = StubModel(torch.cat([c.policy * c.mask, r.policy * r.mask]),
                      torch.cat([c.log_sum_sq_probs, r.log_sum_sq_probs]) if use_weighting else None)
    reference = StubModel(torch.cat([c.reference * c.mask, r.reference * r.mask]))  # TRL sums it (LD-DPO too)
    completion_mask = _with_prompt_token(torch.cat([c.mask, r.mask]))
    tr = _trainer(DPOTrainer, model=model, ref_model=reference, ld_alpha=ld_alpha, precompute_ref_logps=False,
                  f_divergence_type="reverse_kl", loss_types=loss_types,
                  loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
                  use_weighting=use_weighting,
                  args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask}
    loss = tr._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


def trl_cpo(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str, beta: float, label_smoothing: float = 0.0,
            simpo_gamma: float = 0.5, alpha: float = 0.0):
    """TRL's ``CPOTrainer.cpo_loss`` on sequence log-probs; returns (mean loss, rewards c, r). ``alpha`` is
    AlphaPO's; the NLL term (cpo_alpha) is added by the trainer outside this method."""
    from trl.experimental.cpo import CPOTrainer

    tr = _trainer(CPOTrainer, alpha=alpha, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                  simpo_gamma=simpo_gamma)
    losses, rc, rr = tr.cpo_loss(chosen, rejected)
    return losses.mean(), rc, rr


def trl_orpo(chosen: torch.Tensor, rejected: torch.Tensor, beta: float):
    """TRL's ``ORPOTrainer.odds_ratio_loss`` on mean log-probs: (losses, rewards c, r, mean logσ(log odds),
    mean log odds). The trainer's loss is its NLL minus ``losses.mean()``."""
    from trl.experimental.orpo import ORPOTrainer

    return _trainer(ORPOTrainer, beta=beta).odds_ratio_loss(chosen, rejected)


def trl_kto(x: UnpairedLogps, beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
            undesirable_weight: float = 1.0):
    """TRL's ``KTOTrainer._compute_loss`` with precomputed reference log-probs; the stub model returns the
    mismatched pairs' log-probs for TRL's KL pass. Returns (loss, last metrics)."""
    from trl import KTOTrainer

    y, mis = x.completions, x.mismatched
    completion_mask = _with_prompt_token(y.mask)
    input_ids = torch.zeros_like(completion_mask)
    kl_input_ids = torch.zeros_like(completion_mask)
    by_input = [(kl_input_ids, (mis.policy * mis.mask).detach())] if mis is not None else []
    model = StubModel(y.policy * y.mask, by_input=by_input)
    tr = _trainer(KTOTrainer, model=model, calculate_KL=loss_type == "kto", precompute_ref_logps=True,
                  loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                  undesirable_weight=undesirable_weight, args=SimpleNamespace())
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(completion_mask),
             "completion_mask": completion_mask, "label": x.desirable, "ref_logps": y.sum("reference")}
    if mis is not None:
        batch.update(KL_input_ids=kl_input_ids, KL_attention_mask=torch.ones_like(completion_mask),
                     KL_completion_mask=_with_prompt_token(mis.mask), ref_KL_logps=mis.sum("reference"))
    loss = tr._compute_loss(model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


# ---- TRL's trainers on a real (tiny) model: the policy and reference forwards are TRL's own ---------------

FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def fused_model(path):
    """A fresh fp32 copy of the model at `path` with TRL's fused LM head (as TRL's trainers patch theirs)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_fused_lm_head(model, outputs=FUSED_OUTPUTS)
    return model


def trl_rows(prompts: list[list[int]], completions: list[list[int]], pad: int) -> dict:
    """TRL's collated rows: prompt + completion right-padded, with the attention and completion masks."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))

    def padded(rows, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    return {"input_ids": padded(seqs, pad), "attention_mask": padded([[1] * len(s) for s in seqs], 0),
            "completion_mask": padded([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0)}


def trl_dpo_model(policy, reference, items, pad: int, loss_types: list[str], beta: float, use_weighting=False):
    """TRL's ``DPOTrainer._compute_loss`` on tokenized pairs (postlab's Tokenized: prompt, [chosen, rejected]),
    policy and reference forwards by TRL's fused head. Returns (loss, last metrics)."""
    from trl import DPOTrainer

    prompts = [it.prompt for it in items] * 2
    inputs = trl_rows(prompts, [it.completions[0] for it in items] + [it.completions[1] for it in items], pad)
    tr = _trainer(DPOTrainer, model=policy, ref_model=reference, ld_alpha=None, precompute_ref_logps=False,
                  f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=[1.0] * len(loss_types),
                  beta=beta, label_smoothing=0.0, use_weighting=use_weighting,
                  args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None))
    policy.train()  # (TRL logs under "train" when its model trains)
    loss = tr._compute_loss(policy, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


def trl_kto_model(policy, reference, items, pad: int, beta: float, loss_type: str = "kto"):
    """TRL's ``KTOTrainer._compute_loss`` on tokenized unpaired items (postlab's Tokenized: prompt, [its own
    completion, its partner's], label), the partner's completion as TRL's ``KL_completion_ids``; policy,
    reference and KL forwards by TRL's fused head. Returns (loss, last metrics)."""
    from trl import KTOTrainer

    prompts = [it.prompt for it in items]
    batch = trl_rows(prompts, [it.completions[0] for it in items], pad)
    if loss_type == "kto":
        batch.update({f"KL_{k}": v for k, v in trl_rows(prompts, [it.completions[1] for it in items], pad).items()})
    batch["label"] = torch.tensor([bool(it.label) for it in items])
    tr = _trainer(KTOTrainer, model=policy, ref_model=reference, calculate_KL=loss_type == "kto",
                  precompute_ref_logps=False, loss_type=loss_type, beta=beta, desirable_weight=1.0,
                  undesirable_weight=1.0, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    policy.train()
    loss = tr._compute_loss(policy, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}
