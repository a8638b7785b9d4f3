"""The objectives' building blocks (the input shapes, the args base class, the registry); the package
docstring (postlab/objectives/__init__.py) says how it all fits.

Objectives: pure functions from per-token log-probs and masks to a loss plus metrics.

An objective never sees a model. The training loop computes the log-probs it declares it needs
(policy always; cached reference or teacher log-probs when ``needs_reference``/``needs_teacher``)
and calls it. Adding an objective is a small file with a ``@register`` call, imported below.

Two shapes of input:
  * ``kind="sft"``: a :class:`TokenLogps` for a batch of completions.
  * ``kind="preference"``: a :class:`PairLogps` (chosen and rejected completions of the same prompts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class TokenLogps:
    """Per-token log-probs of completion tokens, right-padded to [batch, tokens].

    ``policy`` carries gradients; ``reference``/``teacher`` are cached constants (same shape) or None.
    ``mask`` is True at real completion tokens. For objectives over whole next-token distributions
    (``topk_of``): ``topk_target`` [batch, tokens, k] holds the cached log-probs of the reference's or
    teacher's k most likely tokens at each position, ``topk_policy`` the policy's log-probs of the same
    tokens (with gradients); see :mod:`postlab.objectives.divergence` for how the tail is handled.
    """

    policy: torch.Tensor
    mask: torch.Tensor
    reference: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    topk_policy: torch.Tensor | None = None
    topk_target: torch.Tensor | None = None

    def sum(self, which: str = "policy") -> torch.Tensor:
        """Sequence log-prob: sum over completion tokens -> [batch]."""
        return (getattr(self, which) * self.mask).sum(-1)

    def mean(self, which: str = "policy") -> torch.Tensor:
        """Length-averaged sequence log-prob -> [batch]."""
        return self.sum(which) / self.mask.sum(-1).clamp(min=1)

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.mask.sum(-1)


def implicit_reward(policy: torch.Tensor | float, reference: torch.Tensor | float, beta: float):
    """The implicit reward r = β·(log π − log πref) of a token or a sequence: the one definition that
    objectives, `postlab eval --reference` and `postlab diagnose` share."""
    return beta * (policy - reference)


@dataclass
class PairLogps:
    chosen: TokenLogps
    rejected: TokenLogps


class ObjectiveArgs(BaseModel):
    """Base for an objective's knobs; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


LossFn = Callable[..., tuple["torch.Tensor", dict[str, "torch.Tensor"]]]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: LossFn  # fn(inputs, args) -> (scalar loss, {metric name: scalar tensor})
    args: type[ObjectiveArgs]
    kind: Literal["sft", "preference"]
    needs_reference: bool = False
    needs_teacher: bool = False
    topk_of: Literal["reference", "teacher"] | None = None  # needs that model's top-k distribution (args.topk)
    doc: str = field(default="")


REGISTRY: dict[str, ObjectiveSpec] = {}


def register(name: str, *, args: type[ObjectiveArgs] = ObjectiveArgs, kind: Literal["sft", "preference"],
             needs_reference: bool = False, needs_teacher: bool = False,
             topk_of: Literal["reference", "teacher"] | None = None) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        if topk_of and "topk" not in args.model_fields:
            raise ValueError(f"objective {name!r}: topk_of needs a `topk` field in its args")
        REGISTRY[name] = ObjectiveSpec(name, fn, args, kind, needs_reference, needs_teacher, topk_of,
                                       (fn.__doc__ or "").strip())
        return fn

    return deco


def get_objective(name: str) -> ObjectiveSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"objective: unknown name {name!r}; choose one of {sorted(REGISTRY)}") from None


def parse_args(spec: ObjectiveSpec, raw: dict) -> ObjectiveArgs:
    from pydantic import ValidationError

    try:
        return spec.args(**raw)
    except ValidationError as e:
        from ..errors import format_validation_error

        raise ConfigError(format_validation_error(e, prefix=f"objective ({spec.name})")) from None
