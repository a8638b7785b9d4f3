"""The objectives' building blocks (the input shapes, the args base class, the registry, what the
training stage feeds them); the package docstring (postlab/objectives/__init__.py) says how it all fits.

Objectives: pure functions from per-token log-probs and masks to a loss plus metrics.

An objective never sees a model. The training loop computes the log-probs it declares it needs
(policy always; cached reference or teacher log-probs when ``needs_reference``/``needs_teacher``)
and calls it. Adding an objective is a small file with a ``@register`` call, imported below.

Three shapes of input:
  * ``kind="sft"``: a :class:`TokenLogps` for a batch of completions.
  * ``kind="preference"``: a :class:`PairLogps` (chosen and rejected completions of the same prompts).
  * ``kind="unpaired"``: an :class:`UnpairedLogps` (completions labelled desirable or not: KTO).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

Kind = Literal["sft", "preference", "unpaired"]


@dataclass
class TokenLogps:
    """Per-token log-probs of completion tokens, right-padded to [batch, tokens].

    ``policy`` carries gradients; ``reference``/``teacher`` are cached constants (same shape) or None.
    ``mask`` is True at real completion tokens. For objectives over whole next-token distributions
    (``topk_of``): ``topk_target`` [batch, tokens, k] holds the cached log-probs of the reference's or
    teacher's k most likely tokens at each position, ``topk_policy`` the policy's log-probs of the same
    tokens (with gradients); see :mod:`postlab.objectives.divergence` for how the tail is handled.
    ``log_sum_sq_probs`` (objectives that declare ``needs_log_sum_sq_probs``: WPO weighting) holds, at
    each position, log Σ_v π(v|s_t)² over the policy's whole next-token distribution, without gradient.
    """

    policy: torch.Tensor
    mask: torch.Tensor
    reference: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    topk_policy: torch.Tensor | None = None
    topk_target: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None

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


@dataclass
class UnpairedLogps:
    """Completions labelled desirable or not (TRL's unpaired format: prompt, completion, label).

    ``completions``: the batch's own (prompt, completion) pairs, policy with gradients and reference.
    ``desirable``: [batch] bool, the label of each completion.
    ``mismatched`` (objectives that declare ``needs_kl_baseline``): the per-token log-probs of
    mismatched pairs, row i = the completion of another example of the batch scored after prompt i
    (TRL's KTOTrainer pairs prompt i with completion i−1), policy (no gradient needed) and reference.
    """

    completions: TokenLogps
    desirable: torch.Tensor
    mismatched: TokenLogps | None = None


class ObjectiveArgs(BaseModel):
    """Base for an objective's knobs; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


LossFn = Callable[..., tuple["torch.Tensor", dict[str, "torch.Tensor"]]]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: LossFn  # fn(inputs, args) -> (scalar loss, {metric name: scalar tensor})
    args: type[ObjectiveArgs]
    kind: Kind
    needs_reference: bool = False
    needs_teacher: bool = False
    topk_of: Literal["reference", "teacher"] | None = None  # needs that model's top-k distribution (args.topk)
    needs_kl_baseline: bool = False  # UnpairedLogps.mismatched (KTO's KL baseline)
    needs_log_sum_sq_probs: bool = False  # TokenLogps.log_sum_sq_probs (WPO weighting)
    doc: str = field(default="")
    # Options that change what the objective needs (a mix of terms, dpo's wpo): args -> the spec for them
    resolve: Callable[[ObjectiveSpec, ObjectiveArgs], ObjectiveSpec] | None = None

    def for_args(self, args: ObjectiveArgs) -> ObjectiveSpec:
        """The spec with the needs of these options: what a stage must prepare to train with them."""
        return self if self.resolve is None else self.resolve(self, args)

    def needs(self) -> list[str]:
        """What besides the policy's log-probs of the scored tokens this spec needs, in words."""
        return [what for what, on in (
            ("the reference", self.needs_reference), ("the teacher", self.needs_teacher),
            (f"the {self.topk_of}'s top-k distribution", self.topk_of is not None),
            ("a KL baseline of mismatched prompt/completion pairs", self.needs_kl_baseline),
            ("the policy's log Σ_v π(v)² per position", self.needs_log_sum_sq_probs)) if on]


REGISTRY: dict[str, ObjectiveSpec] = {}


def register(name: str, *, args: type[ObjectiveArgs] = ObjectiveArgs, kind: Kind, needs_reference: bool = False,
             needs_teacher: bool = False, topk_of: Literal["reference", "teacher"] | None = None,
             needs_kl_baseline: bool = False, needs_log_sum_sq_probs: bool = False,
             resolve: Callable[[ObjectiveSpec, ObjectiveArgs], ObjectiveSpec] | None = None,
             ) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        if topk_of and "topk" not in args.model_fields:
            raise ValueError(f"objective {name!r}: topk_of needs a `topk` field in its args")
        REGISTRY[name] = ObjectiveSpec(name, fn, args, kind, needs_reference, needs_teacher, topk_of,
                                       needs_kl_baseline, needs_log_sum_sq_probs, (fn.__doc__ or "").strip(), resolve)
        return fn

    return deco


def get_objective(name: str) -> ObjectiveSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"objective: unknown name {name!r}; choose one of {sorted(REGISTRY)}") from None


@dataclass(frozen=True)
class StageFeeds:
    """What the training stage prepares for an objective today: what ``spec.for_args(args)`` declares
    (the stage reads ObjectiveConfig.spec), for SFT, preference and unpaired batches, the KL baseline's
    mismatched pairs (each unpaired item carries a partner's completion) and the policy's log Σπ² (from
    its own forward). An objective whose options need more is refused when the config is validated,
    naming what is missing, instead of failing in the loop. Widen these as the stage learns to prepare
    more (docs/objectives.md, "What the stage must prepare")."""

    kinds: frozenset[str] = frozenset({"sft", "preference", "unpaired"})
    resolves_args: bool = True  # the stage reads ObjectiveConfig.spec, which is spec.for_args(args)
    kl_baseline: bool = True  # preferences.with_mismatched, forward.objective_inputs
    log_sum_sq_probs: bool = True  # logprobs.score(log_sum_sq=True)


STAGE_FEEDS = StageFeeds()


def unmet_needs(spec: ObjectiveSpec, args: ObjectiveArgs, feeds: StageFeeds = STAGE_FEEDS) -> list[str]:
    """What the objective, with these options, needs and the stage does not prepare ([]: trainable)."""
    need = spec.for_args(args)
    missing = []
    if need.kind not in feeds.kinds:
        missing.append(f"{need.kind} batches")
    if need.needs_kl_baseline and not feeds.kl_baseline:
        missing.append("the KL baseline (log-probs of mismatched prompt/completion pairs)")
    if need.needs_log_sum_sq_probs and not feeds.log_sum_sq_probs:
        missing.append("the policy's log Σ_v π(v)² at each completion position")
    # A stage that reads the registered spec prepares its needs: enough when the options need no more.
    covered = (need.kind == spec.kind and spec.needs_reference >= need.needs_reference
               and spec.needs_teacher >= need.needs_teacher and need.topk_of in (None, spec.topk_of))
    if not feeds.resolves_args and need.kind in feeds.kinds and not covered:
        missing.append(f"{_described(need)} for these options (it prepares what {spec.name} registered, "
                       f"{_described(spec)}, until it reads spec.for_args)")
    return missing


def _described(spec: ObjectiveSpec) -> str:
    return f"{spec.kind} batches" + (f" with {', '.join(spec.needs())}" if spec.needs() else "")


def parse_args(spec: ObjectiveSpec, raw: dict) -> ObjectiveArgs:
    """The objective's options from a config, validated; refused too when the training stage cannot
    prepare what they need (`unmet_needs`). Losses called directly take ``spec.args(**raw)``."""
    from pydantic import ValidationError

    try:
        args = spec.args(**raw)
    except ValidationError as e:
        from ..errors import format_validation_error

        raise ConfigError(format_validation_error(e, prefix=f"objective ({spec.name})")) from None
    missing = unmet_needs(spec, args)
    if missing:
        raise ConfigError(f"objective ({spec.name}): not trainable yet: the training stage does not prepare "
                          f"{' nor '.join(missing)} (docs/objectives.md, 'What the stage must prepare')")
    return args
