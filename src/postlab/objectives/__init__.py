"""Objectives: pure functions from per-token log-probs and masks to a loss plus metrics.

An objective never sees a model. The training loop computes the log-probs it declares it needs
(policy always; cached reference or teacher log-probs when ``needs_reference``/``needs_teacher``)
and calls it. Adding an objective is a small file with a ``@register`` call, imported below.

Three shapes of input:
  * ``kind="sft"``: a :class:`TokenLogps` for a batch of completions.
  * ``kind="preference"``: a :class:`PairLogps` (chosen and rejected completions of the same prompts).
  * ``kind="unpaired"``: an :class:`UnpairedLogps` (completions labelled desirable or not: KTO).
"""
from __future__ import annotations

# Importing the modules registers their objectives (mix last: it validates its terms against the registry).
from . import distill, dpo_variants, kto, preference, reference_free, sft  # noqa: E402,F401
from .base import (  # noqa: F401
    REGISTRY,
    STAGE_FEEDS,
    LossFn,
    ObjectiveArgs,
    ObjectiveSpec,
    PairLogps,
    StageFeeds,
    TokenLogps,
    UnpairedLogps,
    get_objective,
    implicit_reward,
    parse_args,
    register,
    unmet_needs,
)

# isort: split
from . import mix  # noqa: E402,F401
