"""A weighted sum of registered objectives, one stage's loss (TRL's ``loss_type`` list with ``loss_weights``):

    objective: {name: mix, terms: [{name: dpo, beta: 0.1}, {name: nll}], weights: [1.0, 0.2]}

loss = Σ_i w_i·loss_i. Each term is validated by its own objective's options; the mix needs what its terms
need (``spec.for_args``). Terms are all SFT objectives (an SFT stage) or preference objectives plus SFT ones,
which then score the pairs' chosen answers (TRL's "sft" term: ``nll`` there is the mean NLL of the chosen
tokens, so ``[dpo, nll]`` with weights [1, α] is RPO). Metrics: each term's own under ``<term>/`` and its
unweighted loss as ``<term>/loss``; a name used twice is numbered from its second use (``dpo/``, ``dpo2/``).
Refused: nested mixes, unpaired (KTO) terms, top-k terms in a preference mix or more than one top-k term
(a stage caches one top-k distribution, for SFT batches).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .base import REGISTRY, ObjectiveArgs, ObjectiveSpec, register

Out = tuple["torch.Tensor", dict[str, "torch.Tensor"]]  # noqa: F821 (torch is only named)


class MixArgs(ObjectiveArgs):
    terms: list[dict[str, Any]] = Field(min_length=1, description="the objectives summed: {name: ..., its options}")
    weights: list[float] | None = Field(None, description="one weight ≥ 0 per term (default: 1 each)")
    _terms: list[tuple[str, ObjectiveSpec, ObjectiveArgs]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _parse_terms(self) -> "MixArgs":
        if self.weights is not None and len(self.weights) != len(self.terms):
            raise refusal(f"weights: {len(self.weights)} weight(s) for {len(self.terms)} term(s)")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise refusal(f"weights must be ≥ 0 (a loss is minimized), got {self.weights}")
        seen: dict[str, int] = {}
        for i, raw in enumerate(self.terms):
            spec, args = _term(i, raw)
            seen[spec.name] = seen.get(spec.name, 0) + 1
            self._terms.append((spec.name + (str(seen[spec.name]) if seen[spec.name] > 1 else ""), spec, args))
        _check_kinds([spec.for_args(args) for _, spec, args in self._terms])
        return self

    @property
    def parsed(self) -> list[tuple[str, ObjectiveSpec, ObjectiveArgs, float]]:
        """(metric prefix, spec, options, weight) per term."""
        weights = self.weights or [1.0] * len(self.terms)
        return [(label, spec, args, w) for (label, spec, args), w in zip(self._terms, weights)]

    @property
    def kind(self) -> str:
        return "preference" if any(spec.kind == "preference" for _, spec, _ in self._terms) else "sft"

    @property
    def topk(self) -> int:
        """The top-k term's k (what a stage caches for ``topk_of``)."""
        return next(args.topk for _, spec, args in self._terms if spec.for_args(args).topk_of)


def refusal(message: str) -> PydanticCustomError:
    """A validation error whose message is `message` as written (no template fields)."""
    return PydanticCustomError("mix", message)


def _term(i: int, raw: Any) -> tuple[ObjectiveSpec, ObjectiveArgs]:
    where = f"terms[{i}]"
    if not isinstance(raw, dict) or "name" not in raw:
        raise refusal(f"{where}: expected {{name: OBJECTIVE, its options}}, got {raw!r}")
    options = {k: v for k, v in raw.items() if k != "name"}
    name = str(raw["name"])
    if name == "mix":
        raise refusal(f"{where}: a mix cannot hold a mix; list its terms instead")
    if name not in REGISTRY:
        raise refusal(f"{where}: unknown objective {name!r}; choose one of {sorted(set(REGISTRY) - {'mix'})}")
    spec = REGISTRY[name]
    try:
        return spec, spec.args(**options)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise refusal(f"{where} ({name}): {errors}") from None


def _check_kinds(needs: list[ObjectiveSpec]) -> None:
    kinds = {spec.kind for spec in needs}
    if "unpaired" in kinds:
        raise refusal("unpaired objectives (kto) cannot be mixed yet")
    topk = [spec.name for spec in needs if spec.topk_of]
    if len(topk) > 1:
        raise refusal(f"terms {topk} each need a top-k distribution; a stage caches one")
    if topk and "preference" in kinds:
        raise refusal(f"{topk[0]} needs a top-k distribution, which a stage caches for SFT batches only; it "
                      f"cannot score the chosen answers of a preference mix")


def mix_needs(spec: ObjectiveSpec, a: MixArgs) -> ObjectiveSpec:
    """The union of the terms' needs (each term's for its own options); the kind is preference when a term is."""
    needs = [term.for_args(args) for _, term, args, _ in a.parsed]
    return replace(spec, kind=a.kind, needs_reference=any(n.needs_reference for n in needs),
                   needs_teacher=any(n.needs_teacher for n in needs),
                   topk_of=next((n.topk_of for n in needs if n.topk_of), None),
                   needs_kl_baseline=any(n.needs_kl_baseline for n in needs),
                   needs_log_sum_sq_probs=any(n.needs_log_sum_sq_probs for n in needs))


# Registered as a preference objective with the reference; `mix_needs` gives each mix its own needs, which the
# stage prepares (it reads ObjectiveConfig.spec = spec.for_args(args)).
@register("mix", args=MixArgs, kind="preference", needs_reference=True, resolve=mix_needs)
def mix(x, a: MixArgs) -> Out:
    """Weighted sum of objectives: Σ w_i·loss_i; SFT terms of a preference mix score the chosen answers."""
    total, metrics = 0.0, {}
    for label, spec, args, weight in a.parsed:
        inputs = x.chosen if a.kind == "preference" and spec.kind == "sft" else x
        loss, m = spec.fn(inputs, args)
        total = total + weight * loss
        metrics[f"{label}/loss"] = loss.detach()
        metrics.update({f"{label}/{k}": v for k, v in m.items()})
    return total, metrics
